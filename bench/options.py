"""A1111's speed options on a full-size synthetic SD1.5 (sdstudio --precision float, one process): Token merging
ratio, Negative Guidance minimum sigma (NGMS) and Skip Early CFG. Each trades image fidelity for time, so each row
also gives the PSNR of its image against the plain one (same seed). On random weights that PSNR says how far the
latents moved, not how a real model's picture looks."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import full_checkpoint, machine, run_runner, warm_page_cache, write_section  # noqa: E402

STEPS, SIZE, STEP_SIZE = 20, 512, 1024
OPTIONS = {
    "plain": {},
    "Token merging ratio 0.3": {"token_merging_ratio": 0.3},
    "Token merging ratio 0.5": {"token_merging_ratio": 0.5},
    "NGMS 2": {"s_min_uncond": 2.0},
    "NGMS 2, all steps": {"s_min_uncond": 2.0, "s_min_uncond_all": True},
    "Skip Early CFG 0.2": {"skip_early_cond": 0.2},
    "Token merging 0.5 + NGMS 2": {"token_merging_ratio": 0.5, "s_min_uncond": 2.0},
}
STEP_OPTIONS = ["plain", "Token merging ratio 0.5"]


def main() -> None:
    checkpoint = full_checkpoint("sd1", "fp16")
    warm_page_cache(checkpoint)
    results = run_runner("sdstudio_options", path=str(checkpoint), precision="float", steps=STEPS, size=SIZE,
                         options=OPTIONS, step_size=STEP_SIZE, step_options=STEP_OPTIONS)
    if "error" in results:
        raise SystemExit(f"sdstudio_options failed: {results['error']}")
    plain = results["plain"]["e2e_s"]
    rows = [f"| option (A1111 name) | {STEPS}-step {SIZE}² image s | vs plain | mean step s | "
            f"s / step at {STEP_SIZE}² | PSNR vs plain dB |", "|---" * 6 + "|"]
    for name, r in results.items():
        step = r.get(f"step_{STEP_SIZE}_s")
        psnr = "–" if name.startswith("plain") else "identical" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f}"
        rows.append(f"| {name} | {r['e2e_s']:.1f} | {plain / r['e2e_s']:.2f}× | {r['mean_step_s']:.2f} | "
                    f"{'–' if step is None else f'{step:.2f}'} | {psnr} |")
    body = (f"{machine()}\n\nCommand: `.venv/bin/python bench/options.py` (runner `sdstudio_options`). Full-size "
            f"random-weight fp16 SD1.5, `--precision float`, Euler, CFG 7, seed 1; one process, every option once "
            f"(after a small warm-up run of each), the plain run again last. Ratios > 1 = faster.\n\n"
            + "\n".join(rows))
    print(body)
    write_section("A1111 speed options (bench/options.py)", body)


if __name__ == "__main__":
    main()
