"""Checkpoint load time and peak RSS: sdstudio vs diffusers `from_single_file` (local config, no hub), one run.

Each loader runs in a fresh child process after the file was read once (page cache warm for everyone). sdstudio maps
the file and assigns tensors without copying, so its plain load is nearly free; "load + touch" also reads every weight
once (what the first generation pays), to compare honestly.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import diffusers_config_dir, full_checkpoint, machine, run_child, warm_page_cache, write_section  # noqa: E402

OURS = """
import json, resource, sys, time, torch
from sdstudio.models.checkpoint import load_checkpoint
start = time.perf_counter()
model = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
loaded = time.perf_counter() - start
with torch.no_grad():
    for module in [model.unet, model.vae] + [e.model for e in model.text_encoders]:
        for p in module.parameters():
            p.detach().reshape(-1)[::512].sum()   # reads every 4 KiB page of the weight
touched = time.perf_counter() - start
print(json.dumps({"load": loaded, "touch": touched, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
DIFFUSERS = """
import json, resource, sys, time, torch
from diffusers import StableDiffusionPipeline
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[3], local_files_only=True,
    tokenizer=None, safety_checker=None, feature_extractor=None, torch_dtype=getattr(torch, sys.argv[2]))
loaded = time.perf_counter() - start
print(json.dumps({"load": loaded, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    rows = ["| file | loader | load s | load + touch s | peak RSS GiB | ratio to diffusers |",
            "|---|---|---|---|---|---|"]
    for variant, dtype in (("pruned", "float32"), ("fp16", "float16"), ("fp16", "bfloat16")):
        path = full_checkpoint("sd1", variant)
        config = diffusers_config_dir(full_checkpoint("sd1", "fp16"))
        warm_page_cache(path)
        ours = run_child(OURS, str(path), dtype)
        theirs = run_child(DIFFUSERS, str(path), dtype, str(config))
        size = f"SD1.5 {variant} ({path.stat().st_size / 2**30:.1f} GiB) as {dtype}"
        rows.append(f"| {size} | sdstudio | {ours['load']:.2f} | {ours['touch']:.2f} | {ours['rss'] / 2**20:.2f} "
                    f"| {ours['load'] / theirs['load']:.2f}× (touch {ours['touch'] / theirs['load']:.2f}×) |")
        rows.append(f"| {size} | diffusers from_single_file | {theirs['load']:.2f} | – | {theirs['rss'] / 2**20:.2f} "
                    f"| 1.00× |")
    table = "\n".join(rows)
    print(table)
    write_section("Checkpoint load (bench/load.py)", f"{machine()}\n\nCommand: `make bench` or "
                  f"`.venv/bin/python bench/load.py`. Page cache warm for both; loaded in the file's dtype, and the fp16 file also in bf16 (`--precision auto` on this CPU). Shared 2-core "
                  f"machine: figures may be noisy.\n\n{table}")


if __name__ == "__main__":
    main()
