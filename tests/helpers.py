"""Small measures shared by tests."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.models.tuning import native_bf16

needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason="the bf16 fast path (and int8 on it) is built only "
                                       "where the CPU has native bf16 math (AMX or AVX512-BF16)")


def psnr(a, b, peak: float = 255.0) -> float:
    """PSNR in dB between two images of the same size: PIL images (8-bit, the default `peak`) or tensors/arrays with
    values spanning `peak`; inf when identical."""
    x, y = (np.asarray(v.detach().float().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
            for v in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def resident_kib(path: Path) -> int:
    """KiB of this process's mappings of `path` that are resident (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total
