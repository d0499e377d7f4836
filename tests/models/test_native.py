"""The C kernels' build and runtime: one OpenMP runtime shared with torch, reused scratch buffers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdstudio.models import native
from sdstudio.models.native import compiled_library, release_kernel_buffers, scratch

TEAM_SOURCE = """int omp_get_num_threads(void);
int omp_get_thread_num(void);

/* the size of the OpenMP team a kernel gets for `threads` threads */
int team_size(int threads) {
  int size = 0;
#pragma omp parallel num_threads(threads)
  if (omp_get_thread_num() == 0) size = omp_get_num_threads();
  return size;
}
"""


def test_kernels_run_on_torchs_own_openmp_runtime():
    library = compiled_library("team", TEAM_SOURCE)
    if library is None:
        pytest.skip("no C compiler here")
    assert library.team_size(2) == 2
    torch.ones(1 << 16).sum()   # torch's own OpenMP runtime is in use too
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(runtimes) == 1, runtimes   # a second one would run its own threads against torch's


def test_scratch_buffers_are_reused_grown_and_released():
    release_kernel_buffers()
    first = scratch("test", (4, 8))
    assert first.shape == (4, 8) and first.dtype == torch.bfloat16
    again = scratch("test", (2, 3), torch.int32)   # smaller, another dtype: the same memory
    assert again.data_ptr() == first.data_ptr() and again.dtype == torch.int32
    grown = scratch("test", (100, 100))
    assert grown.numel() == 10000
    assert set(native._buffers()) == {"test"}
    release_kernel_buffers()
    assert not native._buffers()


@pytest.mark.parametrize("heap_keeps_freed_memory", [True, False])
def test_a_layer_frees_its_buffers_when_the_heap_keeps_freed_memory(monkeypatch, heap_keeps_freed_memory):
    monkeypatch.setattr(native, "keep_freed_memory", lambda: heap_keeps_freed_memory)
    release_kernel_buffers()
    held = scratch("outer", (8,), torch.float32).fill_(3)

    @native.releasing_buffers
    def layer(x):
        return scratch("inner", (4,), torch.float32).copy_(x) * 2

    assert torch.equal(layer(torch.ones(4)), torch.full((4,), 2.0))
    assert set(native._buffers()) == (set() if heap_keeps_freed_memory else {"outer", "inner"})
    assert torch.equal(held, torch.full((8,), 3.0))   # a caller's buffer stays its own
    release_kernel_buffers()


def test_a_kernel_source_carries_its_headers_text(tmp_path, monkeypatch):
    (tmp_path / "shared.h").write_text("static int twice(int x) { return 2 * x; }\n")
    (tmp_path / "user.c").write_text('#include <stdint.h>\n#include "shared.h"\nint four(void) { return twice(2); }\n')
    monkeypatch.setattr(native, "KERNELS", tmp_path)
    source = native.kernel_source("user")
    assert source == ("#include <stdint.h>\nstatic int twice(int x) { return 2 * x; }\n\n"
                      "int four(void) { return twice(2); }\n")
    (tmp_path / "shared.h").write_text("static int twice(int x) { return x + x; }\n")
    assert native.kernel_source("user") != source     # a changed header: another build (the cache key is the text)
    monkeypatch.undo()
    for name in ("flash_attention", "geglu"):           # the real kernels: one text, no include of ours left
        text = native.kernel_source(name)
        assert '#include "' not in text and text.count("static inline __m512 exp2_ps") == 1
