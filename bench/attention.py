"""The UNet's attention on the bf16 fast path: sdstudio's flash-attention kernel (models/kernels/flash_attention.c)
against OpenVINO's CPU SDPA kernel and PyTorch's, at every attention shape of an SD1.5 512² and an SDXL 1024² CFG
step (batch 2), in one process; errors relative (L2) to a float64 attention of the same bf16 inputs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

ROUNDS = 5   # each kernel in turn, best of ROUNDS after one untimed call
SHAPES = [   # (model, queries, keys, heads, width, calls per step)
    ("SD1.5", 4096, 4096, 8, 40, 5), ("SD1.5", 4096, 77, 8, 40, 5), ("SD1.5", 1024, 1024, 8, 80, 5),
    ("SD1.5", 1024, 77, 8, 80, 5), ("SD1.5", 256, 256, 8, 160, 5), ("SD1.5", 256, 77, 8, 160, 5),
    ("SDXL", 4096, 4096, 10, 64, 10), ("SDXL", 4096, 77, 10, 64, 10), ("SDXL", 1024, 1024, 20, 64, 60),
    ("SDXL", 1024, 77, 20, 64, 60),
]


def best_ms(kernel, *args) -> float:
    kernel(*args)
    seconds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        kernel(*args)
        seconds.append(time.perf_counter() - start)
    return min(seconds) * 1e3


def main() -> None:
    from sdstudio.models.attention import _flash_kernels, _sdpa, flash_attention, openvino_attention
    from sdstudio.models.tuning import native_bf16

    if not native_bf16() or _flash_kernels() is None:
        print("no AVX512-BF16 (or no C compiler) here: the flash kernel does not apply")
        return
    kernels = {"flash (sdstudio)": flash_attention, "OpenVINO SDPA": openvino_attention, "PyTorch SDPA": _sdpa}
    rows = ["| attention (batch 2) | calls per step | " + " ms | ".join(kernels) + " ms | vs OpenVINO | vs PyTorch | "
            "error flash / OpenVINO / PyTorch |", "|---" * 8 + "|"]
    generator = torch.Generator().manual_seed(0)
    for model, queries, keys, heads, width, calls in SHAPES:
        q = torch.randn(2, queries, heads * width, generator=generator).bfloat16()
        k, v = (torch.randn(2, keys, heads * width, generator=generator).bfloat16() for _ in range(2))
        reference = _sdpa(q.double(), k.double(), v.double(), heads)
        errors = [((kernel(q, k, v, heads).double() - reference).norm() / reference.norm()).item()
                  for kernel in kernels.values()]
        ms = [best_ms(kernel, q, k, v, heads) for kernel in kernels.values()]
        kind = "self" if queries == keys else "cross"
        rows.append(f"| {model} {kind} {queries} × {keys}, {heads} heads of {width} | {calls} | "
                    + " | ".join(f"{m:.2f}" for m in ms) + f" | {ms[1] / ms[0]:.2f}× | {ms[2] / ms[0]:.2f}× | "
                    + " / ".join(f"{e:.1e}" for e in errors) + " |")
        print(rows[-1], flush=True)
    write_section("UNet attention (bench/attention.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/attention.py`. One process, random "
                  f"bf16 inputs of each shape; each kernel in turn, best of {ROUNDS} after one untimed call. Calls per "
                  "step: the UNet's attention calls of that shape in one CFG step (SD1.5 512², SDXL 1024²).\n\n"
                  + "\n".join(rows))


if __name__ == "__main__":
    main()
