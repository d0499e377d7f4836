"""The UNet's attention on the CPU fast paths: sdstudio's flash-attention kernels (models/kernels/flash_attention.c in
bf16, against OpenVINO's CPU SDPA kernel and PyTorch's; flash_attention_fp32.c, against PyTorch's) at every attention
shape of an SD1.5 512² and an SDXL 1024² CFG step (batch 2), in one process; errors relative (L2) to a float64
attention of the same inputs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from sdstudio.models.attention import _sdpa  # noqa: E402

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


def table(dtype: torch.dtype, kernels: dict) -> list[str]:
    """Rows of every shape in `dtype`: each kernel's ms, the first one's speed-up over the others, their errors."""
    others = list(kernels)[1:]
    rows = [f"| {str(dtype).replace('torch.', '')} attention (batch 2) | calls per step | " + " ms | ".join(kernels)
            + " ms | " + "".join(f"vs {name.split()[0]} | " for name in others) + "error " + " / ".join(
                name.split(" (")[0] for name in kernels) + " |", "|---" * (4 + 2 * len(others)) + "|"]
    generator = torch.Generator().manual_seed(0)
    for model, queries, keys, heads, width, calls in SHAPES:
        q = torch.randn(2, queries, heads * width, generator=generator).to(dtype)
        k, v = (torch.randn(2, keys, heads * width, generator=generator).to(dtype) for _ in range(2))
        reference = _sdpa(q.double(), k.double(), v.double(), heads)
        errors = [((kernel(q, k, v, heads).double() - reference).norm() / reference.norm()).item()
                  for kernel in kernels.values()]
        ms = [best_ms(kernel, q, k, v, heads) for kernel in kernels.values()]
        kind = "self" if queries == keys else "cross"
        rows.append(f"| {model} {kind} {queries} × {keys}, {heads} heads of {width} | {calls} | "
                    + " | ".join(f"{m:.2f}" for m in ms) + " | " + "".join(f"{m / ms[0]:.2f}× | " for m in ms[1:])
                    + " / ".join(f"{e:.1e}" for e in errors) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    from sdstudio.models.attention import _flash_kernels, flash_attention, openvino_attention
    from sdstudio.models.tuning import native_bf16

    tables = []
    if native_bf16() and _flash_kernels(torch.bfloat16) is not None:
        tables.append(table(torch.bfloat16, {"flash (sdstudio)": flash_attention, "OpenVINO SDPA": openvino_attention,
                                             "PyTorch SDPA": _sdpa}))
    if _flash_kernels(torch.float32) is not None:   # the fast fp32 path's
        tables.append(table(torch.float32, {"fp32 flash (sdstudio)": flash_attention, "PyTorch SDPA": _sdpa}))
    if not tables:
        print("no flash kernel builds here (no AVX2 and FMA, or no C compiler)")
        return
    write_section("UNet attention (bench/attention.py)",
                  f"{machine()}\n\nCommand: `make bench` or `.venv/bin/python bench/attention.py`. One process, random "
                  f"inputs of each shape; each kernel in turn, best of {ROUNDS} after one untimed call. Calls per "
                  "step: the UNet's attention calls of that shape in one CFG step (SD1.5 512², SDXL 1024²). bf16 "
                  "(the bf16 fast path's kernels) where the CPU has native bf16 math; fp32 (the fast fp32 path's) "
                  "where it has AVX2 and FMA. Errors relative (L2) to a float64 attention of the same inputs.\n\n"
                  + "\n\n".join("\n".join(rows) for rows in tables))


if __name__ == "__main__":
    main()
