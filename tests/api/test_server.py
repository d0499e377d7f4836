"""The real server (uvicorn on a free port) driven by plain HTTP and by the unchanged PyPI `webuiapi` client."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import wait_until_serving
from sdstudio import pipeline
from sdstudio.api.app import create_app, ensure_demo_model, serve
from sdstudio.errors import SDStudioError
from sdstudio.images.infotext import parse_infotext
from sdstudio.service.engine import Engine

SMALL = {"width": 64, "height": 64, "steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd1_file):
    data = tmp_path_factory.mktemp("server")
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    (data / "models" / "Lora").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, 4, generator=g)}, data / "models" / "Lora" / "ink.safetensors")
    port = free_port()
    config = uvicorn.Config(create_app(Engine(data), api_auth=None), host="127.0.0.1", port=port, log_level="error")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url)
    yield url, data
    instance.should_exit = True
    thread.join(timeout=10)


def test_listings(server):
    url, _ = server
    models = httpx.get(url + "/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny"]
    samplers = {s["name"] for s in httpx.get(url + "/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M", "DDIM", "LCM"} <= samplers
    assert "karras" in {s["name"] for s in httpx.get(url + "/sdapi/v1/schedulers").json()}
    assert httpx.get(url + "/sdapi/v1/loras").json()[0]["name"] == "ink"
    assert httpx.post(url + "/api/tokens", json={"text": "a cat"}).json() == {"used": 2, "capacity": 75}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "Generate" in page.text
    script = httpx.get(url + "/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    memory = httpx.get(url + "/sdapi/v1/memory").json()
    assert memory["ram"]["total"] >= memory["ram"]["free"] > 0
    assert memory["cuda"] == {"error": "no CUDA"}   # this engine runs on the CPU


def test_txt2img_returns_png_with_infotext_and_png_info_reads_it(server):
    url, _ = server
    response = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "a cat <lora:ink:0.5>", "seed": 42,
                                                            "sampler_name": "Euler a", **SMALL}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42] and info["infotexts"][0].startswith("a cat <lora:ink:0.5>\nSteps: 2")
    assert "Lora hashes" in info["infotexts"][0]
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64) and image.info["parameters"] == info["infotexts"][0]
    parsed = httpx.post(url + "/sdapi/v1/png-info", json={"image": body["images"][0]}).json()
    assert parsed["parameters"]["Seed"] == "42" and parsed["parameters"]["Prompt"] == "a cat <lora:ink:0.5>"


def test_negative_prompt_skipping_comes_from_the_request_or_the_options(server):
    url, _ = server
    body = {"prompt": "x", "negative_prompt": "y", "seed": 3, "sampler_name": "Euler", **SMALL}
    by_field = httpx.post(url + "/sdapi/v1/txt2img", json={**body, "s_min_uncond": 100,
                                                           "override_settings": {"s_min_uncond_all": True}},
                          timeout=120).json()
    assert "NGMS: 100, NGMS all steps: True" in json.loads(by_field["info"])["infotexts"][0]
    httpx.post(url + "/sdapi/v1/options", json={"skip_early_cond": 0.5})
    try:
        by_option = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120).json()
    finally:
        httpx.post(url + "/sdapi/v1/options", json={"skip_early_cond": 0.0})
    text = json.loads(by_option["info"])["infotexts"][0]
    assert "Skip Early CFG: 0.5" in text and "NGMS" not in text


def test_token_merging_ratio_options_follow_a1111_per_mode(server):
    url, _ = server
    body = {"prompt": "x", "seed": 4, "sampler_name": "Euler", **SMALL}

    def ratio(mode, **extra):
        reply = httpx.post(url + f"/sdapi/v1/{mode}", json={**body, **extra}, timeout=120).json()
        return parse_infotext(json.loads(reply["info"])["infotexts"][0]).params.get("Token merging ratio")

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 30, 200)).save(png, format="PNG")
    init = {"init_images": [base64.b64encode(png.getvalue()).decode()]}
    httpx.post(url + "/sdapi/v1/options", json={"token_merging_ratio_img2img": 0.5})
    try:
        assert ratio("txt2img") is None and ratio("img2img", **init) == "0.5"
        assert ratio("img2img", override_settings={"token_merging_ratio": 0.3}, **init) == "0.3"
        assert ratio("txt2img", token_merging_ratio=0.2) == "0.2"
    finally:
        httpx.post(url + "/sdapi/v1/options", json={"token_merging_ratio_img2img": 0.0})


def test_webuiapi_client_works_unchanged(server):
    import webuiapi

    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port))
    result = client.txt2img(prompt="a house", seed=7, sampler_name="Euler", **SMALL)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [7]
    again = client.img2img(images=[result.image], prompt="a house", denoising_strength=0.5, seed=7, **SMALL)
    assert again.image.size == (64, 64)
    assert client.get_options()["sd_vae"] == "Automatic"
    assert any(m["model_name"] == "tiny" for m in client.get_sd_models())
    assert "progress" in client.get_progress()


def test_fifty_concurrent_requests_all_complete(server):
    url, _ = server

    def one(seed):
        return httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "seed": seed, "width": 64, "height": 64,
                                                           "steps": 1, "sampler_name": "Euler"}, timeout=300)

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert [json.loads(r.json()["info"])["seed"] for r in responses] == list(range(50))


def test_interrupt_mid_job_keeps_the_queue_working(server):
    url, _ = server
    with ThreadPoolExecutor(max_workers=1) as pool:
        long = pool.submit(httpx.post, url + "/sdapi/v1/txt2img",
                           json={"prompt": "x", "width": 64, "height": 64, "steps": 400}, timeout=300)
        for _ in range(200):
            if httpx.get(url + "/sdapi/v1/progress").json()["state"]["sampling_step"] > 0:
                break
            time.sleep(0.05)
        httpx.post(url + "/sdapi/v1/interrupt")
        assert json.loads(long.result().json()["info"])["interrupted"] is True
    after = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "y", **SMALL}, timeout=120)
    assert after.status_code == 200 and len(after.json()["images"]) == 1


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "width": 100000}, "width"),
    ({"prompt": "x", "sampler_name": "Nope", **SMALL}, "sampler_name"),
])
def test_bad_requests_are_4xx_naming_the_field(server, body, field):
    url, _ = server
    response = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert 400 <= response.status_code < 500 and field in response.text


def test_bad_json_base64_and_unknown_model(server):
    url, _ = server
    raw = httpx.post(url + "/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
    assert raw.status_code == 422
    bad = httpx.post(url + "/sdapi/v1/img2img", json={"init_images": ["%%%"], **SMALL})
    assert bad.status_code == 422 and "init_images" in bad.text
    unknown = httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nothing-like-this"})
    assert unknown.status_code == 422 and "nothing-like-this" in unknown.text
    assert httpx.get(url + "/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny")
    assert httpx.get(url + "/sdapi/v1/sd-models").status_code == 200   # still serving


def test_basic_auth_and_listen_without_auth(tmp_path, sd1_file):
    from fastapi.testclient import TestClient

    app = create_app(Engine(tmp_path), api_auth="me:secret")
    client = TestClient(app)
    assert client.get("/sdapi/v1/samplers").status_code == 401
    assert client.get("/sdapi/v1/samplers", auth=("me", "wrong")).status_code == 401
    assert client.get("/sdapi/v1/samplers", auth=("me", "secret")).status_code == 200
    with pytest.raises(SDStudioError, match="--api-auth"):
        serve(tmp_path, listen=True)


def test_demo_model_is_written_only_into_an_empty_folder(tmp_path):
    made = ensure_demo_model(tmp_path)
    assert made.name == "demo-random-weights.safetensors" and made.stat().st_size > 0
    assert ensure_demo_model(tmp_path) is None


def wait_job(url, job_id):
    for _ in range(600):
        job = httpx.get(f"{url}/api/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_async_jobs_history_search_and_rerun(server):
    url, data = server
    job_id = httpx.post(url + "/api/jobs", json={"mode": "txt2img", "prompt": "a unique zebra", "seed": 99,
                                                 **SMALL}).json()["job_id"]
    job = wait_job(url, job_id)
    assert job["status"] == "done" and len(job["images"]) == 1 and job["infotexts"][0].startswith("a unique zebra")
    found = httpx.get(url + "/api/history", params={"q": "unique zebra"}).json()
    assert found["total"] == 1
    item = found["items"][0]
    assert item["seed"] == 99 and item["model"] == "tiny" and item["params"]["steps"] == 2
    png = httpx.get(url + item["image_url"])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).info["parameters"] == item["infotext"]
    again = wait_job(url, httpx.post(f"{url}/api/history/{item['id']}/rerun").json()["job_id"])
    assert again["images"][0] == job["images"][0]
    assert httpx.get(url + "/api/history", params={"q": "nothing-matches-this"}).json()["total"] == 0
    bad = httpx.post(url + "/api/jobs", json={"mode": "txt2img", "steps": "x"})
    assert bad.status_code == 422 and "steps" in bad.text
    assert httpx.get(url + "/api/jobs/job-unknown").status_code == 404


def test_catalog_and_no_path_traversal(server):
    url, data = server
    catalog = httpx.get(url + "/api/catalog").json()
    assert catalog["checkpoints"][0]["label"] == "SD1" and catalog["loras"][0]["name"] == "ink"
    assert catalog["loras"][0]["compatible"] is True
    embeddings = data / "models" / "embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(2, 64)}, embeddings / "badhands.safetensors")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(embeddings / "badhands.preview.png")
    assert httpx.post(url + "/sdapi/v1/refresh-embeddings").status_code == 200
    assert httpx.post(url + "/sdapi/v1/txt2img", json=SMALL, timeout=120).status_code == 200  # a model is loaded
    card = next(e for e in httpx.get(url + "/api/catalog").json()["embeddings"] if e["name"] == "badhands")
    assert card["loaded"] is True and card["preview_url"] == "/api/preview/embedding/badhands.safetensors"
    picture = Image.open(io.BytesIO(httpx.get(url + card["preview_url"]).content))
    assert picture.getpixel((0, 0)) == (200, 10, 10)
    (data / "secret.txt").write_text("no")
    for path in ("/outputs/../secret.txt", "/outputs/%2e%2e/secret.txt", "/outputs/..%2fsecret.txt",
                 "/api/preview/lora/../../secret.txt", "/api/preview/checkpoint/tiny.safetensors"):
        response = httpx.get(url + path)
        assert response.status_code == 404 and "no" != response.text, path


def test_sigterm_interrupts_the_running_job_fails_queued_ones_and_exits(tmp_path, sd1_file):
    import signal
    import subprocess
    import sys

    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "sdstudio.cli", "serve", "--data-dir", str(tmp_path),
                                "--port", str(port)])
    try:
        wait_until_serving(url)
        long_job = {"prompt": "a cat", "steps": 1000, "width": 128, "height": 128, "n_iter": 100}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/sdapi/v1/txt2img", json=long_job, timeout=120)
            for _ in range(600):
                if httpx.get(url + "/sdapi/v1/progress").json()["state"]["sampling_step"] > 0:
                    break
                time.sleep(0.1)
            queued = pool.submit(httpx.post, url + "/sdapi/v1/txt2img", json=long_job, timeout=120)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == -signal.SIGTERM   # uvicorn re-raises the signal it caught
            first, second = running.result(), queued.result()
        assert first.status_code == 200 and json.loads(first.json()["info"])["interrupted"] is True
        assert second.status_code == 503 and "shutting down" in second.text
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("precision", ["bf16", "float", "auto"])
def test_engine_loads_models_in_the_precision_the_server_was_started_with(tmp_path, sd1_file, precision):
    from sdstudio.models.checkpoint import precision_options, resolve_precision
    from sdstudio.models.int8 import Int8Linear

    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    options = precision_options(precision)
    engine = Engine(tmp_path, **options)
    try:
        assert engine.model().dtype == options["dtype"] and engine.model().unet.dtype == options["dtype"]
        int8 = any(isinstance(m, Int8Linear) for m in engine.model().unet.modules())
        assert int8 == (precision == "auto")   # on the bf16 model, or the fast fp32 one without native bf16 math
        job = engine.submit("txt2img", pipeline.make_request(None, {"prompt": "a cat", **SMALL}))
        job.done.wait(60)
        assert job.status == "done" and job.result.images[0].size == (64, 64)
    finally:
        engine.close()
    assert resolve_precision("fp32") == torch.float32
