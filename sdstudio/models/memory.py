"""The C heap setting of sdstudio's processes: big tensors reuse freed heap memory instead of fresh pages.

glibc's malloc serves an allocation above its mmap threshold (dynamic, at most 32 MiB; in a thread's own arena any
allocation over 64 MiB) with fresh pages from the kernel and gives them back on free, so every UNet call page-faults
and zeroes its big activations anew (SD1.5 512² with CFG: an 8192 × 2560 GEGLU projection, 84 MB in fp32, in each of
16 transformer blocks). With the threshold at 1 GiB, trimming off and one arena for every thread (the server computes
in a worker thread), freed blocks are reused: a fast fp32 SD1.5 UNet call on an AVX2 CPU (Zen 3), in a worker thread,
9.0–9.3 → 7.6–7.8 s, peak RSS 5.09 → 5.12 GiB. The price: the process keeps its peak heap once reached (the memory
targets are peaks). Elsewhere than glibc, nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8   # mallopt's parameters (malloc.h)
SETTINGS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: 1 << 30, M_ARENA_MAX: 1}


@functools.cache
def keep_freed_memory() -> bool:
    """Set SETTINGS for this process's heap (once; best before other threads allocate: a thread's arena is chosen at
    its first allocation); False where the C library has no glibc mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
        libc.gnu_get_libc_version   # glibc's: another C library's mallopt takes other numbers
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = all(mallopt(option, value) == 1 for option, value in SETTINGS.items())
    if not done:
        log.warning("cannot set the C heap's settings %s: big tensors get fresh pages on every call", SETTINGS)
    return done
