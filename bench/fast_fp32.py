"""The fast fp32 path (`--precision float` on CPUs without native bf16 math: AVX2-only ones, most desktop CPUs) against
the exact fp32 path, on this CPU and (on a CPU with AVX-512) with the CPU limited to AVX2.

Each row is a fresh process with both models of the full-size SD1.5 fp16 file loaded (runners.sdstudio_fast_fp32):
CFG UNet calls and 512² decodes alternating between the two, so their ratio holds on this VM's noise. "AVX2 only"
runs the same process with oneDNN, MKL and ATen limited to AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS,
ATEN_CPU_CAPABILITY) and sdstudio's kernels built for Haswell (-march=haswell, in a kernel cache of its own): what
an AVX2 CPU's instructions can do on these cores, not a measurement on such a CPU (on an AVX2 CPU its own row is
that measurement, and the second row is left out).
"""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (BENCH_DIR, cpu_kind, failed_row, full_checkpoint, machine, run_runner,  # noqa: E402
                    warm_page_cache, write_section)

CALLS = 3
STEPS = 8
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def avx2_environment(folder: Path) -> dict[str, str]:
    """The variables of an AVX2-only run: the libraries' limits, and a compiler wrapper in `folder` building
    sdstudio's kernels for Haswell into a kernel cache there."""
    compiler = folder / "cc-haswell"
    compiler.write_text(f'#!/bin/sh\nexec {os.environ.get("CC", "cc")} "$@" -march=haswell -mtune=haswell\n')
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    return AVX2_ONLY | {"CC": str(compiler), "SDSTUDIO_KERNEL_CACHE": str(folder / "kernels")}


def main() -> None:
    path = full_checkpoint("sd1", "fp16")
    warm_page_cache(path)
    rows = ["| instructions | UNet call s exact / fast | speed-up | 512² decode s exact / fast | speed-up | "
            "UNet output difference | decode PSNR dB | image PSNR dB |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as folder:
        runs = [(f"this CPU's own ({cpu_kind()})", {}, STEPS)]
        if cpu_kind() != "AVX2":   # an AVX2 CPU's own row is the real thing
            runs.append(("AVX2 only", avx2_environment(Path(folder)), 0))
        for name, environment, steps in runs:
            r = run_runner("sdstudio_fast_fp32", env=environment, path=str(path), calls=CALLS, steps=steps)
            if "error" in r:
                rows.append(failed_row([name], r["error"], 8))
                continue
            image = f"{r['image_psnr']:.1f}" if "image_psnr" in r else "–"
            rows.append(f"| {name} | {r['exact_unet_s']:.2f} / {r['fast_unet_s']:.2f} | "
                        f"{r['exact_unet_s'] / r['fast_unet_s']:.2f}× | "
                        f"{r['exact_decode_s']:.2f} / {r['fast_decode_s']:.2f} | "
                        f"{r['exact_decode_s'] / r['fast_decode_s']:.2f}× | {r['unet_difference']:.1e} | "
                        f"{r['decode_psnr']:.1f} | {image} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    write_section("Fast fp32 path for CPUs without bf16 (bench/fast_fp32.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/fast_fp32.py`. Full-size SD1.5 "
                  "fp16 file loaded in fp32 twice in one process: the exact path (`--precision fp32`, torch's own "
                  "layers) and the fast one (`--precision float` where the CPU has no native bf16 math: channels-last "
                  "weights, F(4×4, 3×3) Winograd in fp32, the GEGLU as one product + the GELU · product kernel, "
                  "the fp32 flash-attention kernel, the attention processor's CFG saving: each where measured "
                  "faster); one CFG UNet call (batch 2, 64×64 latents) and one 512² decode each way, alternating, medians of "
                  f"{CALLS} and 2; the UNet output's relative difference, the decode's PSNR and, on this CPU's own "
                  f"instructions, a {STEPS}-step 512² image's (Euler, CFG 7, seed 1) PSNR fast vs exact. \"AVX2 "
                  "only\": oneDNN, MKL and ATen limited to AVX2 and sdstudio's kernels built for Haswell — these "
                  "cores with an AVX2 CPU's instructions, not such a CPU. Their loads: bench/load.py."
                  f"\n\n{table}")


if __name__ == "__main__":
    main()
