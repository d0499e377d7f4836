"""The web page in a real browser (Debian chromium driven by Playwright) against the real server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu",
        "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, sd1_file):
    data = tmp_path_factory.mktemp("web")
    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "sdstudio.cli", "serve", "--data-dir", str(data), "--port",
                                str(port), "--no-demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/sdapi/v1/samplers", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield chromium
        chromium.close()


def test_generate_shows_image_infotext_and_token_counts(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model option").first.inner_text().startswith("tiny.safetensors")
    page.fill("#prompt", "a red cat")
    page.wait_for_function("document.querySelector('#count-prompt').textContent === '3/75'")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "2"), ("#seed", "123")):
        page.fill(field, value)
    page.select_option("#sampler_name", "Euler")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Seed: 123')", timeout=60000)
    infotext = page.inner_text("#infotext")
    assert infotext.startswith("a red cat\nNegative prompt: blurry\nSteps: 2, Sampler: Euler")
    assert page.get_attribute("#image", "src").startswith("data:image/png;base64,")
    page.screenshot(path=str(Path(tmp_path) / "page.png"))
    if os.environ.get("SDSTUDIO_SCREENSHOT"):
        page.screenshot(path=os.environ["SDSTUDIO_SCREENSHOT"])


def test_prompt_is_rendered_as_text_not_html(server, browser):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.fill("#prompt", "<img src=x onerror=\"document.title='pwned'\">")
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "1")):
        page.fill(field, value)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#infotext').textContent.includes('Steps: 1')", timeout=60000)
    assert page.title() == "sdstudio" and page.locator("#infotext img").count() == 0
