"""The CPU fast paths' attention: the flash kernels (bf16; fp32 for the fast fp32 path; OpenVINO's where the bf16
one is off), blocks for one wide head, diffusers' processor for everything else."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sdstudio.models import attention
from sdstudio.models.attention import (FLASH_MIN_SCORES, LONG_ATTENTION, FastCPUAttention, _compiled_attention,
                                       _flash_kernels, _sdpa, blocked_attention, flash_attention)
from sdstudio.models.checkpoint import load_checkpoint
from tests.helpers import needs_native_bf16

pytestmark = pytest.mark.usefixtures("fast_kernels")   # whatever this machine chose (models/tuning.py)


def attention_module(heads: int, width: int, context_dim: int | None = None) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=heads * width, heads=heads, dim_head=width, cross_attention_dim=context_dim,
                     bias=False).eval()


def run(module: Attention, processor, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    module.set_processor(processor)
    with torch.inference_mode():
        return module(hidden, encoder_hidden_states=context)


needs_flash = pytest.mark.skipif(_flash_kernels() is None, reason="the flash kernel needs AVX512-BF16 and a C compiler")
FLASH_DTYPES = [pytest.param(torch.bfloat16, marks=needs_flash, id="bf16"),
                pytest.param(torch.float32, id="fp32",
                             marks=pytest.mark.skipif(_flash_kernels(torch.float32) is None,
                                                      reason="the fp32 flash kernel needs AVX2, FMA and a C compiler"))]


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.mark.parametrize("dtype", FLASH_DTYPES)
@pytest.mark.parametrize("batch,queries,keys,heads,width,spread", [
    (2, 1024, 1024, 8, 40, 1.0),    # SD1.5's first level, smaller (two blocks of 16 widths and a half)
    (2, 300, 77, 5, 64, 2.0),       # cross-attention: keys padded to 96, queries not a multiple of the tiles
    (1, 129, 1001, 3, 18, 3.0),     # an odd number of keys over two chunks, a width not a multiple of 16
    (2, 64, 700, 2, 160, 4.0),      # SD1.5's deepest width: ten blocks of 16 in three groups and one
    (1, 70, 100, 4, 8, 2.0),        # a width of 8: a half block only
])
def test_flash_attention_is_the_softmax_attention_of_each_head(batch, queries, keys, heads, width, spread, dtype):
    generator = torch.Generator().manual_seed(0)
    q = (torch.randn(batch, queries, heads * width, generator=generator) * spread).to(dtype)
    k, v = (torch.randn(batch, keys, heads * width, generator=generator).to(dtype) for _ in range(2))
    reference = _sdpa(q.double(), k.double(), v.double(), heads)
    out = flash_attention(q, k, v, heads)
    assert out.dtype == dtype and out.shape == q.shape
    error, torch_error = relative_error(out, reference), relative_error(_sdpa(q, k, v, heads), reference)
    assert error <= 1.5 * torch_error, (error, torch_error)   # fp32 scores and sums, like PyTorch's kernel


@pytest.mark.parametrize("dtype", FLASH_DTYPES)
def test_flash_attention_of_very_negative_scores_is_not_swamped_by_the_padded_keys(dtype):
    k = torch.full((1, 33, 64), 10.0).to(dtype)   # 33 keys, padded to 64 with zeros (score 0)
    q = -k[:, :8]                                 # every real score −800: e^−800 underflows unless the maximum
    v = torch.randn(1, 33, 64).to(dtype)          # is the real scores' (not the padding's 0)
    out = flash_attention(q, k, v, 1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0].float(), v[0].float().mean(0).expand(8, -1), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", FLASH_DTYPES)
@pytest.mark.parametrize("queries,context", [(LONG_ATTENTION, None), (256, 77), (16, 77)])
def test_the_processor_takes_the_flash_kernel_for_all_but_the_smallest_attention(monkeypatch, queries, context,
                                                                                 dtype):
    module = attention_module(8, 40, context_dim=None if context is None else 32)
    hidden = torch.randn(2, queries, 320)
    encoder = None if context is None else torch.randn(2, context, 32)
    reference = run(module, AttnProcessor2_0(), hidden, encoder)
    encoder = None if encoder is None else encoder.to(dtype)
    torch_same = run(module.to(dtype), AttnProcessor2_0(), hidden.to(dtype), encoder)
    used = []
    monkeypatch.setattr(attention, "flash_attention", lambda *a: used.append(1) or flash_attention(*a))
    fast = run(module, FastCPUAttention(), hidden.to(dtype), encoder)
    assert bool(used) == (queries * (context or queries) >= FLASH_MIN_SCORES)
    assert relative_error(fast, reference) <= 1.5 * relative_error(torch_same, reference) + 1e-4


@pytest.mark.parametrize("heads,width", [(8, 40), (5, 64), (2, 32)])
def test_long_self_attention_without_the_flash_kernel_goes_through_openvino_and_matches_the_fp32_reference(
        monkeypatch, heads, width):
    monkeypatch.setattr(attention, "flash_pays", lambda *dtype: False)
    module = attention_module(heads, width)
    hidden = torch.randn(2, LONG_ATTENTION, heads * width)
    reference = run(module, AttnProcessor2_0(), hidden)
    torch_bf16 = run(module.to(torch.bfloat16), AttnProcessor2_0(), hidden.bfloat16())
    compiled_before = _compiled_attention.cache_info().currsize + _compiled_attention.cache_info().hits
    fast = run(module, FastCPUAttention(), hidden.bfloat16())
    info = _compiled_attention.cache_info()
    assert info.currsize + info.hits > compiled_before, "the OpenVINO kernel was not used"
    assert fast.dtype == torch.bfloat16 and fast.shape == reference.shape
    fast_error = (fast.float() - reference).abs().max().item()
    torch_error = (torch_bf16.float() - reference).abs().max().item()
    assert fast_error <= 2 * torch_error + 1e-3, (fast_error, torch_error)
    assert fast_error < 0.05 * reference.abs().max().item()


def test_short_cross_attention_without_the_flash_kernel_stays_with_pytorch_bit_for_bit(monkeypatch):
    monkeypatch.setattr(attention, "flash_pays", lambda *dtype: False)
    module = attention_module(4, 16, context_dim=32).to(torch.bfloat16)
    hidden = torch.randn(1, LONG_ATTENTION, 64, dtype=torch.bfloat16)
    context = torch.randn(1, 77, 32, dtype=torch.bfloat16)
    assert torch.equal(run(module, FastCPUAttention(), hidden, context),
                       run(module, AttnProcessor2_0(), hidden, context))


@pytest.mark.parametrize("repeated", [True, False])
def test_a_cfg_batch_of_one_half_repeated_computes_its_self_attention_once(monkeypatch, repeated):
    import sdstudio.models.attention as attention

    module = attention_module(8, 40).to(torch.bfloat16)
    half = torch.randn(2, LONG_ATTENTION, 320, dtype=torch.bfloat16)
    other = half.clone()
    other[-1, -1, -1] += 1   # one value apart: not a repeat
    hidden = torch.cat([half, half if repeated else other])
    batches = []
    for name in ("flash_attention", "openvino_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda q, *rest, real=real: batches.append(len(q)) or real(q, *rest))
    out = run(module, FastCPUAttention(), hidden)
    assert batches == ([2] if repeated else [4])
    each = torch.cat([run(module, FastCPUAttention(), image[None]) for image in hidden])
    assert torch.equal(out, each)


def vae_attention_block(channels: int) -> Attention:
    """The VAE's mid-block attention as diffusers builds it: one head, group norm, residual."""
    torch.manual_seed(0)
    return Attention(channels, heads=1, dim_head=channels, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                     residual_connection=True, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True).eval()


@pytest.mark.parametrize("rows", [attention.ROWS, 16])   # one block of rows per image; many, a short last one
def test_blocked_attention_is_the_softmax_attention_of_each_image(monkeypatch, rows):
    monkeypatch.setattr(attention, "ROWS", rows)
    q, k, v = (torch.randn(2, tokens, 96) for tokens in (200, 1100, 1100))
    q = q * 3   # scores of spread 3: the softmax is far from uniform
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert error < 2e-2, error   # scores rounded to bf16 (OpenVINO's kernel: the same 1.3e-2 here); PyTorch's
    assert ((torch_bf16.float() - reference).norm() / reference.norm()).item() < error / 2   # kernel keeps fp32


@pytest.mark.parametrize("channels", [64, 512])
def test_a_vae_attention_block_runs_by_blocks_and_matches_the_fp32_reference(monkeypatch, channels):
    module = vae_attention_block(channels)
    side = int(LONG_ATTENTION ** 0.5)
    hidden = (torch.randn(1, channels, side, side) * 2 + 1).contiguous(memory_format=torch.channels_last)
    reference = run(module, AttnProcessor2_0(), hidden)
    torch_bf16 = run(module.to(torch.bfloat16), AttnProcessor2_0(), hidden.bfloat16())
    blocked = []
    monkeypatch.setattr(attention, "blocked_attention", lambda *a: blocked.append(1) or blocked_attention(*a))
    fast = run(module, FastCPUAttention(), hidden.bfloat16())
    assert blocked == [1]
    assert fast.dtype == torch.bfloat16 and fast.shape == reference.shape
    fast_error = (fast.float() - reference).abs().max().item()
    torch_error = (torch_bf16.float() - reference).abs().max().item()
    assert fast_error <= 2 * torch_error + 1e-2, (fast_error, torch_error)   # the residual dominates the values
    smaller = hidden[:, :, : side // 2].bfloat16()   # too few tokens: PyTorch's kernel, bit for bit
    assert torch.equal(run(module, FastCPUAttention(), smaller), run(module, AttnProcessor2_0(), smaller))
    assert blocked == [1]


def test_fp32_without_its_flash_kernel_and_gradients_stay_with_pytorch(monkeypatch):
    monkeypatch.setattr(attention, "flash_pays", lambda dtype: dtype != torch.float32)
    module = attention_module(2, 32)
    hidden = torch.randn(1, LONG_ATTENTION, 64)
    assert torch.equal(run(module, FastCPUAttention(), hidden), run(module, AttnProcessor2_0(), hidden))
    module = module.to(torch.bfloat16).requires_grad_(True)
    module.set_processor(FastCPUAttention())
    out = module(hidden.bfloat16())
    out.float().sum().backward()
    assert module.to_q.weight.grad is not None and module.to_q.weight.grad.abs().sum() > 0


@needs_native_bf16
def test_a_bf16_unet_gets_the_fast_attention_and_the_fp32_reference_keeps_diffusers(sd1_file):
    fast_model = load_checkpoint(sd1_file, dtype=torch.bfloat16)
    exact_model = load_checkpoint(sd1_file, dtype=torch.float32)
    fast, exact = fast_model.unet, exact_model.unet
    for fast_part, exact_part in ((fast, exact), (fast_model.vae, exact_model.vae)):
        assert {type(p) for p in fast_part.attn_processors.values()} == {FastCPUAttention}
        assert {type(p) for p in exact_part.attn_processors.values()} == {AttnProcessor2_0}
    side = int(LONG_ATTENTION ** 0.5)   # the first level's self-attention sees side² tokens: the fast kernels
    x = torch.randn(1, 4, side, side)
    context = torch.randn(1, 77, exact.config.cross_attention_dim)
    with torch.inference_mode():
        reference = exact(x, torch.tensor([500.0]), encoder_hidden_states=context).sample
        out = fast(x.bfloat16(), torch.tensor([500.0]), encoder_hidden_states=context.bfloat16()).sample
        fast.set_attn_processor(AttnProcessor2_0())
        torch_bf16 = fast(x.bfloat16(), torch.tensor([500.0]), encoder_hidden_states=context.bfloat16()).sample
    fast_error = (out.float() - reference).abs().max().item()
    torch_error = (torch_bf16.float() - reference).abs().max().item()
    assert fast_error <= 2 * torch_error + 1e-3, (fast_error, torch_error)
