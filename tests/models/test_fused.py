"""The CPU fast paths' fused layers (bf16, and fp32 with `fast_fp32`): GEGLU in one pass of our kernel or as two
oneDNN linears, Transformer2DModel output kept channels-last."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from sdstudio.models import fused
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.fused import ChannelsLastTransformer2D, FusedGEGLU, geglu_rows, use_fused_layers
from tests.helpers import needs_native_bf16

needs_kernel = pytest.mark.skipif(fused._geglu_kernel() is None,
                                  reason="the GEGLU kernel needs AVX512-BF16 and a C compiler")


def geglu(dim_in: int, inner: int, bias: bool = True) -> GEGLU:
    torch.manual_seed(0)
    module = GEGLU(dim_in, inner, bias=bias).eval()
    if bias:
        with torch.no_grad():
            module.proj.bias.normal_()       # a real bias, so that a bias split the wrong way shows
    return module


def fused_copy(module: torch.nn.Module) -> torch.nn.Module:
    use_fused_layers(module)
    return module


def run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


@needs_native_bf16
def test_fused_geglu_is_as_close_to_the_fp32_reference_as_diffusers_bf16():
    module = geglu(64, 96)
    x = torch.randn(3, 50, 64)
    reference = run(module, x)
    diffusers_bf16 = run(module.to(torch.bfloat16), x.bfloat16())
    fast = run(fused_copy(module), x.bfloat16())
    assert type(module) is FusedGEGLU and fast.dtype == torch.bfloat16 and fast.shape == reference.shape
    fast_error = (fast.float() - reference).abs().max().item()
    diffusers_error = (diffusers_bf16.float() - reference).abs().max().item()
    assert fast_error <= diffusers_error + 1e-3, (fast_error, diffusers_error)
    assert fast_error < 0.02 * reference.abs().max().item()


@needs_native_bf16
def test_fused_geglu_sees_a_patched_projection():
    module = fused_copy(geglu(32, 48, bias=False).to(torch.bfloat16))
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    before = run(module, x)
    patched = module.proj.weight.data.clone()
    patched[:48] *= 2               # the value half doubles: so does the output
    module.proj.weight.data = patched   # what the weight patcher does
    assert torch.allclose(run(module, x).float(), 2 * before.float(), rtol=0.02, atol=0.02)


def reference_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """value · GELU(gate) in float64 from the same bf16 inputs."""
    value, gate = torch.nn.functional.linear(x.double(), weight.double(),
                                             None if bias is None else bias.double()).chunk(2, dim=-1)
    return value * torch.nn.functional.gelu(gate)


@needs_kernel
@pytest.mark.parametrize("rows, width, inner, bias", [
    (14, 64, 16, True),       # one register tile, one panel
    (45, 96, 48, False),      # a last tile of 3 rows, 3 panels, no bias
    (31, 1280, 224, True),    # 14 panels of 80 KiB: two blocks of the 1 MiB weight budget, uneven split
])
def test_the_geglu_kernel_is_value_times_gelu_of_gate_within_bf16_rounding(rows, width, inner, bias):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=generator).bfloat16()
    weight = (torch.randn(2 * inner, width, generator=generator) * width ** -0.5).bfloat16()
    weight[inner:] *= 3       # gates from about −10 to 10: GELU's curved part and both tails
    b = torch.randn(2 * inner, generator=generator).bfloat16() if bias else None
    out = geglu_rows(x, weight, b)
    expected = reference_geglu(x, weight, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, inner)
    error = (out.double() - expected).abs()
    # one bf16 rounding of the result (2⁻⁸ relative) plus the fp32 sums' and GELU approximation's share
    assert (error <= 2 ** -8 * expected.abs() + 1e-3).all(), error.max()
    two_products = fused._onednn_geglu(x, weight, b)   # what runs without the kernel: rounded twice
    assert error.norm() <= (two_products.double() - expected).norm()


@needs_kernel
def test_a_long_geglu_takes_the_kernel_and_sees_a_patched_projection(fast_kernels, monkeypatch):
    module = fused_copy(geglu(64, 96).to(torch.bfloat16))
    x = torch.randn(2, 600, 64, dtype=torch.bfloat16)         # 1200 rows: over GEGLU_MIN_ROWS
    calls = []
    monkeypatch.setattr(fused, "geglu_rows", lambda *a: calls.append(1) or geglu_rows(*a))
    before = run(module, x)
    assert calls and before.shape == (2, 600, 96)
    assert torch.allclose(before.double(), reference_geglu(x, module.proj.weight, module.proj.bias), atol=0.05)
    patched = module.proj.weight.data.clone()
    patched[:96] *= 2
    module.proj.weight.data = patched
    bias = module.proj.bias.data.clone()
    bias[:96] *= 2            # value and its bias doubled: the output doubles
    module.proj.bias.data = bias
    assert torch.allclose(run(module, x).float(), 2 * before.float(), rtol=0.02, atol=0.02)
    calls.clear()
    run(module, x[:, :500])   # 1000 rows: oneDNN
    assert not calls
    monkeypatch.setattr(fused, "geglu_kernel_pays", lambda: False)   # measured slower on a machine: oneDNN
    run(module, x)
    assert not calls


needs_gelu_product = pytest.mark.skipif(fused._gelu_product_kernel() is None,
                                        reason="the fp32 GELU · product kernel needs AVX2, FMA and a C compiler")


@needs_gelu_product
@pytest.mark.parametrize("rows, width, inner, bias", [
    (40, 64, 96, True),       # whole vectors of 8 and of 16 lanes
    (7, 32, 21, False),       # a partial last vector, no bias
])
def test_the_fp32_geglu_kernel_is_as_close_to_float64_as_two_fused_linears(rows, width, inner, bias):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(2 * inner, width, generator=generator) * width ** -0.5
    weight[inner:] *= 6       # gates from about −20 to 20: GELU's curved part and both tails
    b = torch.randn(2 * inner, generator=generator) if bias else None
    out = fused.product_then_geglu(x, weight, b)
    expected = reference_geglu(x, weight, b)
    assert out.dtype == torch.float32 and out.shape == (rows, inner)
    two_products = fused._onednn_geglu(x, weight, b)
    error = out.double() - expected
    assert error.norm() <= 1.5 * (two_products.double() - expected).norm()
    assert error.abs().max() <= 1e-6 * expected.abs().max()


@needs_gelu_product
def test_an_fp32_geglu_takes_the_kernel_where_it_pays(fast_kernels, monkeypatch):
    module = fused_copy(geglu(64, 96))
    x = torch.randn(2, 50, 64)
    calls, kernel = [], fused.product_then_geglu
    monkeypatch.setattr(fused, "product_then_geglu", lambda *a: calls.append(1) or kernel(*a))
    out = run(module, x)
    assert calls and torch.allclose(out.double(), reference_geglu(x, module.proj.weight, module.proj.bias),
                                    rtol=1e-5, atol=1e-6)
    calls.clear()
    monkeypatch.setattr(fused, "gelu_product_pays", lambda: False)   # measured slower on a machine: oneDNN
    run(module, x)
    assert not calls


def test_fp32_runs_fused_within_its_rounding_and_gradients_and_strided_inputs_keep_diffusers_geglu():
    module = geglu(32, 48)
    x = torch.randn(40, 32)
    reference = run(module, x)
    fast = run(fused_copy(module), x)            # the fast fp32 path's (only its models get the fused class)
    assert fast.dtype == torch.float32 and not torch.equal(fast, reference)
    assert ((fast - reference).norm() / reference.norm()).item() < 1e-6
    module = module.to(torch.bfloat16)
    strided = torch.randn(32, 40, dtype=torch.bfloat16).t()
    assert torch.equal(run(module, strided), run(GEGLU.forward.__get__(module), strided))
    module.requires_grad_(True)
    module(strided).float().sum().backward()
    assert module.proj.weight.grad is not None


@pytest.mark.parametrize("linear_projection", [False, True])
def test_transformer_output_stays_channels_last_with_the_same_bits(linear_projection):
    torch.manual_seed(0)
    module = Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8,
                                cross_attention_dim=24, use_linear_projection=linear_projection).eval()
    module = module.to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 7, 24, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = module(x, encoder_hidden_states=context).sample
        module.__class__ = ChannelsLastTransformer2D      # only this change: the same arithmetic
        out = module(x, encoder_hidden_states=context).sample
    assert not out.is_contiguous()
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)


@needs_native_bf16
def test_a_bf16_unet_gets_the_fused_layers_and_the_fp32_reference_keeps_diffusers(sd1_file):
    fast = load_checkpoint(sd1_file, dtype=torch.bfloat16).unet
    exact = load_checkpoint(sd1_file, dtype=torch.float32).unet
    fused_types = {type(m) for m in fast.modules()}
    assert {FusedGEGLU, ChannelsLastTransformer2D} <= fused_types
    assert not {FusedGEGLU, ChannelsLastTransformer2D} & {type(m) for m in exact.modules()}
