"""Seconds per sampling step, SD1.5 512×512 with CFG (batch 1): sdstudio vs diffusers StableDiffusionPipeline in
fp32 with the same weights, in one run; plus sdstudio bf16 (`--precision auto` on CPUs with native bf16) and the
VAE decode of one 512² image. Each measurement runs in a fresh child process."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (diffusers_config_dir, full_sd15, machine, native_bf16, run_child, warm_page_cache,
                    write_section)  # noqa: E402

STEPS = 4  # the first step is a warm-up; the median of the rest is reported
ROUNDS = 2  # fp32 runs of each side, alternated; the best of each is reported

OURS = """
import json, statistics, sys, time, torch
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models import vae as vae_ops
from sdstudio.pipeline import txt2img
model = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
marks = []
txt2img(model, prompt="a lighthouse on a cliff", negative_prompt="blurry", steps=int(sys.argv[3]), width=512,
        height=512, sampler_name="Euler", cfg_scale=7, seed=1, save=False,
        callback=lambda info: marks.append(time.perf_counter()))
steps = [b - a for a, b in zip(marks, marks[1:])]
start = time.perf_counter()
vae_ops.decode(model.vae, torch.randn(1, 4, 64, 64))
print(json.dumps({"step": statistics.median(steps), "decode": time.perf_counter() - start}))
"""
DIFFUSERS = """
import json, statistics, sys, time, torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[2], local_files_only=True,
    tokenizer=None, safety_checker=None, feature_extractor=None, torch_dtype=torch.float32)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
ids = torch.tensor([[49406] + [320, 7086] + [49407] * 74])
with torch.no_grad():
    cond = pipe.text_encoder(ids)[0]
    uncond = pipe.text_encoder(torch.tensor([[49406] + [49407] * 76]))[0]
marks = []
def on_step(pipe, i, t, kwargs):
    marks.append(time.perf_counter())
    return kwargs
pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=int(sys.argv[3]), guidance_scale=7,
     height=512, width=512, output_type="latent", callback_on_step_end=on_step,
     generator=torch.Generator().manual_seed(1))
steps = [b - a for a, b in zip(marks, marks[1:])]
start = time.perf_counter()
with torch.no_grad():
    pipe.vae.decode(torch.randn(1, 4, 64, 64) / pipe.vae.config.scaling_factor)
print(json.dumps({"step": statistics.median(steps), "decode": time.perf_counter() - start}))
"""


def main() -> None:
    path = full_sd15("pruned")
    config = diffusers_config_dir(path)
    warm_page_cache(path)
    steps = str(STEPS)
    # alternate the fp32 runs and keep each side's best, so drift of the shared machine does not pick a winner
    runs: dict[str, list[dict]] = {"diffusers fp32": [], "sdstudio fp32": []}
    for _ in range(ROUNDS):
        runs["diffusers fp32"].append(run_child(DIFFUSERS, str(path), str(config), steps))
        runs["sdstudio fp32"].append(run_child(OURS, str(path), "fp32", steps))
    best = {name: min(results, key=lambda r: r["step"]) for name, results in runs.items()}
    diffusers = best["diffusers fp32"]
    results = [("diffusers fp32", diffusers), ("sdstudio fp32", best["sdstudio fp32"])]
    if native_bf16():
        results.append(("sdstudio bf16 (--precision auto here)", run_child(OURS, str(path), "bf16", steps)))
    rows = ["| run | s / step (CFG, 512²) | speed vs diffusers fp32 | VAE decode 512² s |", "|---|---|---|---|"]
    for name, r in results:
        rows.append(f"| {name} | {r['step']:.2f} | {diffusers['step'] / r['step']:.2f}× | {r['decode']:.2f} |")
    table = "\n".join(rows)
    print(table)
    write_section("Generation speed (bench/generate.py)", f"{machine()}\n\nCommand: `make bench` or "
                  f"`.venv/bin/python bench/generate.py`. Euler, CFG 7, batch 1, median of {STEPS - 1} steps after "
                  f"a warm-up step; fp32 runs alternated {ROUNDS}× and the best of each kept. Shared 2-core machine: "
                  f"figures may be noisy.\n\n{table}")


if __name__ == "__main__":
    main()
