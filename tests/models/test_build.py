"""Building modules from file weights: the dtype conversion at load."""
from __future__ import annotations

import pytest
import torch

from sdstudio.models.build import CONVERSION_CHUNK, copy_converting


@pytest.mark.parametrize("shape", [(37, 3 * CONVERSION_CHUNK // 37 + 5), (1, CONVERSION_CHUNK + 3), (5,), ()])
def test_float16_to_bfloat16_copy_has_the_bits_of_a_direct_conversion(shape):
    source = torch.randn(shape).mul(100).half()
    source.view(-1)[:4] = torch.tensor([65504.0, -6e-8, float("inf"), -0.0])[:source.numel()]
    target = torch.empty(shape, dtype=torch.bfloat16)
    copy_converting(target, source)
    assert torch.equal(target.view(torch.int16), source.to(torch.bfloat16).view(torch.int16))


def test_convolution_weight_copy_changes_layout_and_dtype_in_one_go():
    source = torch.randn(70, 64, 3, 3 * 2 * CONVERSION_CHUNK // (70 * 64 * 3)).half()
    target = torch.empty_like(source, dtype=torch.bfloat16, memory_format=torch.channels_last)
    copy_converting(target, source)
    assert target.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(target, source.to(torch.bfloat16))
