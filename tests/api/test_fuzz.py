"""Schemathesis fuzzes the real server from its own OpenAPI schema: no request may produce a 5xx.
Generation endpoints are left out of the fuzzing (random step counts make it unbounded in time); their bad-input
handling is tested field by field in test_server.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_until_serving


def test_openapi_fuzzing_finds_no_server_errors(tmp_path, sd1_file):
    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sdstudio.cli", "serve", "--data-dir", str(tmp_path), "--port",
                               str(port), "--no-demo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url)
        schemathesis = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run([str(schemathesis), "run", url + "/openapi.json", "--checks", "not_a_server_error",
                              "--max-examples", "10", "--seed", "1", "--exclude-path-regex",
                              "txt2img|img2img|/api/jobs$|rerun"],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]
