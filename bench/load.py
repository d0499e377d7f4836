"""Checkpoint load time and peak RSS: sdstudio vs diffusers `from_single_file` (local config, no hub), one run.

Each loader runs in a fresh child process right after the file was read once (page cache warm for everyone). A
loader that maps the file instead of copying it (sdstudio does; diffusers does too when no dtype change is asked for)
looks nearly free, so "load + touch" also reads every weight once (what the first generation pays): compare those.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import diffusers_config_dir, full_checkpoint, machine, run_child, warm_page_cache, write_section  # noqa: E402

# shared by both children: the child's own peak RSS (VmHWM of its address space; ru_maxrss would also count the
# parent's pages from before exec), and reading one value per 4 KiB page of every weight (what the first generation
# pays when a loader maps the file instead of copying it)
HELPERS = """
import json, sys, time, torch
def peak_rss_kib():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
def touch(modules):
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.detach().reshape(-1)[::512].sum()
"""
OURS = HELPERS + """
from sdstudio.models.checkpoint import load_checkpoint
start = time.perf_counter()
model = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
loaded = time.perf_counter() - start
touch([model.unet, model.vae] + [e.model for e in model.text_encoders])
print(json.dumps({"load": loaded, "touch": time.perf_counter() - start, "rss": peak_rss_kib()}))
"""
DIFFUSERS = HELPERS + """
from diffusers import StableDiffusionPipeline
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[3], local_files_only=True,
    tokenizer=None, safety_checker=None, feature_extractor=None, torch_dtype=getattr(torch, sys.argv[2]))
loaded = time.perf_counter() - start
touch([pipe.unet, pipe.vae, pipe.text_encoder])
print(json.dumps({"load": loaded, "touch": time.perf_counter() - start, "rss": peak_rss_kib()}))
"""


def main() -> None:
    rows = ["| file | loader | load s | load + touch s | peak RSS GiB | ratio to diffusers |",
            "|---|---|---|---|---|---|"]
    for variant, dtype in (("pruned", "float32"), ("fp16", "float16"), ("fp16", "bfloat16")):
        path = full_checkpoint("sd1", variant)
        config = diffusers_config_dir(full_checkpoint("sd1", "fp16"))
        warm_page_cache(path)
        ours = run_child(OURS, str(path), dtype)
        warm_page_cache(path)
        theirs = run_child(DIFFUSERS, str(path), dtype, str(config))
        size = f"SD1.5 {variant} ({path.stat().st_size / 2**30:.1f} GiB) as {dtype}"
        for name, r in (("sdstudio", ours), ("diffusers from_single_file", theirs)):
            rows.append(f"| {size} | {name} | {r['load']:.2f} | {r['touch']:.2f} | {r['rss'] / 2**20:.2f} | "
                        f"{r['load'] / theirs['load']:.2f}× (touch {r['touch'] / theirs['touch']:.2f}×) |")
    table = "\n".join(rows)
    print(table)
    write_section("Checkpoint load (bench/load.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/load.py`. Page cache warm for "
                  "both; loaded in the file's dtype, and the fp16 file also in bf16 (`--precision auto` on this CPU); "
                  f"ratios to diffusers' own load and load + touch; peak RSS = the child's VmHWM.\n\n{table}")


if __name__ == "__main__":
    main()
