"""`--precision int8`: the UNet transformers' linears as oneDNN u8 × s8 products, against fp64 references."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from sdstudio.files.readers import is_file_mapped, read_state_dict
from sdstudio.files.writers import save_safetensors
from sdstudio.models.checkpoint import load_checkpoint
from sdstudio.models.fused import FusedGEGLU
from sdstudio.models.half_weights import WideningLinear
from sdstudio.models.converted import ConvertedWeights
from sdstudio.models import int8
from sdstudio.models.int8 import (Int8GEGLU, Int8Linear, calibrating, calibration_name, finish_int8_calibration,
                                 int8_calibration, int8_linear, int8_weight_names, pack_weight, quantize_rows,
                                 use_int8_linears, weight_limit)
from sdstudio.models.patcher import Patch, WeightPatcher
from tests.helpers import needs_native_bf16, resident_kib

pytestmark = pytest.mark.usefixtures("fast_kernels")   # int8 in use whatever this machine chose (models/tuning.py)
# the dtypes int8 layers compute beside: bf16 (the bf16 fast path) and fp32 (the fast fp32 path, CPUs without bf16 math)
FAST_DTYPES = [torch.bfloat16, torch.float32]
# load_checkpoint's options of each CPU fast path an int8 UNet builds on; bf16's only where the CPU has bf16 math
FAST_PATHS = {torch.bfloat16: {"dtype": torch.bfloat16}, torch.float32: {"dtype": torch.float32, "fast_fp32": True}}
# a fast path's float linears: torch's, or widening a 16-bit weight for an fp32 input (models/half_weights.py)
PLAIN_LINEARS = (torch.nn.Linear, WideningLinear)
each_fast_path = pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16),
                                                   torch.float32])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear(features_in: int, features_out: int, bias: bool = True, weight_dtype: torch.dtype | None = None,
           dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
    """An Int8Linear in `dtype`, its weight in `weight_dtype` (default `dtype`; an int8 load keeps an fp16 file's
    weights fp16)."""
    layer = torch.nn.Linear(features_in, features_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(features_out, features_in, generator=gen(1)) / features_in ** 0.5)
        if bias:
            layer.bias.copy_(torch.randn(features_out, generator=gen(2)))
    layer.__class__ = Int8Linear
    layer = layer.to(dtype)
    layer.weight.data = layer.weight.data.to(weight_dtype or dtype)
    return layer


@pytest.mark.parametrize("dtype", FAST_DTYPES)
@pytest.mark.parametrize("low,high", [(-3.0, 5.0), (0.5, 2.0), (-4.0, -1.0)])
def test_activations_quantize_over_their_range_with_zero_exact(low, high, dtype):
    x = (torch.rand(64, 48, generator=gen(0)) * (high - low) + low).to(dtype)
    x[0, 0] = 0
    q = quantize_rows(x)
    assert q.values.dtype == torch.uint8 and q.values.shape == x.shape and q.dtype == dtype
    assert q.values[0, 0].item() == q.zero_point                     # 0 stays exactly 0
    span = max(high, 0) - min(low, 0)
    assert q.scale == pytest.approx(span / 255, rel=0.02)
    back = (q.values.float() - q.zero_point) * q.scale
    assert (back - x.float()).abs().max().item() <= q.scale / 2 + 1e-6
    assert q.values.min().item() <= 1 or q.values.max().item() >= 254   # the range is used, not wasted


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, None), (torch.float32, None),
                                                (torch.float32, torch.float16)])   # fast fp32 from an fp16 file
@pytest.mark.parametrize("rows,features_in,features_out,bias", [(300, 320, 640, True), (77, 64, 48, False)])
def test_an_int8_linear_is_close_to_fp64_and_less_exact_than_its_dtypes(rows, features_in, features_out, bias, dtype,
                                                                        weight_dtype):
    layer = linear(features_in, features_out, bias, weight_dtype, dtype)
    x = torch.randn(2, rows, features_in, generator=gen(3)).to(dtype)
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.inference_mode():
        out = layer(x)
        plain = F.linear(x, layer.weight.to(dtype), layer.bias)
    assert out.dtype == dtype and out.shape == exact.shape
    assert hasattr(layer, "_int8")                                    # the int8 product ran
    error, plain_error = relative_error(out, exact), relative_error(plain, exact)
    assert error < 0.03 and error > 1.5 * plain_error, (error, plain_error)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                (torch.float32, torch.float16)])
def test_with_gradients_an_int8_linear_is_the_plain_linear(dtype, weight_dtype):
    layer = linear(64, 32, weight_dtype=weight_dtype, dtype=dtype)
    x = torch.randn(5, 64, generator=gen(4)).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and not hasattr(layer, "_int8")
    assert torch.equal(out, F.linear(x, layer.weight.to(dtype), layer.bias))


def test_without_gradients_a_fallback_widens_a_16_bit_weight_for_fp32():
    layer = linear(64, 32, weight_dtype=torch.float16, dtype=torch.float32)
    x = torch.randn(64, 64, generator=gen(4))
    x[0] *= 1000                   # one token's range swallows the rest's: the float code runs
    with torch.inference_mode():
        out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight.float(), layer.bias)) and layer.weight.dtype == torch.float16


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16), torch.float32])
def test_int8_geglu_matches_the_fp64_geglu(dtype):
    torch.manual_seed(0)
    module = GEGLU(96, 128).to(dtype)
    x = torch.randn(2, 200, 96, generator=gen(5)).to(dtype)
    value, gate = F.linear(x.double(), module.proj.weight.double(), module.proj.bias.double()).chunk(2, dim=-1)
    exact = value * F.gelu(gate)
    module.__class__ = Int8GEGLU
    with torch.inference_mode():
        out = module(x)
        module.__class__ = FusedGEGLU
        fused = module(x)
    assert out.shape == exact.shape and out.dtype == dtype
    error = relative_error(out, exact)
    assert error < 0.03 and error > 1.5 * relative_error(fused, exact), error


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                (torch.float32, torch.float16)])
def test_a_patched_weight_is_packed_again_and_restoring_gives_the_first_output_back(dtype, weight_dtype):
    layer = linear(128, 64, weight_dtype=weight_dtype, dtype=dtype)
    x = torch.randn(40, 128, generator=gen(6)).to(dtype)
    patcher = WeightPatcher({"weight": layer.weight})
    delta = torch.randn(64, 128, generator=gen(7)) * 0.2
    with torch.inference_mode():
        before = layer(x)
        patcher.set_patches({"weight": [Patch("lora", 1.0, lambda w: delta)]})
        patched = layer(x)
        exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        patcher.set_patches({"weight": [Patch("lora", 0.5, lambda w: delta)]})   # written into the same buffer
        half = layer(x)
        half_exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        patcher.restore()
        after = layer(x)
    assert relative_error(patched, exact) < 0.03 and relative_error(before, exact) > 0.1
    assert relative_error(half, half_exact) < 0.03 and relative_error(patched, half_exact) > 0.05
    assert torch.equal(after, before)


def test_int8_linear_takes_the_packed_weight_and_its_bias():
    weight = (torch.randn(16, 32, generator=gen(8)) / 6).bfloat16()
    bias = torch.randn(16, generator=gen(9)).bfloat16()
    x = torch.randn(10, 32, generator=gen(10)).bfloat16()
    out = int8_linear(quantize_rows(x), pack_weight(weight, bias), "gelu")
    assert relative_error(out, F.gelu(F.linear(x.double(), weight.double(), bias.double()))) < 0.03


def test_int8_products_add_their_integers_exactly_without_saturating():
    """Where the CPU adds u8 × s8 pairs in 16 bits (no VNNI), 8-bit weights would saturate: `weight_limit`."""
    levels = torch.randint(0, 256, (64, 256), generator=gen(40))
    levels[0, :2] = torch.tensor([0, 255])                        # the range 0 … 2.55: scale 0.01, zero point 0
    x = levels.float() * 0.01
    signs = torch.randint(0, 2, (32, 256), generator=gen(41)).float() * 2 - 1
    signs[:16] = 1                                                # all-positive rows: the largest sums
    q, packed = quantize_rows(x), pack_weight(signs / 2, None)   # every weight ±limit exactly
    assert q.zero_point == 0 and q.scale == pytest.approx(0.01)
    out = int8_linear(q, packed)
    exact = F.linear(levels.double() * q.scale, signs.double() / 2)
    assert out.dtype == torch.float32 and relative_error(out, exact) < 1e-5


@each_fast_path
def test_an_int8_unet_swaps_only_its_transformer_linears_and_stays_close(sd1_file, dtype):
    plain = load_checkpoint(sd1_file, **FAST_PATHS[dtype]).unet
    quick = load_checkpoint(sd1_file, **FAST_PATHS[dtype], int8_linears=True).unet
    reference = load_checkpoint(sd1_file).unet
    kinds = {name: type(m) for name, m in quick.named_modules()}
    assert {n for n, k in kinds.items() if k is Int8Linear} == {   # all but the text condition's keys and values
        n for n, m in plain.named_modules() if type(m) in PLAIN_LINEARS and ".transformer_blocks." in n
        and not re.search(r"\.attn2\.to_[kv]$", n)}
    assert any(n.endswith(".attn2.to_k") for n, k in kinds.items() if k in PLAIN_LINEARS)
    assert any(k is Int8GEGLU for k in kinds.values())
    projections = [n for n in kinds if re.search(r"\.attentions\.\d+\.proj_(in|out)$", n)]   # SD1's 1×1 convolutions
    assert projections and all(kinds[n] is type(dict(plain.named_modules())[n]) for n in projections)
    assert kinds["time_embedding.linear_1"] in PLAIN_LINEARS
    sample = torch.randn(2, 4, 32, 32, generator=gen(11))
    context = torch.randn(2, 77, reference.config.cross_attention_dim, generator=gen(12))
    with torch.inference_mode():
        exact = reference(sample, 500, context).sample
        fast, int8 = (u(sample.to(dtype), 500, context.to(dtype)).sample for u in (plain, quick))
    assert int8.dtype == dtype
    # bf16 0.043 (unsmoothed ~0.048; bf16 alone 0.017); fast fp32 with 7-bit weights (int8.weight_limit) 0.053
    assert relative_error(int8, exact) < 0.06 and not torch.equal(int8, fast)


@each_fast_path
def test_an_int8_unets_output_does_not_depend_on_what_ran_before(sd1_file, dtype):
    first, fresh = (load_checkpoint(sd1_file, **FAST_PATHS[dtype], int8_linears=True).unet for _ in range(2))
    sample = torch.randn(2, 4, 32, 32, generator=gen(31)).to(dtype)
    context = torch.randn(2, 77, first.config.cross_attention_dim, generator=gen(32)).to(dtype)
    other = torch.randn(2, 4, 16, 24, generator=gen(33)).to(dtype) * 5   # another size and range first
    with torch.inference_mode():
        first(other, 900, context * 3)
        assert torch.equal(first(sample, 500, context).sample, fresh(sample, 500, context).sample)


def uncalibrated(*_args):
    raise AssertionError("calibrated again: the kept calibration was not used")


def seeded_output(unet: torch.nn.Module, seed: int) -> torch.Tensor:
    """One CFG-sized call of an SD1 or SDXL UNet (SDXL's pooled text and size conditions too) on seeded inputs."""
    config, generator = unet.config, gen(seed)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    added = {}
    if config.addition_embed_type == "text_time":
        pooled = torch.randn(2, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,
                             generator=generator)
        added = {"added_cond_kwargs": {"text_embeds": pooled.to(unet.dtype),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(unet.dtype)}}
    with torch.inference_mode():
        return unet(sample.to(unet.dtype), 500, context.to(unet.dtype), **added).sample


@each_fast_path
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_an_int8_load_keeps_its_calibration_and_the_next_load_of_the_file_uses_it(synth_file, tmp_path, monkeypatch,
                                                                               family, dtype):
    """The calibration call before an int8 model's first use costs beyond its packing (a UNet call, about a second
    for SD1.5): the converted-weights folder keeps its activation maxima, and the next load gives them to its layers
    instead of calibrating, with the same output bit for bit."""
    source = synth_file(family, "fp16")
    cache = ConvertedWeights(tmp_path / "converted")
    first = load_checkpoint(source, **FAST_PATHS[dtype], int8_linears=True, converted=cache).unet
    assert not int8_calibration(first)                           # not the load's: the first call's
    expected = seeded_output(first, 34)
    cache.wait()
    measured = int8_calibration(first)
    layers = {n for n, m in first.named_modules() if type(m) in (Int8Linear, Int8GEGLU)
              and not n.endswith(".ff.net.0.proj")}              # (a GEGLU's linear: the GEGLU runs its weight)
    assert layers and measured.keys() == layers                  # every int8 layer calibrated
    kept = cache.read_measured(calibration_name(), source, dtype, False, dtype == torch.float32)
    assert kept.keys() == measured.keys() and all(torch.equal(kept[n], t) for n, t in measured.items())
    monkeypatch.setattr(int8, "calibrate_int8", uncalibrated)
    again = load_checkpoint(source, **FAST_PATHS[dtype], int8_linears=True, converted=cache).unet
    assert torch.equal(seeded_output(again, 34), expected)


@pytest.mark.parametrize("damage", ["cut short", "another model's"])
def test_a_kept_calibration_that_is_damaged_or_does_not_fit_is_measured_again_and_replaced(sd1_file, tmp_path, damage):
    options = FAST_PATHS[torch.float32]
    cache = ConvertedWeights(tmp_path / "converted")
    fresh = load_checkpoint(sd1_file, **options, int8_linears=True).unet
    finish_int8_calibration(load_checkpoint(sd1_file, **options, int8_linears=True, converted=cache).unet)
    cache.wait()
    path = cache.path_for(sd1_file, torch.float32, False, True, calibration_name())
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[:100])
    else:   # one layer's maxima with a channel too few
        kept = cache.read_measured(calibration_name(), sd1_file, torch.float32, False, True)
        name = next(iter(kept))
        save_safetensors(kept | {name: kept[name][:-1]}, path)
    loaded = load_checkpoint(sd1_file, **options, int8_linears=True, converted=cache).unet
    assert torch.equal(seeded_output(loaded, 34), seeded_output(fresh, 34))
    replaced = cache.read_measured(calibration_name(), sd1_file, torch.float32, False, True)
    assert all(torch.equal(replaced[n], t) for n, t in int8_calibration(fresh).items())


@each_fast_path
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_outlier_channels_cost_an_int8_unet_little(synth_file, family, dtype):
    plain, widened = synth_file(family), synth_file(family, outlier_channels=True)   # same function (synthetic.py)
    assert max(t.abs().max() for k, t in read_state_dict(widened).items() if k.endswith(".norm1.weight")) > 16

    def run(path, int8=False, **options):
        return seeded_output(load_checkpoint(path, int8_linears=int8, **options).unet, 11)

    exact = run(plain)
    assert torch.equal(run(widened), exact)
    assert torch.equal(run(widened, **FAST_PATHS[dtype]), run(plain, **FAST_PATHS[dtype]))
    errors = [relative_error(run(path, True, **FAST_PATHS[dtype]), exact) for path in (plain, widened)]
    # bf16: sd1 0.046 → 0.046, sdxl 0.039 → 0.037; unsmoothed (one scale per tensor) 0.050 → 0.50, 0.039 → 0.18;
    # fast fp32 with 7-bit weights: sd1 0.052 → 0.053, sdxl 0.045 → 0.045 (bf16's from earlier inputs)
    assert errors[1] < 1.3 * errors[0], errors


def outlier_channel_input(outlier: float, seed: int = 24) -> torch.Tensor:
    x = torch.randn(256, 320, generator=gen(seed))
    x[:, 7] = x[:, 7].abs() * outlier                         # one channel, always positive, `outlier` × the rest
    return x.bfloat16()


@pytest.mark.parametrize("outlier", [1.0, 20.0, 400.0])
def test_an_outlier_channel_is_smoothed_into_the_weight_and_runs_int8(outlier):
    layer = linear(320, 64)
    x = outlier_channel_input(outlier)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.inference_mode():
        with calibrating(layer):
            calibrating_out = layer(x)   # packs the weight with the smoothing of the maxima it has just seen
        out = layer(x)
    assert torch.equal(out, calibrating_out) and hasattr(layer, "_activation_maxima")
    assert not torch.equal(out, F.linear(x, layer.weight, layer.bias))   # the int8 product ran
    # 7-bit weights (no VNNI: int8.weight_limit) 0.0165, unsmoothed 0.041
    bound, gain = (0.015, 2.5) if weight_limit() == 127 else (0.02, 2.2)
    assert relative_error(out, exact) < bound
    if outlier == 20:   # one scale for the whole tensor, unsmoothed: the other channels get 1/20 of the steps
        unsmoothed = pack_weight(layer.weight, layer.bias)
        plain = relative_error(int8_linear(quantize_rows(x), unsmoothed), exact)
        assert plain > gain * relative_error(out, exact), plain


def test_a_channel_quiet_when_the_weight_is_packed_is_no_outlier_later():
    layer = linear(320, 64)
    quiet = torch.randn(256, 320, generator=gen(25))
    quiet[:, 3] = 0                                           # calibrates the smoothing factors
    later = torch.randn(256, 320, generator=gen(26)).bfloat16()
    with torch.inference_mode():
        with calibrating(layer):
            layer(quiet.bfloat16())
        out = layer(later)
    assert not torch.equal(out, F.linear(later, layer.weight, layer.bias))
    assert relative_error(out, F.linear(later.double(), layer.weight.double(), layer.bias.double())) < 0.015


def test_an_input_whose_range_outliers_dominate_runs_bf16():
    layer = linear(320, 64)
    x = outlier_channel_input(1.0)
    x[5] *= 400                                               # one token 400× the rest: no channel factor helps
    with torch.inference_mode():
        with calibrating(layer):
            layer(outlier_channel_input(1.0, seed=27))         # calibrated on an ordinary input
        out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                (torch.float32, torch.float16)])
def test_a_nan_input_passes_through_as_nan_for_the_pipeline_to_report(dtype, weight_dtype):
    layer = linear(32, 16, weight_dtype=weight_dtype, dtype=dtype)
    x = torch.randn(4, 32, generator=gen(13)).to(dtype)
    x[1, 3] = float("nan")
    with torch.inference_mode():
        out = layer(x)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_packing_a_file_mapped_weight_gives_its_pages_back_to_the_page_cache(tmp_path):
    path = tmp_path / "linear.safetensors"
    weight = torch.randn(1024, 4096, generator=gen(16)) / 64
    save_safetensors({"weight": weight.half()}, path)
    layer = torch.nn.Linear(4096, 1024, bias=False).bfloat16()
    layer.__class__ = Int8Linear
    layer.weight.data = read_state_dict(path)["weight"]            # 8 MiB of fp16, a view of the mapped file
    reference = F.linear(torch.zeros(1, 4096, dtype=torch.bfloat16), layer.weight.bfloat16())   # reads every page
    x = torch.randn(64, 4096, generator=gen(17)).bfloat16()
    assert resident_kib(path) > 7000 and reference.abs().max() == 0
    with torch.inference_mode():
        out = layer(x)
    assert resident_kib(path) < 500                      # only the packed copy stays in memory
    assert relative_error(out, F.linear(x.double(), weight.half().double())) < 0.03
    with torch.inference_mode():
        assert torch.equal(layer(x), out)                       # packed once; the file's pages are not needed


@needs_native_bf16
def test_an_int8_load_keeps_the_files_weights_for_its_linears_and_runs_as_from_bf16_ones(synth_file, tmp_path):
    source = synth_file("sd1", "fp16")
    cache = ConvertedWeights(tmp_path / "converted")
    kept = load_checkpoint(source, dtype=torch.bfloat16, int8_linears=True, converted=cache).unet
    finish_int8_calibration(kept)
    cache.wait()
    (calibration,) = (tmp_path / "converted").glob("*")          # fp16 and bf16 weights: no converted copy stored,
    assert calibration.stat().st_size < 2**20                     # only the calibration
    names = int8_weight_names(kept)
    weights = dict(kept.named_parameters())
    assert any(".attn1.to_q." in n for n in names) and any(".ff.net.0.proj." in n for n in names)
    assert all(weights[n].dtype == torch.float16 and is_file_mapped(weights[n]) for n in names)
    assert all(w.dtype == torch.bfloat16 for n, w in weights.items() if n not in names)
    load_checkpoint(source, dtype=torch.bfloat16, converted=cache)
    cache.wait()                                                  # a bf16 load stores the converted weights
    from_bf16 = load_checkpoint(source, dtype=torch.bfloat16, int8_linears=True, converted=cache).unet
    assert all(w.dtype == torch.bfloat16 for w in from_bf16.parameters())
    assert all(is_file_mapped(w) for n, w in from_bf16.named_parameters() if n in names)
    sample = torch.randn(2, 4, 32, 32, generator=gen(18)).bfloat16()
    context = torch.randn(2, 77, kept.config.cross_attention_dim, generator=gen(19)).bfloat16()
    with torch.inference_mode():
        assert torch.equal(kept(sample, 500, context).sample, from_bf16(sample, 500, context).sample)


def test_a_fast_fp32_int8_load_keeps_the_files_weights_for_its_linears_and_the_rest_as_auto_does(synth_file):
    """Without native bf16 math `--precision int8` builds on the fast fp32 path: its int8 layers pack from the fp16
    file's own weights, every other weight loads as `auto` loads it (models/half_weights.py)."""
    source = synth_file("sd1", "fp16")
    auto = load_checkpoint(source, **FAST_PATHS[torch.float32]).unet
    quick = load_checkpoint(source, **FAST_PATHS[torch.float32], int8_linears=True).unet
    names, weights = int8_weight_names(quick), dict(quick.named_parameters())
    auto_weights = dict(auto.named_parameters())
    assert quick.dtype == torch.float32 and any(".ff.net.0.proj." in n for n in names)
    assert all(weights[n].dtype == torch.float16 and is_file_mapped(weights[n]) for n in names)
    assert all(w.dtype == auto_weights[n].dtype for n, w in weights.items() if n not in names)
    sample = torch.randn(2, 4, 32, 32, generator=gen(18))
    context = torch.randn(2, 77, quick.config.cross_attention_dim, generator=gen(19))
    with torch.inference_mode():
        fast, int8 = (u(sample, 500, context).sample for u in (auto, quick))
    assert not torch.equal(int8, fast) and relative_error(int8, fast) < 0.06


def test_cross_attention_on_a_text_condition_with_outliers_stays_bf16_exact():
    """Text encoders' hidden states have outliers; one int8 scale for all of them would crush the rest."""
    torch.manual_seed(21)
    block = Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=64, cross_attention_dim=96,
                               norm_num_groups=32).eval().bfloat16()
    x = torch.randn(2, 64, 8, 8, generator=gen(22)).bfloat16()
    context = torch.randn(2, 77, 96, generator=gen(23))
    context[:, 0, :4] *= 80                                      # a start token far larger than the rest
    context = context.bfloat16()
    with torch.inference_mode():
        exact = block.double()(x.double(), encoder_hidden_states=context.double()).sample
        block.bfloat16()
        use_int8_linears(block)
        attention = block.transformer_blocks[0].attn2
        projections = attention.to_q, attention.to_k, attention.to_v
        assert [type(p) for p in projections] == [Int8Linear, torch.nn.Linear, torch.nn.Linear]
        keys, values = attention.to_k(context), attention.to_v(context)
        out = block(x, encoder_hidden_states=context).sample
    assert relative_error(keys, F.linear(context.double(), attention.to_k.weight.double())) < 0.01
    assert relative_error(values, F.linear(context.double(), attention.to_v.weight.double())) < 0.01
    assert relative_error(out, exact) < 0.05
