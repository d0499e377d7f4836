"""Shared helpers for the benchmarks: full-size synthetic files, a local diffusers config, child processes."""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import torch

BENCH_DIR = Path(os.environ.get("SDSTUDIO_BENCH_DIR", "/tmp/sdstudio-bench"))
RESULTS = Path(__file__).parent / "RESULTS.md"
RUNNERS = Path(__file__).parent / "runners.py"


def in_child(fn, *args):
    """fn(*args) in a fresh process: building or loading a full-size model there keeps this process small (its freed
    heap stays mapped here, and the runners after it need the RAM: SDXL fp32 peaks near 20 GiB)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of fn(*args, **kwargs)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def full_checkpoint(family: str = "sd1", variant: str = "pruned", outlier_channels: bool = False,
                    suffix: str = ".safetensors") -> Path:
    """A full-size random-weight checkpoint (sd1 = SD1.5, sdxl = SDXL base) in the real single-file layout (with
    `outlier_channels`: the same function through activations with outlier channels, synthetic.py; `suffix` .ckpt: a
    torch-zip pickle), written once under BENCH_DIR (in a child process), then reused."""
    from sdstudio import synthetic

    name = {"sd1": "sd15", "sdxl": "sdxl"}[family]
    path = BENCH_DIR / f"{name}-full-{variant}{'-outliers' if outlier_channels else ''}{suffix}"
    if not path.exists():
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        in_child(synthetic.write_checkpoint, path, family, "full", variant, None, 0, outlier_channels)
    return path


def psnr(a, b) -> float:
    """PSNR in dB between two images of the same size: 8-bit PIL images, or tensors with values in [0, 1]; inf when
    identical."""
    import numpy as np

    x, y = (image.double().numpy() * 255 if isinstance(image, torch.Tensor)
            else np.asarray(image.convert("RGB"), dtype=np.float64) for image in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def warm_page_cache(path: Path) -> None:
    """Read the file once so every loader starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def diffusers_config_dir(checkpoint: Path) -> Path:
    """A local diffusers pipeline folder (configs only, no weights, no tokenizer files) for `from_single_file`,
    made (in a child process) from our own loaded modules (diffusers/transformers classes) of the same file."""
    folder = BENCH_DIR / f"{checkpoint.stem}-diffusers-config"
    if not (folder / "model_index.json").exists():
        in_child(_write_diffusers_config, checkpoint, folder)
    return folder


def _write_diffusers_config(checkpoint: Path, folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    from sdstudio.models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, dtype="fp16")
    xl = model.info.family == "sdxl"
    model.unet.save_config(folder / "unet")
    model.vae.save_config(folder / "vae")
    encoders = {"text_encoder": ["transformers", "CLIPTextModel"]}
    if xl:
        encoders["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    for name, encoder in zip(encoders, model.text_encoders):
        encoder.model.config.save_pretrained(folder / name)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1, timestep_spacing="leading").save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "tokenizer": [None, None], **encoders}
    if xl:
        index.update({"tokenizer_2": [None, None], "image_encoder": [None, None],
                      "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                      "requires_safety_checker": False})
    (folder / "model_index.json").write_text(json.dumps(index))


def run_runner(name: str, env: dict[str, str] | None = None, **kwargs) -> dict:
    """One engine in a fresh process (with `env` added to its environment); a failure becomes {"error": last line of
    its stderr} (the row says why)."""
    out = subprocess.run([sys.executable, str(RUNNERS), name, json.dumps(kwargs)], capture_output=True, text=True,
                         check=False, env=os.environ | (env or {}))
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:200] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def failed_row(cells: list[str], error: str, columns: int) -> str:
    """A table row of `columns` cells for a runner that failed: its leading `cells`, then why, then blanks."""
    return "| " + " | ".join(cells + [f"failed: {error}"]) + " |" + " |" * (columns - len(cells) - 1)


def cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none)."""
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def machine() -> str:
    """One line: CPU model, native bf16 support, cores, torch version, date, commit."""
    cpuinfo_text = cpuinfo()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo_text.splitlines()
                  if line.startswith("model name")),
                 platform.processor())
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f in cpuinfo_text]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown (no git checkout)"
    except FileNotFoundError:   # a machine without git (a GPU machine given a copy of the tree)
        commit = "unknown (no git)"
    return (f"{model} ({', '.join(flags) or 'no avx512'}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{date.today().isoformat()}, commit {commit}")


def cpu_kind() -> str:
    """The kind of CPU whose fast path a benchmark measures: AMX, AVX512-BF16 (native bf16 math), AVX-512 or AVX2
    (the fast fp32 path)."""
    flags = cpuinfo().split()
    kinds = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
    return next((kind for flag, kind in kinds if flag in flags), "older")


def openvino_precision() -> str:
    """The OpenVINO peer's inference precision on this CPU: bf16 where it has native bf16 math, else f32 (its best
    there)."""
    from sdstudio.models.tuning import native_bf16

    return "bf16" if native_bf16() else "f32"


def write_section(title: str, body: str, per_cpu: bool = True) -> None:
    """Replace the `## title` section of bench/RESULTS.md where it stands, or append it; `per_cpu`: one such section
    per kind of CPU (title " — <cpu_kind> CPU"), so a run on another kind of machine keeps the others' figures."""
    title += f" — {cpu_kind()} CPU" if per_cpu else ""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    head, *sections = text.split("\n## ")
    section = f"{title}\n\n{body.strip()}\n"
    place = next((i for i, s in enumerate(sections) if s.startswith(title + "\n")), len(sections))
    sections[place:place + 1] = [section]
    RESULTS.write_text("\n## ".join([head.rstrip() + "\n"] + [s.rstrip() + "\n" for s in sections]))
