"""NVIDIA CUDA ``torch.randn`` reproduced on any hardware with numpy (A1111's ``randn_source = "NV"``).

PyTorch's CUDA generator is cuRAND's Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy
as 1, 2, 3"). For a float32 ``torch.randn`` of ``n`` elements, thread ``i`` runs
``curand_init(seed, subsequence=i, offset=philox_offset)`` and ``curand_normal4``; element ``i`` is the
first Box-Muller output of that thread's first Philox block, i.e. of the block for
``counter = (philox_offset / 4, 0, i, 0)`` and ``key = (seed low 32 bits, seed high 32 bits)``. Each
``randn`` call advances torch's offset by 4, so draw ``k`` of a generator uses counter word 0 = ``k``.

Like A1111's ``modules/rng_philox.py`` this treats every element as its own thread, which is exact while
``n`` is at most the number of threads CUDA launches (hundreds of thousands on current GPUs: every
SD/SDXL latent); beyond that real GPUs reuse threads and differ. Box-Muller is evaluated in float64 from
cuRAND's float32 constants and rounded to float32, as A1111 does (within an ulp or so of the GPU's float32).
"""
from __future__ import annotations

import numpy as np

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Philox4x32 round multipliers and Weyl key increments (Random123 PHILOX_M4x32_0/1, PHILOX_W32_0/1).
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
# cuRAND's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI, rounded to float32 like the C constants.
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32-R block function: counter (4, N) uint32 words, key (k0, k1) -> (4, N) uint32 words."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) for word in counter)
    k0, k1 = np.uint64(key[0] & _MASK32), np.uint64(key[1] & _MASK32)
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    for round_index in range(rounds):
        if round_index:
            k0 = (k0 + np.uint64(_PHILOX_W[0])) & mask
            k1 = (k1 + np.uint64(_PHILOX_W[1])) & mask
        p0 = c0 * np.uint64(_PHILOX_M[0])  # 32x32 -> 64-bit product, no overflow
        p1 = c2 * np.uint64(_PHILOX_M[1])
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def box_muller_first(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cuRAND's Box-Muller on two uint32 arrays, first output only: sqrt(-2 ln u) * sin(2 pi v), float32."""
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """Stand-in for ``torch.Generator("cuda").manual_seed(seed)`` whose only use is successive ``randn`` draws."""

    def __init__(self, seed: int):
        self.seed = seed & _MASK64  # torch maps negative seeds to their two's complement
        self.offset = 0  # number of draws so far = torch's Philox offset / 4

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """Next ``torch.randn(shape, device="cuda", generator=g)``: float32 array of ``shape``."""
        n = int(np.prod(shape, dtype=np.int64))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)  # one cuRAND subsequence per element
        self.offset += 1
        block = philox4x32(counter, (self.seed & _MASK32, self.seed >> 32))
        return box_muller_first(block[0], block[1]).reshape(shape)
