"""The bf16 CPU fast path's fused layers: GEGLU as two oneDNN linears, Transformer2DModel output kept channels-last."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.fused import ChannelsLastTransformer2D, FusedGEGLU, use_fused_layers


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


def test_fused_geglu_sees_a_patched_projection():
    module = fused_copy(geglu(32, 48, bias=False).to(torch.bfloat16))
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    before = run(module, x)
    patched = module.proj.weight.data.clone()
    patched[:48] *= 2               # the value half doubles: so does the output
    module.proj.weight.data = patched   # what the weight patcher does
    assert torch.allclose(run(module, x).float(), 2 * before.float(), rtol=0.02, atol=0.02)


def test_fp32_gradients_and_strided_inputs_keep_diffusers_geglu():
    module = geglu(32, 48)
    x = torch.randn(40, 32)
    reference = run(module, x)
    assert torch.equal(run(fused_copy(module), x), reference)
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


def test_a_bf16_unet_gets_the_fused_layers_and_the_fp32_reference_keeps_diffusers(sd1_file):
    fast = load_checkpoint(sd1_file, dtype=torch.bfloat16).unet
    exact = load_checkpoint(sd1_file, dtype=torch.float32).unet
    fused_types = {type(m) for m in fast.modules()}
    assert {FusedGEGLU, ChannelsLastTransformer2D} <= fused_types
    assert not {FusedGEGLU, ChannelsLastTransformer2D} & {type(m) for m in exact.modules()}
