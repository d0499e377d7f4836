"""Does torch.compile pay on sdstudio's fast path? One CFG UNet call, eager vs compiled, in fresh processes.

The first process compiles with an empty inductor cache (what a first run pays), the second with the cache the
first left (what a restart pays: the issue asks for a compile cache that survives restarts); each then times the
eager and the compiled UNet alternating, so their ratio holds on this VM's noise.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_DIR, failed_row, full_checkpoint, machine, run_runner, warm_page_cache,  # noqa: E402
                    write_section)

CALLS = 3


def main() -> None:
    path = full_checkpoint("sd1", "fp16")
    warm_page_cache(path)
    rows = ["| process | compile (first call) s | eager call s | compiled call s | speed-up | max difference |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as cache:
        for name in ("first (empty inductor cache)", "restart (the first one's cache)"):
            r = run_runner("sdstudio_compiled", env={"TORCHINDUCTOR_CACHE_DIR": cache}, path=str(path), calls=CALLS)
            if "error" in r:
                rows.append(failed_row([name], r["error"], 6))
                continue
            rows.append(f"| {name} | {r['compile_s']:.1f} | {r['eager_s']:.2f} | {r['compiled_s']:.2f} | "
                        f"{r['eager_s'] / r['compiled_s']:.3f}× | {r['max_difference']:.2e} |")
    table = "\n".join(rows)
    print(table)
    write_section("torch.compile on the fast path (bench/compile.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/compile.py`. Full-size SD1.5 "
                  "fp16 file in bf16 (`--precision float`), one CFG UNet call (batch 2, 64×64 latents); torch.compile "
                  "in inductor's default mode (weights stay inputs: LoRA patches in place still count), sdstudio's "
                  "own kernels (Winograd, attention, fused GEGLU) eager inside it; eager and compiled calls "
                  f"alternating, median of {CALLS} each; each row a fresh process sharing one inductor cache "
                  f"folder.\n\n{table}")


if __name__ == "__main__":
    main()
