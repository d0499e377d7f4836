"""The `sdstudio` command line, run as a real subprocess on a data dir in A1111's layout."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdstudio.files.writers import save_safetensors

SDSTUDIO = [sys.executable, "-m", "sdstudio.cli"]


def run(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*SDSTUDIO, *args, "--data-dir", str(data_dir)], capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sd1_file):
    root = tmp_path_factory.mktemp("data")
    models = root / "models" / "Stable-diffusion" / "sub"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    save_safetensors({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
                      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)},
                     root / "models" / "Stable-diffusion" / "misplaced-lora.safetensors")
    return root


def test_models_table(data_dir):
    out = run("models", data_dir=data_dir).stdout
    header, *rows = out.strip().splitlines()
    assert header.split() == ["name", "family", "prediction", "hash", "size", "dtype"]
    tiny = next(r for r in rows if r.startswith("sub/tiny.safetensors"))
    assert tiny.split()[1:3] == ["SD1", "eps"] and tiny.split()[-1] == "float32"
    assert len(tiny.split()[3]) == 10  # AutoV2 hash
    wrong = next(r for r in rows if r.startswith("misplaced-lora"))
    assert "this looks like a LoRA" in wrong and "models/Lora" in wrong


def test_models_lists_lora_metadata(data_dir):
    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
                      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)},
                     lora_dir / "inkpen.safetensors",
                     metadata={"ss_output_name": "ink", "ss_base_model_version": "sd_v1", "ss_network_dim": "4",
                               "ss_network_alpha": "2", "ss_tag_frequency": '{"a": {"ink": 3, "pen": 1}}'})
    (lora_dir / "inkpen.json").write_text('{"activation text": "ink drawing", "preferred weight": 0.7}')
    out = run("models", data_dir=data_dir).stdout
    line = next(r for r in out.splitlines() if "inkpen.safetensors" in r)
    assert line.split() == ["inkpen.safetensors", "alias", "ink", "SD1", "dim", "4/alpha", "2", "triggers:", "ink,",
                            "pen", "activation:", "ink", "drawing"]


def test_synth_writes_a_loadable_file(tmp_path):
    out = tmp_path / "x.ckpt"
    result = subprocess.run([*SDSTUDIO, "synth", str(out), "--family", "sd2-v"], capture_output=True, text=True)
    assert result.returncode == 0 and out.stat().st_size > 0
    from sdstudio.files.detect import inspect_checkpoint

    info = inspect_checkpoint(out)
    assert (info.family, info.prediction) == ("sd2", "v")


def test_txt2img_pnginfo_and_regenerate_from_png(data_dir):
    out = run("txt2img", "a lighthouse, (storm:1.2)", "-n", "blurry", "--steps", "3", "-W", "64", "-H", "64",
              "--seed", "1234", "--sampler", "Euler a", "-q", data_dir=data_dir).stdout.strip()
    first = Path(out)
    assert first.name == "00000-1234.png" and first.parent.parent.name == "txt2img-images"
    info = run("pnginfo", str(first), data_dir=data_dir).stdout
    assert info.startswith("a lighthouse, (storm:1.2)\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
    again = Path(run("txt2img", "--from-png", str(first), "-q", data_dir=data_dir).stdout.strip())
    assert again.name == "00001-1234.png"
    assert again.read_bytes() == first.read_bytes()


def test_img2img_and_unreadable_init_image(data_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (80, 60), (10, 200, 30)).save(tmp_path / "init.png")
    out = run("img2img", "grass", "--init", str(tmp_path / "init.png"), "--steps", "4", "-W", "64", "-H", "64",
              "--denoising-strength", "0.5", "-q", data_dir=data_dir).stdout.strip()
    assert "img2img-images" in out and Path(out).is_file()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = run("img2img", "x", "--init", str(tmp_path / "broken.png"), data_dir=data_dir, check=False)
    assert bad.returncode == 1 and "broken.png: cannot read the init image" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_errors_are_one_line(data_dir):
    bad = run("txt2img", "x", "--sampler", "Nope", "--steps", "2", "-W", "64", "-H", "64", data_dir=data_dir,
              check=False)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "unknown sampler 'Nope'" in bad.stderr
    missing = run("txt2img", "x", "--ckpt", "nonexistent", data_dir=data_dir, check=False)
    assert missing.returncode == 1 and "nonexistent" in missing.stderr and "Traceback" not in missing.stderr
    device = run("txt2img", "x", "--device", "tpu", data_dir=data_dir, check=False)
    assert device.returncode == 1 and "--device 'tpu'" in device.stderr and "Traceback" not in device.stderr


def test_device_cpu_runs_on_the_cpu(data_dir):
    out = run("txt2img", "a boat", "--steps", "1", "-W", "64", "-H", "64", "--device", "cpu", "--no-save",
              data_dir=data_dir).stdout
    assert "Steps: 1," in out


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_jpeg_and_webp_outputs_carry_the_infotext(data_dir, fmt):
    out = Path(run("txt2img", "a boat", "--steps", "1", "-W", "64", "-H", "64", "--seed", "9", "--format", fmt, "-q",
                   data_dir=data_dir).stdout.strip())
    assert out.suffix == "." + fmt
    assert run("pnginfo", str(out), data_dir=data_dir).stdout.startswith("a boat\nSteps: 1,")


def test_negative_prompt_skipping_flags_reach_the_infotext(data_dir):
    out = run("txt2img", "a boat", "-n", "fog", "--steps", "2", "-W", "64", "-H", "64", "--ngms", "100",
              "--ngms-all-steps", "--no-save", data_dir=data_dir).stdout
    assert "NGMS: 100, NGMS all steps: True" in out


def test_tokens(data_dir):
    assert run("tokens", "a cat", data_dir=data_dir).stdout.strip() == "2/75"


def test_ctrl_c_stops_cleanly_without_partial_files(data_dir):
    outputs = data_dir / "outputs"
    before = set(outputs.rglob("*")) if outputs.exists() else set()
    # a shell starting a job in the background hands it SIGINT ignored, and Python keeps that: a terminal's Ctrl-C
    # reaches a program with the default disposition, so the child gets that
    process = subprocess.Popen([*SDSTUDIO, "txt2img", "x", "--steps", "400", "-W", "64", "-H", "64",
                                "--data-dir", str(data_dir)], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and not re.search(r" [1-9]\d*/400 ", seen):   # wait until sampling is under way
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, seen + err
    after = set(outputs.rglob("*")) if outputs.exists() else set()
    assert {p for p in after - before if p.is_file()} == set()


def test_styles_from_styles_csv(data_dir):
    (data_dir / "styles.csv").write_text('name,prompt,negative_prompt\nnoir,"{prompt}, film noir",lowres\n')
    out = run("txt2img", "a street", "--style", "noir", "--steps", "1", "-W", "64", "-H", "64", "--no-save", "-q",
              data_dir=data_dir).stdout
    assert out.startswith("a street, film noir\nNegative prompt: lowres\n")
    bad = run("txt2img", "x", "--style", "nope", data_dir=data_dir, check=False)
    assert bad.returncode == 1 and "no style named 'nope'; available: noir" in bad.stderr


def test_converted_weights_are_kept_for_the_next_run_and_give_the_same_image(tmp_path, sd1_file):
    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")       # an fp32 file: bf16 converts it
    args = ("txt2img", "a cat", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5", "--precision", "bf16", "-q")
    first = Path(run(*args, data_dir=tmp_path).stdout.strip())
    (kept,) = (tmp_path / "cache" / "converted").glob("*.safetensors")
    second = Path(run(*args, data_dir=tmp_path).stdout.strip())      # maps the kept weights
    assert second != first and second.read_bytes() == first.read_bytes()
    off = tmp_path / "off"
    (off / "models").mkdir(parents=True)
    os.symlink(models, off / "models" / "Stable-diffusion")
    run(*args, "--converted-cache-gb", "0", data_dir=off)
    assert not (off / "cache" / "converted").exists() and kept.exists()


def test_default_precision_is_int8_on_the_cpu_float_leaves_it_out_and_each_gives_the_same_image_again(tmp_path,
                                                                                                       sd1_file):
    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    os.link(sd1_file, models / "tiny.safetensors")
    args = ("txt2img", "a cat", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5", "-q")
    auto, int8, floating = (Path(run(*args, *p, data_dir=tmp_path).stdout.strip())
                            for p in ((), ("--precision", "int8"), ("--precision", "float")))
    assert auto.read_bytes() == int8.read_bytes() != floating.read_bytes()   # the second int8 run: kept calibration


def test_lora_tags_and_embeddings_apply_as_in_the_server(data_dir, tmp_path):
    """`<lora:…>` in the prompt and an embedding's name work from the CLI too (infotext hashes, a changed image), and
    the model's sha256 is kept in the hash cache for the next run."""
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    (data_dir / "models" / "Lora").mkdir(exist_ok=True)
    save_safetensors({f"{key}.lora_down.weight": torch.randn(4, 32, generator=g),
                      f"{key}.lora_up.weight": torch.randn(32, 4, generator=g)},
                     data_dir / "models" / "Lora" / "ink.safetensors")
    (data_dir / "embeddings").mkdir(exist_ok=True)
    save_safetensors({"emb_params": torch.randn(2, 64, generator=g)}, data_dir / "embeddings" / "shiny.safetensors")
    common = ["--steps", "2", "-W", "64", "-H", "64", "--seed", "4", "-q"]
    images = {}
    for name, prompt in (("plain", "a cat"), ("lora", "a cat <lora:ink:1>"), ("embedding", "a shiny cat")):
        out = Path(run("txt2img", prompt, *common, data_dir=data_dir).stdout.strip())
        images[name] = Image.open(out).tobytes()
        info = run("pnginfo", str(out), data_dir=data_dir).stdout
        assert "ignored" not in info
        assert ('Lora hashes: "ink: ' in info) == (name == "lora")
        assert ('TI hashes: "shiny: ' in info) == (name == "embedding")
    assert images["lora"] != images["plain"]   # the tag is not just written down: the weights changed
    assert "sha256" in (data_dir / "cache" / "sdstudio-hashes.json").read_text()
