"""Checkpoint load time and peak RSS: sdstudio vs diffusers `from_single_file` (local config, no hub), one run.

Each loader runs in a fresh child process right after the file was read once (page cache warm for everyone). A
loader that maps the file instead of copying it (sdstudio does; diffusers does too when no dtype change is asked for)
looks nearly free, so "load + touch" also reads every weight once (what the first generation pays): compare those.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_DIR, diffusers_config_dir, failed_row, full_checkpoint, machine, run_runner,  # noqa: E402
                    warm_page_cache, write_section)

ROUNDS = 3


def main() -> None:
    rows = ["| file | loader | load s | load + touch s | peak RSS GiB | ratio to diffusers |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as converted:
        for variant, dtype, suffix in (("pruned", "float32", ".safetensors"), ("fp16", "float16", ".safetensors"),
                                       ("fp16", "float32", ".safetensors"), ("fp16", "bfloat16", ".safetensors"),
                                       ("fp16", "bfloat16", ".ckpt")):
            path = full_checkpoint("sd1", variant, suffix=suffix)
            config = diffusers_config_dir(full_checkpoint("sd1", "fp16"))
            loaders = {"sdstudio": ("sdstudio_load", dict(path=str(path), dtype=dtype))}

            def kept(**options) -> tuple[str, dict]:
                """A loader through the `converted` folder, which a first load with these options fills here."""
                run_runner("sdstudio_load", path=str(path), dtype=dtype, converted=converted, **options)
                return "sdstudio_load", dict(path=str(path), dtype=dtype, converted=converted, **options)

            if variant == "fp16" and dtype == "float32":   # the fast paths without bf16: channels-last weights
                loaders["sdstudio fast fp32 (`--precision float` without native bf16)"] = (
                    "sdstudio_load", dict(path=str(path), dtype=dtype, fast_fp32=True))
                loaders["sdstudio --precision auto without native bf16 (int8 on the fast fp32 path)"] = (
                    "sdstudio_load", dict(path=str(path), dtype=dtype, fast_fp32=True, int8_linears=True))
                loaders["the same, converted weights kept by an earlier load"] = kept(fast_fp32=True,
                                                                                      int8_linears=True)
            if suffix == ".safetensors" and variant == "fp16" and dtype == "bfloat16":   # float's load: converted
                loaders["sdstudio, converted weights kept by an earlier load"] = kept()
                loaders["sdstudio --precision auto (its int8 layers keep the file's weights)"] = (
                    "sdstudio_load", dict(path=str(path), dtype=dtype, int8_linears=True))
                loaders["the same, converted weights (of the load above) kept by an earlier load"] = (
                    kept(int8_linears=True))
            loaders["diffusers from_single_file"] = (
                "diffusers_load", dict(path=str(path), config=str(config), dtype=dtype))
            results = _alternating(path, loaders)
            theirs = results["diffusers from_single_file"]
            size = f"SD1.5 {variant} {suffix} ({path.stat().st_size / 2**30:.1f} GiB) as {dtype}"
            for name, r in results.items():
                if "error" in r or "error" in theirs:
                    rows.append(failed_row([size, name], r.get("error", theirs.get("error")), 6))
                    continue
                rows.append(f"| {size} | {name} | {r['load_s']:.2f} | {r['touch_s']:.2f} | {r['rss_gib']:.2f} | "
                            f"{r['load_s'] / theirs['load_s']:.2f}× (touch {r['touch_s'] / theirs['touch_s']:.2f}×) |")
    table = "\n".join(rows)
    print(table)
    write_section("Checkpoint load (bench/load.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/load.py`. Page cache warm for "
                  "both; loaded in the file's dtype, and the fp16 file also in bf16 (`--precision float` and "
                  "`auto` on this CPU); "
                  "ratios to diffusers' own load and load + touch; each load in a fresh child process, the loaders "
                  f"in turn, {ROUNDS} rounds, the median of each (one load moves ±20 % from run to run on this VM); "
                  "peak RSS = the child's VmHWM. \"Converted weights kept\": a second process loading the same file "
                  "through the `cache/converted/` folder that a first one filled (models/converted.py; that file is in "
                  "the page cache like the source). \"--precision auto\": the UNet's int8 layers (transformer linears, "
                  "3×3 convolutions of 256 channels and more) keep the file's fp16 weights, packed to int8 in the "
                  "first generation, after one calibration call that waits for it too (models/int8.py: a later load "
                  "of the same file skips the call, its result kept with the converted weights). \"Fast fp32\": "
                  "what the fast paths load on a CPU without native bf16 math (the file's 16-bit linear weights "
                  "mapped as they are, its convolution weights copied channels-last in their dtype, the rest in fp32: "
                  f"models/half_weights.py).\n\n{table}")


def _alternating(path: Path, loaders: dict[str, tuple[str, dict]]) -> dict[str, dict]:
    """Each loader's figures, the median of ROUNDS fresh-process runs taken in turn (the page cache warm before
    each); a loader that failed once reports that failure."""
    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    for _ in range(ROUNDS):
        for name, (runner, arguments) in loaders.items():
            warm_page_cache(path)
            runs[name].append(run_runner(runner, **arguments))
    results = {}
    for name, figures in runs.items():
        failed = [r for r in figures if "error" in r]
        results[name] = failed[0] if failed else {key: statistics.median(r[key] for r in figures)
                                                  for key in ("load_s", "touch_s", "rss_gib")}
    return results


if __name__ == "__main__":
    main()
