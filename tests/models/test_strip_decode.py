"""The VAE decoder's up path in strips of rows: diffusers' arithmetic, strip by strip."""
from __future__ import annotations


import pytest
import torch

from sdstudio.models import native, strip_decode, winograd
from sdstudio.models import vae as vae_ops
from sdstudio.models.checkpoint import load_checkpoint
from tests.helpers import psnr

pytestmark = pytest.mark.usefixtures("fast_kernels")   # whatever this machine chose (models/tuning.py)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def vae(request, sd1_file):
    return load_checkpoint(sd1_file, dtype=request.param).vae


@pytest.mark.parametrize("strip_elements", [1 << 21, 2000, 300])   # one strip per tensor; many; one row each
@pytest.mark.parametrize("narrow_winograd", [False, True])
def test_the_up_path_in_strips_is_diffusers_decoder(vae, monkeypatch, strip_elements, narrow_winograd):
    monkeypatch.setattr(strip_decode, "STRIP_ELEMENTS", strip_elements)
    if narrow_winograd:   # the tiny VAE's layers are too narrow and small for Winograd to pay: let them qualify
        monkeypatch.setitem(winograd.MIN_CHANNELS, torch.bfloat16, winograd.CHANNEL_BLOCK)
        monkeypatch.setitem(winograd.MIN_TILES, torch.bfloat16, 1)
    by_winograd = []
    real = strip_decode.winograd_conv2d
    monkeypatch.setattr(strip_decode, "winograd_conv2d", lambda *a, **k: by_winograd.append(1) or real(*a, **k))
    latents = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(3)).to(vae.dtype)
    with torch.inference_mode():
        reference = vae.decode(latents).sample
        strips = strip_decode.up_path_in_strips(vae.decoder, vae_ops.decoder_trunk(vae, latents))
    assert bool(by_winograd) == (narrow_winograd and vae.dtype == torch.bfloat16)
    assert not native._buffers()   # released level by level
    assert strips.shape == reference.shape == (2, 3, 96, 80) and strips.dtype == reference.dtype
    if vae.dtype == torch.float32:   # only the order of the statistics' sums differs
        assert torch.allclose(strips, reference, atol=1e-4, rtol=1e-4), (strips - reference).abs().max()
    else:                             # and bf16 roundings of intermediate values
        assert psnr(strips, reference, peak=2) >= (40 if by_winograd else 45)   # images in [-1, 1]; Winograd's
        # per-layer error is up to 4× the direct convolution's (here on every layer; full-size 512²: 49.9 dB)


def test_group_statistics_from_strips_are_the_whole_tensors(monkeypatch):
    monkeypatch.setattr(strip_decode, "STRIP_ELEMENTS", 64 * 7 * 3)   # strips of 3 rows: a shorter last strip
    values = (torch.randn(2, 64, 20, 7, dtype=torch.float64) * torch.linspace(0.1, 5, 64)[:, None, None]
              + torch.linspace(-3, 3, 64)[:, None, None])
    mean, variance = strip_decode.group_statistics(values.to(torch.bfloat16), groups=8)
    grouped = values.to(torch.bfloat16).double().reshape(2, 8, -1)
    assert mean.dtype == variance.dtype == torch.float32 and mean.shape == (2, 8)
    assert torch.allclose(mean.double(), grouped.mean(-1), atol=1e-5)
    assert torch.allclose(variance.double(), grouped.var(-1, correction=0), rtol=1e-5)


def test_half_precision_decodes_go_through_strips_and_fp32_through_diffusers(sd1_file, monkeypatch):
    fast, exact = load_checkpoint(sd1_file, dtype="bf16").vae, load_checkpoint(sd1_file).vae
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    calls = []
    real = strip_decode.up_path_in_strips
    monkeypatch.setattr(vae_ops, "up_path_in_strips", lambda *a: calls.append(1) or real(*a))
    fast_image, exact_image = vae_ops.decode(fast, latents), vae_ops.decode(exact, latents)
    assert len(calls) == 1   # the bf16 decode only
    with torch.inference_mode():
        reference = ((exact.decode(latents / exact.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.equal(exact_image, reference)   # the fp32 reference path is diffusers' own forward
    assert psnr(fast_image, exact_image, peak=1) >= 30
