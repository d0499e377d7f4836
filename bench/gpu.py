"""SD1.5 512² and SDXL 1024² on a CUDA GPU: sdstudio (`--device cuda`, `--precision auto` = fp16, and fp32 for the
quality guard) vs diffusers fp16 (its CUDA defaults: SDPA attention), one run, each engine in a fresh process,
iterations per second side by side.

On a machine where torch sees no CUDA GPU it says so and measures nothing (RESULTS.md is left as it is).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_DIR, diffusers_config_dir, failed_row, full_checkpoint, machine, psnr,  # noqa: E402
                    run_runner, write_section)

STEPS = 20


def rows_for(family: str, size: int, images: Path) -> list[str]:
    """The table rows of one model: diffusers fp16 and sdstudio auto on the GPU, and the quality guard: sdstudio's
    fp16 image against its fp32 one (same seed and noise). No PSNR between the engines: their first noise comes from
    different generators (A1111's GPU RNG vs diffusers' CPU generator) and their Euler schedules differ."""
    path = full_checkpoint(family, "fp16")
    common = {"path": str(path), "steps": STEPS, "size": size, "decode_sizes": [], "device": "cuda"}
    theirs = run_runner("diffusers", **common, config=str(diffusers_config_dir(path)), mode="fp16",
                        xl=family == "sdxl", image=None)
    ours = run_runner("sdstudio", **common, precision="auto", image=str(images / f"{family}-fp16.png"))
    reference = run_runner("sdstudio", **common, precision="fp32", image=str(images / f"{family}-fp32.png"))
    label = f"{'SDXL' if family == 'sdxl' else 'SD1.5'} {size}²"
    rows = []
    for name, r in (("diffusers fp16 (SDPA)", theirs), ("sdstudio --device cuda --precision auto", ours),
                    ("sdstudio --device cuda --precision fp32", reference)):
        if "error" in r:
            rows.append(failed_row([label, name], r["error"], 7))
            continue
        speedup = f"{theirs['step_s'] / r['step_s']:.2f}×" if "error" not in theirs else "–"
        rows.append(f"| {label} | {name} | {r['load_s']:.2f} | {1 / r['step_s']:.2f} | {speedup} | "
                    f"{r['e2e_s']:.2f} | {r['first_step_s']:.2f} |")
    pair = [images / f"{family}-{precision}.png" for precision in ("fp16", "fp32")]
    if all(p.exists() for p in pair):
        from PIL import Image

        rows.append(f"| {label} | quality guard: PSNR of sdstudio's fp16 image vs its fp32 one | "
                    f"{psnr(Image.open(pair[0]), Image.open(pair[1])):.1f} dB | | | | |")
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        print("bench/gpu.py: torch sees no CUDA GPU here; nothing measured")
        return
    images = BENCH_DIR / "images-gpu"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["| model | engine | load s | it/s (CFG) | vs diffusers | 20-step image s | first step s |",
            "|---|---|---|---|---|---|---|"]
    rows += rows_for("sd1", 512, images) + rows_for("sdxl", 1024, images)
    table = "\n".join(rows)
    print(table)
    write_section("GPU (bench/gpu.py)",
                  f"{machine()}, GPU {torch.cuda.get_device_name(0)}\n\nCommand: `make bench` or "
                  "`.venv/bin/python bench/gpu.py`. Same full-size random-weight fp16 files as the CPU tables; "
                  f"Euler, CFG 7, batch 1, seed 1, {STEPS} steps; it/s = 1 / median step interval after the first "
                  "(each step synchronised); load s ends with the model on the GPU; each engine in a fresh "
                  "process.\n\n" + table, per_cpu=False)


if __name__ == "__main__":
    main()
