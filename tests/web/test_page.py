"""The web page in a real browser: Debian's chromium driven by Playwright against the real `sdstudio serve`."""
from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio import synthetic

from playwright import sync_api

CHROMIUM = "/usr/bin/chromium"   # Debian's chromium, installed by `make test` (never a downloaded browser)

LAUNCH_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu",
               "--no-first-run", "--disable-sync"]
LORA_KEY = "lora_unet_mid_block_attentions_0_proj_in"   # a real SD1 module; 64 channels in the tiny model
SCREENSHOT = Path("/tmp/sdstudio_page.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_lora(path: Path, base_model: str) -> None:
    """A kohya-style LoRA (one lora_down/lora_up pair with alpha) declaring its base model in metadata."""
    g = torch.Generator().manual_seed(0)
    save_file({f"{LORA_KEY}.lora_down.weight": torch.randn(4, 64, 1, 1, generator=g) * 0.1,
               f"{LORA_KEY}.lora_up.weight": torch.randn(64, 4, 1, 1, generator=g) * 0.1,
               f"{LORA_KEY}.alpha": torch.tensor(4.0)},
              path, metadata={"ss_base_model_version": base_model, "ss_network_dim": "4", "ss_network_alpha": "4"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sdstudio serve` in a subprocess over a data dir with a tiny SD1 checkpoint and two LoRAs (SD1, SDXL)."""
    data = tmp_path_factory.mktemp("web")
    synthetic.write_checkpoint(data / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1", "tiny")
    loras = data / "models" / "Lora"
    loras.mkdir(parents=True)
    write_lora(loras / "inkstyle.safetensors", "sd_v1")
    (loras / "inkstyle.json").write_text(json.dumps({"preferred weight": 0.6, "activation text": "ink style"}))
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(loras / "inkstyle.png")
    write_lora(loras / "xlstyle.safetensors", "sdxl_base_v1-0")
    (data / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 64)}, data / "embeddings" / "fluffy.safetensors")   # tiny CLIP width
    save_file({"emb_params": torch.randn(1, 768)}, data / "embeddings" / "wide.safetensors")    # SD1 full width
    port = free_port()
    sdstudio = Path(sys.executable).parent / "sdstudio"
    process = subprocess.Popen([str(sdstudio), "serve", "--data-dir", str(data), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            httpx.get(url + "/sdapi/v1/samplers", timeout=1)
            break
        except httpx.HTTPError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail("server did not start:\n" + process.stdout.read().decode(errors="replace"))
            time.sleep(0.2)
    yield url, data
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(20_000)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def small_settings(page, steps: int = 2, size: int = 64, seed: int = -1) -> None:
    for field, value in (("width", size), ("height", size), ("steps", steps), ("seed", seed)):
        page.fill(f"#{field}", str(value))
    page.select_option("#sampler_name", "Euler a")


def wait_done(page) -> None:
    sync_api.expect(page.locator("#status")).to_have_text("Done: 1 image", timeout=30_000)
    sync_api.expect(page.locator("#generate")).to_be_enabled()


def test_generate_shows_image_and_infotext_as_text(page, server):
    _, data = server
    page.select_option("#model", label=page.locator("#model option").first.inner_text())
    prompt = "a red fox <b>bold</b>"
    page.fill("#prompt", prompt)
    small_settings(page, seed=1234)
    page.click("#generate")
    wait_done(page)
    info = page.locator("#infotext")
    text = info.text_content()
    assert text.startswith(prompt)                       # markup in the prompt stays literal text
    assert "Steps: 2, Sampler: Euler a" in text and "Seed: 1234" in text and "Size: 64x64" in text
    assert info.locator("b").count() == 0
    assert page.eval_on_selector("#main-image", "img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    assert list((data / "outputs").rglob("*.png"))      # the server saved it too
    # ♻ puts the shown image's seed back; ⚄ makes it random again
    page.fill("#seed", "-1")
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1234"
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_lora_card_inserts_tag_and_incompatible_badge(page):
    cards = page.locator("#cards .card")
    sync_api.expect(cards).to_have_count(2)
    ink, xl = page.locator(".card[data-name=inkstyle]"), page.locator(".card[data-name=xlstyle]")
    assert ink.locator(".badge").count() == 0 and ink.locator("img").count() == 1     # preview shown
    sync_api.expect(xl.locator(".badge")).to_have_text("incompatible")
    page.fill("#network-search", "ink")
    sync_api.expect(cards).to_have_count(1)
    page.fill("#prompt", "a cat")
    ink.click()
    assert page.input_value("#prompt") == "a cat <lora:inkstyle:0.6> ink style"   # preferred weight + activation
    ink.click()                                                                     # a second click removes it
    assert "<lora:" not in page.input_value("#prompt")
    ink.click()
    small_settings(page)
    page.click("#generate")
    wait_done(page)
    assert 'Lora hashes: "inkstyle: ' in page.inner_text("#infotext")


def test_embedding_cards_insert_the_name(page):
    page.click("#network-tabs [data-kind=embeddings]")
    fluffy, wide = page.locator(".card[data-name=fluffy]"), page.locator(".card[data-name=wide]")
    sync_api.expect(wide.locator(".badge")).to_have_text("incompatible")     # 768 wide; the model's CLIP is 64
    assert fluffy.locator(".badge").count() == 0
    page.fill("#prompt", "a dog")
    fluffy.click()
    assert page.input_value("#prompt") == "a dog fluffy"
    sync_api.expect(page.locator("#count-prompt")).to_have_text("4/75")      # the embedding's 2 vectors count


def test_png_info_round_trip(page, tmp_path):
    page.fill("#prompt", "a lighthouse, at dusk")
    page.fill("#negative_prompt", "fog")
    small_settings(page, steps=3, seed=777)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    wait_done(page)
    png = tmp_path / "generated.png"
    source = page.get_attribute("#main-image", "src")
    png.write_bytes(base64.b64decode(source.split(",", 1)[1]))
    page.fill("#prompt", "")
    page.fill("#seed", "-1")
    page.fill("#steps", "20")
    page.click("[data-tab=pnginfo]")
    page.set_input_files("#png-file", str(png))
    sync_api.expect(page.locator("#png-text")).to_contain_text("Seed: 777")
    sync_api.expect(page.locator("#png-params")).to_contain_text("Negative prompt")
    page.click("#png-to-txt2img")
    assert page.is_visible("#panel-generate")
    assert page.input_value("#prompt") == "a lighthouse, at dusk"
    assert page.input_value("#negative_prompt") == "fog"
    assert page.input_value("#seed") == "777" and page.input_value("#steps") == "3"


def test_interrupt_then_the_page_recovers(page):
    page.fill("#prompt", "a long job")
    small_settings(page, steps=150, size=256)
    page.click("#generate")
    sync_api.expect(page.locator("#progress-text")).to_have_text(re.compile(r"Step [1-9]\d*/150"), timeout=20_000)
    assert page.get_attribute("#main-image", "src").startswith("data:image/png")   # live preview
    page.click("#interrupt")
    sync_api.expect(page.locator("#status")).to_have_text("Interrupted", timeout=20_000)
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    assert page.is_hidden("#progress")
    small_settings(page)
    page.click("#generate")
    wait_done(page)


def test_token_counter_follows_typing(page):
    counter = page.locator("#count-prompt")
    page.fill("#prompt", "")
    sync_api.expect(counter).to_have_text("0/75")
    page.locator("#prompt").press_sequentially("a cat")
    sync_api.expect(counter).to_have_text("2/75")
    page.fill("#prompt", "cat " * 80)               # 80 one-token words: past one chunk, capacity 150
    sync_api.expect(counter).to_have_text("80/150")


def test_history_search_and_rerun(page):
    page.fill("#prompt", "zebra crossing")
    small_settings(page, seed=99)
    page.click("#generate")
    wait_done(page)
    page.click("[data-tab=history]")
    page.fill("#history-search", "zebra")
    items = page.locator(".history-item")
    sync_api.expect(items).to_have_count(1)
    sync_api.expect(items.first.locator(".history-prompt")).to_have_text("zebra crossing")
    items.first.locator(".rerun").click()
    wait_done(page)
    assert "Seed: 99" in page.inner_text("#infotext")
    page.click("[data-tab=history]")
    sync_api.expect(page.locator("#history-total")).to_have_text("2 images")


def test_settings_are_written_through_options(page, server):
    url, _ = server
    page.click("[data-tab=settings]")
    sync_api.expect(page.locator("[name=CLIP_stop_at_last_layers]")).to_have_value("1")   # loaded from options
    page.fill("[name=CLIP_stop_at_last_layers]", "2")
    page.fill("[name=s_min_uncond]", "1.5")
    page.check("[name=s_min_uncond_all]")
    page.click("#settings-form button[type=submit]")
    sync_api.expect(page.locator("#status")).to_have_text("Settings applied")
    options = httpx.get(url + "/sdapi/v1/options").json()
    assert options["CLIP_stop_at_last_layers"] == 2
    assert options["s_min_uncond"] == 1.5 and options["s_min_uncond_all"] is True and options["skip_early_cond"] == 0
    httpx.post(url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1, "s_min_uncond": 0,
                                                "s_min_uncond_all": False})


def test_img2img_tab_sends_the_init_image(page, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    page.click("[data-tab=img2img]")
    page.set_input_files("#init-file", str(init))
    sync_api.expect(page.locator("#init-preview")).to_be_visible()
    page.fill("#prompt", "a red square")
    page.fill("#denoising_strength", "0.5")
    small_settings(page, steps=4)
    page.click("#generate")
    wait_done(page)
    assert "Denoising strength: 0.5" in page.inner_text("#infotext")
