"""Schemathesis fuzzes the real server from its own OpenAPI schema, every operation included: no request may produce
a 5xx. Generation requests keep their fuzzed shapes and values, but fuzz_hooks.py clamps in-range step counts, image
counts and sizes so each one is a tiny job."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

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
        warm_up = {"prompt": "warm up", "steps": 1, "width": 64, "height": 64}
        assert httpx.post(url + "/sdapi/v1/txt2img", json=warm_up, timeout=120).status_code == 200
        schemathesis = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run([str(schemathesis), "run", url + "/openapi.json", "--checks", "not_a_server_error",
                              "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "60"],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path,
                             env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.fuzz_hooks",
                                  "PYTHONPATH": str(Path(__file__).parents[2])})
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert run.returncode == 0, run.stdout[-3000:]
    summary = run.stdout.split("SUMMARY")[-1]
    assert " passed" in summary and "failed" not in summary and "errored" not in summary, summary
