"""Copies of file weights in the dtype and layout a model runs in (models/conversion.py): the C kernel reading the
file must give the bits torch's own conversion gives."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import ModelFileError
from sdstudio.files.readers import file_region, read_state_dict
from sdstudio.models import conversion
from sdstudio.models.conversion import converted_weights, copy_weights

SPECIAL_HALVES = [0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 1e-7, 65504.0, -65504.0, float("inf"), float("-inf"), float("nan"),
                  1.0039062, 1.0078125, 3.1415926]   # subnormals, extremes, infinities, NaN, rounding ties


def weights_of(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Shapes a model file holds: 3×3 and 1×1 convolutions (one bigger than a kernel block, with a ragged last
    block), linears, norms, a scalar; values spread wide, with fp16's special values."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"conv3": (70, 96, 3, 3), "conv_big": (130, 320, 3, 3), "conv1": (64, 32, 1, 1), "conv_in": (32, 4, 3, 3),
              "linear": (300, 770), "norm": (96,), "scalar": ()}
    weights = {name: (torch.randn(shape, generator=generator) * 10 ** torch.randint(-6, 4, shape,
                                                                                   generator=generator).float())
               for name, shape in shapes.items()}
    weights["linear"].view(-1)[:len(SPECIAL_HALVES)] = torch.tensor(SPECIAL_HALVES)   # the vector loop's
    weights["specials"] = torch.tensor(SPECIAL_HALVES)                                  # the scalar tail's
    return {name: weight.to(dtype) for name, weight in weights.items()}


def expected(source: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    layout = torch.channels_last if channels_last and source.dim() == 4 else torch.contiguous_format
    return source.to(dtype).contiguous(memory_format=layout)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same dtype, shape, layout and bits (any NaN for a NaN: torch's own NaN bits differ between its paths)."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[want.dtype]
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan])


@pytest.mark.parametrize("file_dtype, dtype", [(torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32), (torch.float32, torch.float32)])
def test_kernel_copies_have_the_bits_of_torchs_conversion(tmp_path, file_dtype, dtype, monkeypatch):
    copied_by_torch = []
    monkeypatch.setattr(conversion, "copy_converting", lambda *pair: copied_by_torch.append(pair))
    path = tmp_path / "weights.safetensors"
    save_file(weights_of(file_dtype), str(path))
    mapped = read_state_dict(path)
    assert all(file_region(tensor) is not None for tensor in mapped.values())
    copies = converted_weights(mapped, dtype, channels_last=True)
    for name, source in mapped.items():
        want = expected(source, dtype, channels_last=True)
        assert_same_bits(copies[name], want)
        if source.dtype == dtype and source.stride() == want.stride():
            assert copies[name] is source          # already right (a 1×1 convolution is channels-last too): no copy
        else:
            assert copies[name].data_ptr() != source.data_ptr()
    assert not copied_by_torch or conversion._kernels() is None   # every copy by the kernel, where it is built


def test_without_a_compiler_the_copies_are_the_same(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_file(weights_of(torch.float16), str(path))
    with_kernel = converted_weights(read_state_dict(path), torch.bfloat16, channels_last=True)
    monkeypatch.setenv("SDSTUDIO_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    conversion._kernels.cache_clear()
    try:
        assert conversion._kernels() is None
        without = converted_weights(read_state_dict(path), torch.bfloat16, channels_last=True)
    finally:
        conversion._kernels.cache_clear()
    for name, copy in with_kernel.items():
        assert_same_bits(without[name], copy)


def test_weights_not_read_from_a_file_are_copied_too():
    weights = weights_of(torch.float16)
    copies = converted_weights(weights, torch.bfloat16, channels_last=False)
    for name, source in weights.items():
        assert_same_bits(copies[name], expected(source, torch.bfloat16, channels_last=False))


def test_a_file_cut_short_after_it_was_opened_names_the_file(tmp_path):
    path = tmp_path / "shrinking.safetensors"
    save_file(weights_of(torch.float16), str(path))
    mapped = read_state_dict(path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(ModelFileError, match="shrinking.safetensors.*became shorter"):
        converted_weights(mapped, torch.bfloat16, channels_last=True)


def test_a_file_replaced_after_it_was_opened_names_the_file(tmp_path):
    path = tmp_path / "replaced.safetensors"
    save_file(weights_of(torch.float16), str(path))
    mapped = read_state_dict(path)
    save_file(weights_of(torch.float32), str(tmp_path / "other.safetensors"))
    os.replace(tmp_path / "other.safetensors", path)       # another file (inode) at the same path
    with pytest.raises(ModelFileError, match="replaced.safetensors.*replaced on disk"):
        converted_weights(mapped, torch.bfloat16, channels_last=True)


def test_one_weight_copied_into_a_kept_buffer(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(weights_of(torch.float16), str(path))
    for source in (read_state_dict(path)["linear"], weights_of(torch.float16)["linear"]):   # from the file, in memory
        target = torch.full(source.shape, 7.0, dtype=torch.bfloat16)
        copy_weights([(target, source)])
        assert_same_bits(target, expected(source, torch.bfloat16, channels_last=False))
