"""Shared helpers for the benchmarks: full-size synthetic files, a local diffusers config, child processes."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

BENCH_DIR = Path(os.environ.get("SDSTUDIO_BENCH_DIR", "/tmp/sdstudio-bench"))
RESULTS = Path(__file__).parent / "RESULTS.md"


def full_sd15(variant: str = "pruned") -> Path:
    """A full-size random-weight SD1.5 in the real single-file layout (written once, then reused)."""
    from sdstudio import synthetic

    path = BENCH_DIR / f"sd15-full-{variant}.safetensors"
    if not path.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        synthetic.write_checkpoint(path, "sd1", "full", variant)
    return path


def warm_page_cache(path: Path) -> None:
    """Read the file once so every loader starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def diffusers_config_dir(checkpoint: Path) -> Path:
    """A local diffusers pipeline folder (configs only, no weights, no tokenizer files) for from_single_file."""
    from diffusers import PNDMScheduler

    from sdstudio.models.checkpoint import load_checkpoint

    folder = BENCH_DIR / "sd15-diffusers-config"
    if (folder / "model_index.json").exists():
        return folder
    model = load_checkpoint(checkpoint)
    model.unet.save_config(folder / "unet")
    model.vae.save_config(folder / "vae")
    model.text_encoders[0].model.config.save_pretrained(folder / "text_encoder")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  steps_offset=1).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}))
    return folder


def run_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python process (argv = args); it prints one JSON line, which is returned."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none)."""
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def native_bf16() -> bool:
    """True when `--precision auto` picks bf16 here (native bf16 math), so a bf16 run is worth timing."""
    from sdstudio.models.checkpoint import fast_cpu_dtype

    return fast_cpu_dtype() == torch.bfloat16


def machine() -> str:
    """One line: CPU model, native bf16 support, cores, torch version, date, commit."""
    cpuinfo_text = cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo_text.splitlines()
                  if line.startswith("model name")),
                 platform.processor())
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f in cpuinfo_text]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return (f"{model} ({', '.join(flags) or 'no avx512'}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{date.today().isoformat()}, commit {commit}")


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of bench/RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    sections = text.split("\n## ")
    kept = [s for s in sections[1:] if not s.startswith(title + "\n")]
    RESULTS.write_text("\n## ".join([sections[0].rstrip() + "\n"] + kept + [f"{title}\n\n{body.strip()}\n"]))
