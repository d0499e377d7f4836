"""The C heap setting: big tensors come from (and go back to) the heap, not fresh pages per allocation; idle
networks' file pages leave the process."""
from __future__ import annotations

import ctypes
import ctypes.util
import shutil
from pathlib import Path

import pytest
import torch

from sdstudio import pipeline
from sdstudio.files.readers import is_file_mapped
from sdstudio.models import half_weights
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.memory import keep_freed_memory, release_idle_weights
from tests.helpers import resident_kib


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


def mapped_bytes(network: torch.nn.Module) -> int:
    return sum(w.nbytes for w in network.parameters() if is_file_mapped(w))


def test_idle_networks_file_pages_leave_the_process_and_come_back_on_use(synth_file, tmp_path, monkeypatch):
    source = Path(shutil.copy(synth_file("sd1", "fp16"), tmp_path / "model.safetensors")).resolve()
    monkeypatch.setattr(half_weights, "HALF_KEPT_MIN", 1024)   # the tiny model's weights kept 16-bit, as real ones
    model = load_checkpoint(source, fast_fp32=True)
    unet = mapped_bytes(model.unet)
    assert unet > 1 << 20
    edges = 2 * 4 * sum(1 for w in model.unet.parameters() if is_file_mapped(w))   # KiB: a part page at each end
    sums = [w.double().sum() for w in model.unet.parameters()]   # every page resident
    resident = resident_kib(source)
    release_idle_weights(model.unet)
    assert resident - resident_kib(source) >= unet // 1024 - edges
    assert all(torch.equal(w.double().sum(), s) for w, s in zip(model.unet.parameters(), sums))   # read back

    released, steps = [], []   # which networks a generation lets go of, and when (the real function runs)
    real = pipeline.release_idle_weights
    monkeypatch.setattr(pipeline, "release_idle_weights",
                        lambda *networks: released.append((len(steps), {id(n) for n in networks})) or real(*networks))
    pipeline.txt2img(model, prompt="a cat", seed=1, width=64, height=64, steps=2, save=False,
                     callback=lambda *args: steps.append(1))
    encoders = {id(e.model) for e in model.text_encoders}
    assert released == [(0, {id(model.vae)} | encoders), (2, {id(model.unet)})]
