"""The fast fp32 path's weights kept in a half-precision file's dtype: exactly the arithmetic of fp32 copies."""
from __future__ import annotations

import pytest
import torch

from sdstudio import pipeline
from sdstudio.models import half_weights, winograd
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.converted import ConvertedWeights
from sdstudio.models.half_weights import HALF_TYPES, WIDENED_LAYERS, widened
from sdstudio.models.winograd import WinogradConv2d, winograd_conv2d

TINY_KEPT_MIN = 1024   # the tiny model's layers are small: the rule's threshold scaled down with them


@pytest.fixture()
def tiny_widths(monkeypatch):
    """The fast fp32 path's Winograd and kept 16-bit weights on the tiny model's layer widths and latents."""
    monkeypatch.setitem(winograd.MIN_CHANNELS, torch.float32, winograd.CHANNEL_BLOCK)
    monkeypatch.setitem(winograd.MIN_TILES, torch.float32, 1)
    monkeypatch.setattr(winograd, "winograd_pays", lambda dtype: True)
    monkeypatch.setattr(half_weights, "HALF_KEPT_MIN", TINY_KEPT_MIN)


def networks(model):
    return [model.unet, model.vae] + [e.model for e in model.text_encoders]


def test_widened_is_the_weight_in_fp32_in_its_own_layout():
    weight = torch.randn(8, 16, 3, 3).half().contiguous(memory_format=torch.channels_last)
    wide = widened(weight)
    assert wide.dtype == torch.float32 and torch.equal(wide, weight.float())
    assert wide.is_contiguous(memory_format=torch.channels_last)
    linear = torch.randn(6, 5).bfloat16()
    assert torch.equal(widened(linear), linear.float()) and widened(linear).is_contiguous()
    fp32 = torch.randn(3, 4)
    assert widened(fp32) is fp32


@pytest.mark.skipif(winograd._kernels(torch.float32) is None, reason="the fp32 Winograd transforms need a C compiler")
@pytest.mark.parametrize("weight_dtype", HALF_TYPES)
def test_winograd_reads_a_16_bit_weight_exactly_as_its_fp32_copy(weight_dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 11).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(48, 32, 3, 3) * 0.1).to(weight_dtype)
    special = [0.0, -0.0, 6e-8, -3e-7, 6.1e-5, 65504.0, -2.0 ** -14] if weight_dtype == torch.float16 else [
        0.0, -0.0, 1e-39, 1e20]   # fp16: subnormals, the smallest normal, the largest; bf16: a subnormal, a big one
    weight.view(-1)[:len(special)] = torch.tensor(special).to(weight_dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(48)
    with torch.inference_mode():
        half, wide = (winograd_conv2d(x, w, bias) for w in (weight, weight.float()))
    assert torch.isfinite(half).all() and torch.equal(half, wide)


def test_a_half_precision_files_weights_stay_16_bit_and_compute_exactly_as_fp32_copies(synth_file, tiny_widths,
                                                                                         monkeypatch, tmp_path):
    source = synth_file("sd1", "fp16")
    cache = ConvertedWeights(tmp_path / "converted")
    kept = load_checkpoint(source, fast_fp32=True, converted=cache)
    cache.wait()
    monkeypatch.setattr(half_weights, "HALF_KEPT_MIN", 1 << 62)   # every weight fp32: the same path's fp32 copies
    wide = load_checkpoint(source, fast_fp32=True)
    half_count = 0
    for network in networks(kept):
        assert network.dtype == torch.float32   # what the pipeline computes in
        for module in network.modules():
            for name, param in module.named_parameters(recurse=False):
                big_layer_weight = (isinstance(module, WIDENED_LAYERS) and name == "weight"
                                    and param.numel() >= TINY_KEPT_MIN and param is not next(network.parameters()))
                assert param.dtype == (torch.float16 if big_layer_weight else torch.float32), (module, name)
                half_count += big_layer_weight
    assert half_count > 100
    assert all(p.dtype == torch.float32 for network in networks(wide) for p in network.parameters())
    assert any(type(m) is WinogradConv2d and m.weight.dtype == torch.float16 for m in kept.unet.modules())

    torch.manual_seed(0)
    latents, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, kept.unet.config.cross_attention_dim)
    with torch.inference_mode():
        outputs = [m.unet(latents, 10, encoder_hidden_states=context).sample for m in (kept, wide)]
    assert torch.equal(outputs[0], outputs[1])
    images = [pipeline.txt2img(m, prompt="a cat", negative_prompt="blurry", seed=3, width=64, height=64, steps=3,
                               save=False).images[0] for m in (kept, wide)]
    assert images[0].tobytes() == images[1].tobytes()
    edited = [pipeline.img2img(m, prompt="a cat", init_images=[images[0]], denoising_strength=0.6, seed=2, width=64,
                               height=64, steps=3, save=False).images[0] for m in (kept, wide)]   # the VAE's encoder
    assert edited[0].tobytes() == edited[1].tobytes() != images[0].tobytes()

    monkeypatch.setattr(half_weights, "HALF_KEPT_MIN", TINY_KEPT_MIN)
    again = load_checkpoint(source, fast_fp32=True, converted=cache)    # from the converted-weights cache
    assert len(list(cache.folder.glob("*.safetensors"))) == 1
    for first, second in zip(networks(kept), networks(again)):
        assert all(a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
                   for a, b in zip(first.state_dict().values(), second.state_dict().values()))
