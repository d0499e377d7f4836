"""`--precision int8`'s 3×3 convolutions: Winograd F(2×2) with its 16 products in int8, against fp64 references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdstudio.files.readers import is_file_mapped, read_state_dict
from sdstudio.files.writers import save_safetensors
from sdstudio.models import int8_winograd
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.int8_winograd import (Int8WinogradConv2d, int8_convolution_weight_names, int8_winograd_conv2d,
                                           pack_winograd_weight)
from sdstudio.models.patcher import Patch, WeightPatcher
from sdstudio.models.winograd import INTERPOLATION_POINTS, WinogradConv2d, winograd_matrices
from tests.helpers import needs_native_bf16, resident_kib

pytestmark = pytest.mark.usefixtures("fast_kernels")   # int8 in use whatever this machine chose (models/tuning.py)
# the dtypes int8 layers compute beside: bf16 (the bf16 fast path: where the CPU has bf16 math) and fp32 (the fast fp32
# path); the weight as the file's (fp16) or converted
each_fast_path = pytest.mark.parametrize("dtype,weight_dtype", [
    pytest.param(torch.bfloat16, torch.bfloat16, marks=needs_native_bf16),
    pytest.param(torch.bfloat16, torch.float16, marks=needs_native_bf16),
    (torch.float32, torch.float16), (torch.float32, torch.float32)])


@pytest.fixture(autouse=True)
def narrow_layers(monkeypatch):
    """The layers here are narrower than MIN_CHANNELS (the width where the UNet's convolutions start)."""
    monkeypatch.setattr(int8_winograd, "MIN_CHANNELS", 16)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def convolution(channels_in: int, channels_out: int, dtype: torch.dtype, weight_dtype: torch.dtype,
                bias: bool = True) -> Int8WinogradConv2d:
    """An Int8WinogradConv2d computing in `dtype`, its weight in `weight_dtype` (an int8 load keeps an fp16 file's)."""
    conv = torch.nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen(1)) / (9 * channels_in) ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(channels_out, generator=gen(2)) * 0.1)
    conv = conv.to(dtype)
    conv.weight.data = conv.weight.data.to(weight_dtype)
    conv.__class__ = Int8WinogradConv2d
    return conv


def activations(batch: int, channels: int, height: int, width: int, dtype: torch.dtype, seed: int = 3) -> torch.Tensor:
    """What a UNet's 3×3 convolutions read: SiLU of a normalised input, channels-last."""
    x = F.silu(torch.randn(batch, channels, height, width, generator=gen(seed)))
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def exact_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=1)


def float_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's float code (what runs where int8 does not apply)."""
    return WinogradConv2d.forward(conv, x)


@each_fast_path
@pytest.mark.parametrize("batch,channels_in,channels_out,height,width,bias", [
    (2, 64, 48, 16, 16, True), (1, 32, 32, 19, 23, False), (2, 16, 64, 5, 3, True)])   # odd sides: partial tiles
def test_an_int8_winograd_convolution_is_close_to_fp64_and_less_exact_than_the_float_one(
        batch, channels_in, channels_out, height, width, bias, dtype, weight_dtype):
    conv = convolution(channels_in, channels_out, dtype, weight_dtype, bias)
    x = activations(batch, channels_in, height, width, dtype)
    with torch.inference_mode():
        out = conv(x)
        plain = float_conv(conv, x)
    exact = exact_conv(conv, x)
    assert hasattr(conv, "_int8")                                  # the int8 products ran
    assert out.dtype == dtype and out.shape == exact.shape and out.is_contiguous(memory_format=torch.channels_last)
    error, plain_error = relative_error(out, exact), relative_error(plain, exact)
    # bf16 ~0.015 (F(2×2) in bf16 0.005); fp32 with 7-bit weights where the CPU lacks VNNI (int8.weight_limit)
    assert error < 0.03 and error > 1.5 * plain_error, (error, plain_error)


@each_fast_path
def test_each_tile_quantizes_over_its_own_range(monkeypatch, dtype, weight_dtype):
    conv = convolution(32, 32, dtype, weight_dtype)
    x = activations(2, 32, 12, 14, dtype)
    x[1] *= 8                                                      # the second image's range is 8× the first's
    with torch.inference_mode():
        alone = conv(x[:1])
        whole = conv(x)
        monkeypatch.setattr(int8_winograd, "CHUNK_BYTES", 16 * 32 * 5)   # 5 tiles per pass
        parts = conv(x)
    # the first image's tiles quantize the same beside the wider second one, and in passes of 5 tiles
    assert torch.equal(whole[:1], alone) and torch.equal(parts, whole)
    assert relative_error(whole, exact_conv(conv, x)) < 0.03


@each_fast_path
def test_a_spike_coarsens_only_the_tiles_that_read_it(dtype, weight_dtype):
    conv = convolution(32, 16, dtype, weight_dtype)
    x = activations(1, 32, 12, 12, dtype)
    spiked = x.clone()
    spiked[0, 5, 5, 5] = 500.0            # read by the tiles of output rows and columns 4–7 (inputs 3–8)
    with torch.inference_mode():
        out, out_spiked = conv(x), conv(spiked)
    assert hasattr(conv, "_int8")
    untouched = torch.ones(12, 12, dtype=torch.bool)
    untouched[4:8, 4:8] = False
    assert torch.equal(out[..., untouched], out_spiked[..., untouched])
    assert relative_error(out_spiked, exact_conv(conv, spiked)) < 0.03


def test_transformed_inputs_quantize_to_their_nearest_step():
    """The input pass: position p of tile t's transform Bᵀ·d·B as round(value / scale), scale = the largest |value|
    at p over t's channels / 127; for the outlier check, per position the sum over the tiles of that largest |value|
    and the sum of every |value| (checked against the transforms computed here in fp64 from the same Bᵀ, on tiles
    2–6 of a 3×3 grid)."""
    x = activations(1, 16, 6, 6, torch.float32)
    kernels, threads = int8_winograd._kernels(torch.float32), torch.get_num_threads()
    v, tile_scales, summary = torch.empty(16, 5, 16, dtype=torch.int8), torch.empty(16, 5), torch.empty(2, 16)
    work = torch.empty(threads, 16, 16)
    kernels.input_transform_s8(x.data_ptr(), v.data_ptr(), tile_scales.data_ptr(), summary.data_ptr(),
                               work.data_ptr(), 1, 6, 6, 16, 1, 3, 3, 2, 5, threads)
    _, _, b_t = winograd_matrices(2, INTERPOLATION_POINTS[2])
    padded = F.pad(x.double(), (1, 1, 1, 1))[0]                   # (16, 8, 8)
    tiles = padded.unfold(1, 4, 2).unfold(2, 4, 2)                 # (16, 3, 3, 4, 4)
    transformed = torch.einsum("ia,cyxab,jb->ijyxc", b_t, tiles, b_t).reshape(16, 9, 16)[:, 2:7]
    largest = transformed.abs().amax(2)
    assert torch.allclose(tile_scales.double(), largest / 127, rtol=1e-5)
    assert torch.allclose(summary[0].double(), largest.sum(1), rtol=1e-5)
    assert torch.allclose(summary[1].double(), transformed.abs().sum((1, 2)), rtol=1e-5)
    steps = transformed / tile_scales.double()[..., None]
    assert (v.double() - steps).abs().max() <= 0.5 + 1e-4
    assert v.abs().amax(2).eq(127).all()                          # each tile's range at each position used


def test_packed_weights_are_the_transformed_filters_to_their_nearest_step():
    weight = torch.randn(40, 32, 3, 3, generator=gen(4)).half()
    packed = pack_winograd_weight(weight, torch.float32)
    _, g, _ = winograd_matrices(2, INTERPOLATION_POINTS[2])
    transformed = torch.einsum("ak,oikl,bl->aboi", g, weight.double(), g).reshape(16, 40, 32)
    assert packed.values.dtype == torch.int8 and packed.values.shape == (16, 40, 32)
    back = packed.values.double() * packed.scales.double()[..., None]
    assert (back - transformed).abs().max() <= packed.scales.max() / 2 + 1e-6
    assert packed.values.abs().amax(2).eq(int8_winograd.weight_limit()).all()   # every row's range used


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16), torch.float32])
def test_an_input_whose_tiles_an_outlier_channel_dominates_runs_its_float_code(dtype):
    conv = convolution(128, 16, dtype, dtype)
    x = activations(1, 128, 8, 8, dtype)
    x[0, 5] *= 1000                                # one channel 1000× the rest in every tile: the rest get ~no steps
    with torch.inference_mode():
        packed = pack_winograd_weight(conv.weight, dtype)
        assert int8_winograd_conv2d(x, packed, conv.bias) is None
        out = conv(x)
        assert torch.equal(out, float_conv(conv, x))
        x[0, 5] /= 1000
        assert int8_winograd_conv2d(x, packed, conv.bias) is not None


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16), torch.float32])
def test_a_nan_input_passes_through_as_nan_for_the_pipeline_to_report(dtype):
    conv = convolution(16, 16, dtype, dtype)
    x = activations(2, 16, 6, 6, dtype)
    x[1, 2, 2, 2] = float("nan")
    with torch.inference_mode():
        out = conv(x)
    assert out[1].isnan().any() and not out[0].isnan().any()


def test_with_gradients_or_another_kernel_size_it_is_the_plain_convolution():
    conv = convolution(16, 16, torch.float32, torch.float32)
    x = activations(1, 16, 6, 6, torch.float32)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) and not hasattr(conv, "_int8")
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1),
                                torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.Conv2d(16, 8, 3, padding=1))
    int8_winograd.use_int8_convolutions(model, torch.float32)
    assert [type(m) for m in model] == [Int8WinogradConv2d, torch.nn.Conv2d, torch.nn.Conv2d, torch.nn.Conv2d]


@each_fast_path
def test_a_patched_weight_is_packed_again_and_restoring_gives_the_first_output_back(dtype, weight_dtype):
    conv = convolution(32, 32, dtype, weight_dtype)
    x = activations(2, 32, 8, 8, dtype)
    patcher = WeightPatcher({"weight": conv.weight})
    delta = torch.randn(conv.weight.shape, generator=gen(5)) * 0.05
    with torch.inference_mode():
        before = conv(x)
        patcher.set_patches({"weight": [Patch("lora", 1.0, lambda w: delta)]})
        patched, exact = conv(x), exact_conv(conv, x)
        patcher.restore()
        after = conv(x)
    assert relative_error(patched, exact) < 0.045 and relative_error(before, exact) > 0.1
    assert torch.equal(after, before)


def test_packing_a_file_mapped_weight_gives_its_pages_back_to_the_page_cache(tmp_path):
    path = tmp_path / "conv.safetensors"
    weight = torch.randn(512, 1024, 3, 3, generator=gen(6)) / 96
    save_safetensors({"weight": weight.half()}, path)
    conv = convolution(1024, 512, torch.float32, torch.float32, bias=False)
    conv.weight.data = read_state_dict(path)["weight"]            # 9 MiB of fp16, a view of the mapped file
    assert float(conv.weight.detach().float().abs().sum()) > 0 and resident_kib(path) > 8000   # all read
    x = activations(1, 1024, 8, 8, torch.float32)
    with torch.inference_mode():
        out = conv(x)
    assert resident_kib(path) < 500                                 # only the packed copy stays in memory
    assert relative_error(out, F.conv2d(x.double(), weight.half().double(), padding=1)) < 0.045
    with torch.inference_mode():
        assert torch.equal(conv(x), out)                            # packed once; the file's pages are not needed


@pytest.mark.parametrize("dtype,options", [
    pytest.param(torch.bfloat16, {"dtype": torch.bfloat16}, marks=needs_native_bf16),
    (torch.float32, {"dtype": torch.float32, "fast_fp32": True})])
def test_an_int8_load_runs_its_3x3_convolutions_in_int8_from_the_files_weights(synth_file, dtype, options):
    source = synth_file("sd1", "fp16")
    plain = load_checkpoint(source, **options).unet
    quick = load_checkpoint(source, **options, int8_linears=True).unet
    reference = load_checkpoint(source).unet
    kinds = {name: type(m) for name, m in quick.named_modules()}
    converted = {n for n, k in kinds.items() if k is Int8WinogradConv2d}
    assert converted == {n for n, m in plain.named_modules() if type(m) is WinogradConv2d and m.kernel_size == (3, 3)
                         and m.stride == (1, 1) and m.in_channels % 16 == 0 and m.out_channels % 16 == 0}
    assert converted and kinds["conv_in"] is kinds["conv_out"] is kinds["down_blocks.0.downsamplers.0.conv"] is (
        WinogradConv2d)                                   # 4 channels in, 4 out, stride 2
    weights = dict(quick.named_parameters())
    names = int8_convolution_weight_names(quick, dtype)
    assert names == {f"{n}.weight" for n in converted}
    assert all(weights[n].dtype == torch.float16 and is_file_mapped(weights[n]) for n in names)
    assert not any(hasattr(quick.get_submodule(n), "_int8") for n in converted)   # the load packs nothing
    sample = torch.randn(2, 4, 32, 32, generator=gen(7))
    context = torch.randn(2, 77, reference.config.cross_attention_dim, generator=gen(8))
    with torch.inference_mode():
        exact = reference(sample, 500, context).sample
        fast, int8 = (u(sample.to(dtype), 500, context.to(dtype)).sample for u in (plain, quick))
    assert all(hasattr(quick.get_submodule(n), "_int8") for n in converted)
    assert int8.dtype == dtype and not torch.equal(int8, fast)
    # bf16 0.061, fast fp32 0.056 (with 7-bit weights, as CPUs without VNNI take them: 0.072); the linears alone 0.043
    # to 0.053 (test_int8.py)
    assert relative_error(int8, exact) < 0.085, relative_error(int8, exact)
