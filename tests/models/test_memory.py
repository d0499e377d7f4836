"""The C heap setting: big tensors come from (and go back to) the heap, not fresh pages per allocation."""
from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch

from sdstudio.models.memory import keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap() -> MallInfo2:
    """glibc malloc's figures: `arena` bytes of heap, `hblkhd` bytes in mmap'ed blocks of their own (given back to
    the kernel on free)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no glibc mallinfo2 here")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def test_a_big_tensor_lives_in_the_heap_and_the_next_one_reuses_its_memory():
    assert keep_freed_memory()
    before = heap()
    big = torch.ones(100 << 18)     # 100 MiB: above glibc's largest default mmap threshold (32 MiB)
    assert heap().hblkhd - before.hblkhd < 1 << 20   # not an mmap'ed block of its own (default: +100 MiB)
    del big
    grown = heap().arena
    torch.ones(90 << 18)   # smaller: an aligned request for the very same size may not fit the freed block exactly
    assert heap().arena - grown < 1 << 20            # the freed memory, no new heap
