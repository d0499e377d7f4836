"""Winograd convolutions of the CPU fast paths (bf16 F(2×2, 3×3), fp32 F(4×4, 3×3)): the algebra, the compiled
transforms against torch's convolution, the cases left to torch, and the UNets and VAEs that use them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdstudio.models import native, winograd
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.winograd import (WinogradConv2d, unfolded_conv2d, use_winograd_convolutions, winograd_applies,
                                      winograd_conv2d, winograd_matrices)
from tests.helpers import needs_native_bf16

pytestmark = pytest.mark.usefixtures("fast_kernels")   # whatever this machine chose (models/tuning.py)


@pytest.fixture(autouse=True)
def narrow_layers(monkeypatch):
    """The layers here are narrower than MIN_CHANNELS (the width where Winograd pays on these cores)."""
    for dtype in winograd.OUTPUT_TILES:
        monkeypatch.setitem(winograd.MIN_CHANNELS, dtype, winograd.CHANNEL_BLOCK)


# how many times the direct convolution's rounding error Winograd's may be: F(4×4)'s transforms (fp32) round larger
# values than F(2×2)'s (bf16)
ERROR_FACTOR = {torch.bfloat16: 4, torch.float32: 10}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.mark.parametrize("m,points", [(2, (0.0, 1.0, -1.0)), (4, (0.0, 1.0, -1.0, 0.5, -2.0))])
def test_the_matrices_compute_a_correlation(m, points):
    a_t, g, b_t = winograd_matrices(m, points)
    torch.manual_seed(0)
    d, taps = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([d[i:i + 3] @ taps for i in range(m)])
    assert torch.allclose(a_t @ ((g @ taps) * (b_t @ d)), expected, atol=1e-12)


def conv_case(batch, channels, out_channels, height, width, bias=True, dtype=torch.bfloat16):
    torch.manual_seed(1)
    x = torch.randn(batch, channels, height, width).to(dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1, bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            conv.bias.normal_()
    return x, conv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,bias", [((2, 64, 32, 32, 48), True), ((1, 32, 16, 7, 9), False),
                                        ((3, 16, 32, 5, 33), True)])
def test_winograd_matches_the_convolution_within_its_dtypes_rounding(shape, bias, dtype):
    batch, channels, out_channels, height, width = shape
    x, conv = conv_case(batch, channels, out_channels, height, width, bias, dtype)
    with torch.inference_mode():
        exact = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                         padding=1)
        direct = conv(x)
        fast = winograd_conv2d(x, conv.weight, conv.bias)
    assert fast.shape == exact.shape and fast.dtype == dtype
    assert fast.is_contiguous(memory_format=torch.channels_last)
    # odd sizes: the last tiles hang over the edge; a wrong border or bias shows as a large error
    assert relative_error(fast, exact) < ERROR_FACTOR[dtype] * relative_error(direct, exact) < 0.03


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [3, 4, 9])   # one and two output rows; an odd count
def test_a_strip_with_its_halo_rows_convolves_without_row_padding(rows, dtype):
    x, conv = conv_case(2, 32, 48, rows, 21, dtype=dtype)
    with torch.inference_mode():
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=(0, 1))
        direct = F.conv2d(x, conv.weight, conv.bias, padding=(0, 1))
        fast = winograd_conv2d(x, conv.weight, conv.bias, row_padding=0)
    assert fast.shape == exact.shape == (2, 48, rows - 2, 21)
    assert relative_error(fast, exact) < ERROR_FACTOR[dtype] * relative_error(direct, exact) < 0.03


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_passes_over_parts_of_the_tiles_and_channels_give_the_same_bits(monkeypatch, dtype):
    x, conv = conv_case(2, 64, 80, 19, 23, dtype=dtype)
    points = (winograd.OUTPUT_TILES[dtype] + 2) ** 2
    with torch.inference_mode():
        whole = winograd_conv2d(x, conv.weight, conv.bias)
        # 40 tiles and 32 channels per pass
        monkeypatch.setitem(winograd.CHUNK_BYTES, dtype, points * 64 * dtype.itemsize * 40)
        parts = winograd_conv2d(x, conv.weight, conv.bias)
    assert torch.equal(parts, whole)


def test_only_plain_bf16_and_fp32_inference_convolutions_with_enough_tiles_apply(monkeypatch):
    x, conv = conv_case(2, 32, 32, 32, 32)
    with torch.inference_mode():
        assert winograd_applies(conv, x)
        assert not winograd_applies(conv, x[:, :, :8, :8])             # 32 tiles < MIN_TILES
        assert not winograd_applies(conv, x[:, :, :12, :12])           # 72 bf16 tiles (2×2 outputs each)
        assert winograd_applies(conv.float(), x.float())
        assert winograd_applies(conv, x.float()[:, :, :12, :12])       # 18 fp32 tiles (4×4 outputs each)
        assert not winograd_applies(conv, x.float()[:, :, :8, :8])     # 8
        assert not winograd_applies(conv.half(), x.half())
        conv.bfloat16()
        strided = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1).bfloat16()
        odd = torch.nn.Conv2d(32, 24, 3, padding=1).bfloat16()           # 24 channels: not whole blocks of 16
        assert not winograd_applies(strided, x) and not winograd_applies(odd, x)
        monkeypatch.setitem(winograd.MIN_CHANNELS, torch.bfloat16, 48)
        assert not winograd_applies(conv, x)                             # 32 channels in < MIN_CHANNELS
        monkeypatch.setitem(winograd.MIN_CHANNELS, torch.bfloat16, 32)
    assert not winograd_applies(conv.bfloat16(), x)                      # gradients on: torch's own
    monkeypatch.setitem(winograd.MIN_TILES, torch.bfloat16, 1)
    with torch.inference_mode():
        assert winograd_applies(conv, x[:, :, :8, :8])


def test_a_module_runs_winograd_and_follows_a_patched_weight():
    x, conv = conv_case(2, 32, 32, 32, 32)
    use_winograd_convolutions(torch.nn.Sequential(conv))
    assert type(conv) is WinogradConv2d
    with torch.inference_mode():
        before = conv(x)
        assert torch.equal(before, winograd_conv2d(x, conv.weight, conv.bias))
        conv.weight.data = conv.weight.data * 2          # what the LoRA weight patcher does
        after = conv(x)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert relative_error(after, exact) < 0.03 and relative_error(before, exact) > 0.2


@pytest.mark.parametrize("batch,channels,out_channels,height,width,bias", [(2, 48, 32, 8, 8, True),
                                                                        (1, 64, 16, 5, 7, False)])
def test_the_unfolded_product_is_the_convolution(batch, channels, out_channels, height, width, bias):
    x, conv = conv_case(batch, channels, out_channels, height, width)
    b = conv.bias if bias else None
    with torch.inference_mode():
        out = unfolded_conv2d(x, conv.weight, b)
        direct = F.conv2d(x, conv.weight, b, padding=1)
    exact = F.conv2d(x.double(), conv.weight.double(), None if b is None else b.double(), padding=1)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, exact) <= 1.5 * relative_error(direct, exact)


@pytest.mark.parametrize("pays", [True, False])
def test_small_images_take_the_unfolded_product_where_it_was_measured_faster(monkeypatch, pays):
    x, conv = conv_case(2, 32, 32, 8, 8)   # 32 tiles: too few for Winograd
    use_winograd_convolutions(torch.nn.Sequential(conv))
    measured = []
    monkeypatch.setattr(winograd, "unfolded_pays", lambda *shape: measured.append(shape) or pays)
    with torch.inference_mode():
        out = conv(x)
        unfolded, direct = unfolded_conv2d(x, conv.weight, conv.bias), F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert measured == [(2, 32, 32, 8, 8)]
        assert torch.equal(out, unfolded if pays else direct)
        monkeypatch.setitem(winograd.MIN_CHANNELS, torch.bfloat16, 48)   # narrower: direct, not even measured
        assert torch.equal(conv(x), direct) and len(measured) == 1


def test_without_a_compiler_convolutions_run_direct(tmp_path, monkeypatch):
    x, conv = conv_case(2, 32, 32, 32, 32)
    monkeypatch.setenv("SDSTUDIO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    winograd._kernels.cache_clear()
    try:
        with torch.inference_mode():
            assert not winograd_applies(conv, x)
            use_winograd_convolutions(torch.nn.Sequential(conv))
            assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    finally:
        winograd._kernels.cache_clear()
    assert not list(tmp_path.glob("*.so"))


def test_the_transforms_are_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSTUDIO_KERNEL_CACHE", str(tmp_path))
    winograd._kernels.cache_clear()
    try:
        assert winograd._kernels() is not None
        built = list(tmp_path.glob("winograd-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        winograd._kernels.cache_clear()
        assert winograd._kernels() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        winograd._kernels.cache_clear()


@needs_native_bf16
def test_a_bf16_unet_uses_winograd_close_to_its_direct_convolutions(sd1_file, monkeypatch):
    unet = load_checkpoint(sd1_file, dtype=torch.bfloat16).unet
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(type(m) is WinogradConv2d for m in convs)
    assert not any(type(m) is WinogradConv2d for m in load_checkpoint(sd1_file).unet.modules())   # fp32: exact
    monkeypatch.setitem(winograd.MIN_TILES, torch.bfloat16, 1)    # the tiny UNet's latents are a few tiles
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16).bfloat16()
    context = torch.randn(2, 77, unet.config.cross_attention_dim).bfloat16()
    used = []
    hooks = [conv.register_forward_hook(lambda module, args, out: used.append(winograd_applies(module, args[0])))
             for conv in convs if conv.kernel_size == (3, 3)]
    with torch.inference_mode():
        fast = unet(latents, 10, encoder_hidden_states=context).sample
        assert not native._buffers()               # released after the call
        for hook in hooks:
            hook.remove()
        for conv in convs:
            conv.__class__ = torch.nn.Conv2d
        direct = unet(latents, 10, encoder_hidden_states=context).sample
    assert sum(used) >= len(used) // 2    # all but the latent-channel and downsampling convolutions
    assert relative_error(fast, direct) < 0.05


@needs_native_bf16
def test_a_bf16_vae_uses_winograd_and_its_decode_and_encode_release_the_buffers(sd1_file, monkeypatch):
    from sdstudio.models import vae as vae_ops
    from tests.helpers import psnr

    vae = load_checkpoint(sd1_file, dtype=torch.bfloat16).vae
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(type(m) is WinogradConv2d for m in convs)
    assert not any(type(m) is WinogradConv2d for m in load_checkpoint(sd1_file).vae.modules())   # fp32: exact
    monkeypatch.setitem(winograd.MIN_TILES, torch.bfloat16, 1)
    latents = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(5))
    images = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(6))
    used = []
    real = winograd.winograd_conv2d
    monkeypatch.setattr(winograd, "winograd_conv2d", lambda *a, **k: used.append(1) or real(*a, **k))

    def run() -> list[torch.Tensor]:
        out = []
        for work in (lambda: vae_ops.decode(vae, latents, tiled=True, tile=8, overlap=4),
                     lambda: vae_ops.encode(vae, images, sample=False)):
            out.append(work())
            assert not native._buffers()
        return out

    fast = run()
    assert used   # the tiled decode's and the encoder's modules (the strips call winograd_conv2d themselves)
    for conv in convs:
        conv.__class__ = torch.nn.Conv2d
    direct = run()
    assert psnr(fast[0], direct[0], peak=1) >= 35
    assert psnr(fast[1], direct[1], peak=direct[1].abs().max().item()) >= 35


def test_the_fast_fp32_path_runs_winograd_and_fused_layers_near_the_exact_fp32_path(sd1_file, tmp_path, monkeypatch):
    """`--precision auto` on a CPU without native bf16 math: fp32 with channels-last weights, F(4×4) Winograd and the
    fused layers; UNet and decode within fp32 rounding of the exact path, which keeps torch's own layers."""
    from sdstudio import synthetic
    from sdstudio.models import vae as vae_ops
    from sdstudio.models.attention import FastCPUAttention
    from sdstudio.models.fused import FusedGEGLU
    from tests.helpers import psnr

    monkeypatch.setitem(winograd.MIN_TILES, torch.float32, 1)   # the tiny model's latents are a few tiles
    exact, fast = load_checkpoint(sd1_file), load_checkpoint(sd1_file, fast_fp32=True)
    assert fast.fast_fp32 and not exact.fast_fp32 and fast.dtype == exact.dtype == torch.float32
    for kind in (WinogradConv2d, FusedGEGLU):
        assert any(type(m) is kind for m in fast.unet.modules())
        assert not any(type(m) is kind for m in exact.unet.modules())
    assert any(type(m) is WinogradConv2d for m in fast.vae.modules())
    processors = [{type(p) for p in m.unet.attn_processors.values()} for m in (exact, fast)]
    assert FastCPUAttention not in processors[0] and processors[1] == {FastCPUAttention}   # its CFG saving
    convs = [m for m in fast.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    used = []
    for conv in convs:
        conv.register_forward_hook(lambda module, args, out: used.append(winograd_applies(module, args[0])))
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, fast.unet.config.cross_attention_dim)
    with torch.inference_mode():
        outputs = [m.unet(latents, 10, encoder_hidden_states=context).sample for m in (exact, fast)]
    assert sum(used) >= len(used) // 2 and not native._buffers()
    assert 0 < relative_error(outputs[1], outputs[0]) < 1e-4
    in_strips = []
    strips = vae_ops.up_path_in_strips
    monkeypatch.setattr(vae_ops, "up_path_in_strips", lambda *args: in_strips.append(1) or strips(*args))
    decoded = [vae_ops.decode(m.vae, latents[:1]) for m in (exact, fast)]
    assert psnr(decoded[1], decoded[0], peak=1) >= 60
    assert in_strips == [1]   # the fast decode runs in strips (less memory), the exact one diffusers' own forward
    vae_ops.swap_vae(fast, synthetic.write_vae(tmp_path / "external.safetensors", seed=7))   # keeps the path
    assert any(type(m) is WinogradConv2d for m in fast.vae.modules())
