"""int8 linears of the CPU's `--precision auto` path: the UNet's transformer linears as u8 × s8 products.

On CPUs with VNNI or AMX, oneDNN's int8 matrix products run about twice as fast as its bf16 ones (SD1.5's 8192 × 1280 →
320 feed-forward output: 8.1 against 16 ms on two AVX512-VNNI cores); on CPUs without native bf16 math (AVX2) about
twice as fast as fp32 ones (19–20 against 39–42 ms on two Zen 3 cores). `--precision auto` (and `int8`) is the CPU's
fast float path (`float`) — the bf16 one, or the fast fp32 one where the CPU has no bf16 math (models/build.py) — with
the linears of the UNet's transformer blocks (attention projections, GEGLU, feed-forward output) computed that way —
W8A8, dynamic — except the cross-attentions' key and value projections of the text condition (77 tokens: nothing to
gain; and text encoders' hidden states have outliers that one scale per tensor would crush the rest under) and the
transformers' projections in and out (proj_in / proj_out: their error goes straight into the UNet's residual stream —
one CFG call's output vs fp32, random weights at 64² latents: SD1.5 5.9 % with them in int8, 5.0 % without; SDXL 9.3 %,
7.8 % — for a few percent of the linears' products, no slower a step):

- weights: int8 per output channel, symmetric (scale = max |w| / 127, or / 63 where the CPU lacks VNNI:
  `weight_limit`) of their bf16 values, packed once for oneDNN and again whenever the weight changes (a LoRA patch:
  the weight patcher bumps the parameter's version). The load leaves these weights as the file's own mapped tensors
  (fp16 / fp32 ones are not converted, models/build.py), and packing gives their pages back to the page cache: in
  memory there is only the packed copy, half the bf16 size;
- smoothing (SmoothQuant): each input channel's activations are divided, and the weight's column multiplied, by one
  factor per channel (`smoothing_factors`) from the activations of one fixed calibration call before the model's first
  use (`calibrate_int8`: the same for every prompt, run before a job's LoRAs and hooks, so images never depend on what
  ran first; it packs the int8 weights as it goes, which the first step would do anyway, and its maxima are kept beside
  the converted weights so that a later load of the same file skips the call: models/converted.py), so an outlier
  channel — real transformers' activations have a few, random weights' none — shares its range with the weight instead
  of taking the 255 steps from every other channel (a random-weight SD1.5 file with 4 such channels ×32 after every
  transformer norm, the float model bit for bit the same: 20-step image vs fp32 36.4 dB unsmoothed, 38.1 smoothed;
  SDXL's, 3 steps: 26.6 and 33.4);
- activations (bf16 or fp32): uint8 per tensor, from each call's own minimum and maximum (0 always representable); a
  call whose range outliers still dominate (over MAX_SPREAD times its mean |x|: a few huge tokens, which no channel
  factor helps) runs in its float dtype instead;
- both quantized by C loops (models/native.py): PyTorch's element-wise ops took 4× as long;
- the product, its bias and the GEGLU gate's GELU by one oneDNN call, into the activations' dtype.

It costs some accuracy, within the 30 dB quality guard (final image vs fp32 on random weights, on the bf16 path, with
the UNet's 3×3 convolutions as int8 Winograd products too, models/int8_winograd.py: SD1.5 37.4 dB, SDXL 33.2;
`--precision float` 43.7 and 36.9: bench/RESULTS.md), and no trained model was measured here: `float` leaves it out.
The attention products stay in the float dtype. Where the C kernel cannot be built, or int8 is measured no faster on
the machine than the float products (`int8_pays`, models/tuning.py), the layers keep their float code.
"""
from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from sdstudio.files.readers import release_file_pages
from sdstudio.models.conversion import copy_weights
from sdstudio.models.fused import FusedGEGLU, fast_cpu_tensor
from sdstudio.models.half_weights import WideningLinear, widened
from sdstudio.models.native import SCALAR_LOADS, SCALAR_TYPES, compiled_library, scratch
from sdstudio.models.tuning import candidate_pays, cpu_description

MAX_SPREAD = 128   # activations whose range exceeds this many times their mean |x| run in their float dtype: a
                   # safety net for extreme outliers only — on random weights Gaussian ones spread 12, the widest
                   # (GEGLU outputs, which the quality guard covers) 83
ACTIVATION_TYPES = {dtype: SCALAR_TYPES[dtype] for dtype in (torch.bfloat16, torch.float32)}   # C suffix, C type
QUANTIZE_SOURCE = SCALAR_LOADS + "typedef unsigned char uint8_t;\n"
# the activation kernels, once per ACTIVATION_TYPES entry (SUFFIX, TYPE)
ACTIVATION_SOURCE = """
/* summary[0..2] = lowest, highest and mean |x| of x (rows × cols) divided column by column by the smoothing
   factors (x · inverse_smoothing); a NaN makes the mean NaN */
void summarize_SUFFIX(const TYPE *x, long rows, long cols, const float *inverse_smoothing, float *summary,
                      int threads) {
  float lowest = 3.4e38f, highest = -3.4e38f, total = 0.f;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(min:lowest) reduction(max:highest) \\
    reduction(+:total)
  for (long r = 0; r < rows; r++) {
    const TYPE *row = x + r * cols;
#pragma omp simd reduction(min:lowest) reduction(max:highest) reduction(+:total)
    for (long c = 0; c < cols; c++) {
      float v = load_SUFFIX(row[c]) * inverse_smoothing[c];
      lowest = v < lowest ? v : lowest;
      highest = v > highest ? v : highest;
      total += v < 0.f ? -v : v;
    }
  }
  summary[0] = lowest;
  summary[1] = highest;
  summary[2] = rows * cols > 0 ? total / (rows * cols) : 0.f;
}

/* q = clamp(round(x · inverse_smoothing[column] / scale) + zero_point, 0, 255) for x (rows × cols) */
void quantize_u8_SUFFIX(const TYPE *x, uint8_t *q, long rows, long cols, const float *inverse_smoothing,
                        float inverse_scale, float zero_point, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; r++) {
#pragma omp simd
    for (long c = 0; c < cols; c++) {
      float v = load_SUFFIX(x[r * cols + c]) * inverse_smoothing[c] * inverse_scale + zero_point;
      v = v < 0.f ? 0.f : v > 255.f ? 255.f : v;
      q[r * cols + c] = (uint8_t)(v + 0.5f);
    }
  }
}
"""
# the weight quantizer, once per SCALAR_TYPES entry (SUFFIX, TYPE): packing reads the weights as they are, a bf16
# model's or the file's fp16 / fp32 ones an int8 load keeps
WEIGHT_SOURCE = """
/* a weight (rows × cols) rounded to bf16, times the smoothing factors column by column, as integers in
   [-limit, limit] with one scale per row: max |w · smoothing| / limit */
void quantize_weight_rows_SUFFIX(const TYPE *w, const float *smoothing, signed char *q, float *scales, long rows,
                                 long cols, float limit, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; r++) {
    const TYPE *row = w + r * cols;
    bits largest = {0};   /* the largest |value| by its bits (their order for non-negative floats): vectorises */
    for (long i = 0; i < cols; i++) {
      bits v;
      v.f = bf16_rounded(load_SUFFIX(row[i])) * smoothing[i];
      v.u &= 0x7FFFFFFFu;
      largest.u = v.u > largest.u ? v.u : largest.u;
    }
    float scale = largest.f > 0.f ? largest.f / limit : 1.f, inverse = 1.f / scale;
    for (long i = 0; i < cols; i++) {
      float v = bf16_rounded(load_SUFFIX(row[i])) * smoothing[i] * inverse;
      q[r * cols + i] = (signed char)(v < 0.f ? v - 0.5f : v + 0.5f);
    }
    scales[r] = scale;
  }
}
"""


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    activations = "".join(ACTIVATION_SOURCE.replace("SUFFIX", suffix).replace("TYPE", c_type)
                          for suffix, c_type in ACTIVATION_TYPES.values())
    weights = "".join(WEIGHT_SOURCE.replace("SUFFIX", suffix).replace("TYPE", c_type)
                      for suffix, c_type in SCALAR_TYPES.values())
    kernels = compiled_library("int8", QUANTIZE_SOURCE + activations + weights)
    if kernels is not None:
        pointer, index = ctypes.c_void_p, ctypes.c_long
        for suffix, _ in ACTIVATION_TYPES.values():
            getattr(kernels, f"summarize_{suffix}").argtypes = [pointer, index, index, pointer, pointer, ctypes.c_int]
            getattr(kernels, f"quantize_u8_{suffix}").argtypes = [pointer, pointer, index, index, pointer,
                                                                  ctypes.c_float, ctypes.c_float, ctypes.c_int]
        for suffix, _ in SCALAR_TYPES.values():
            getattr(kernels, f"quantize_weight_rows_{suffix}").argtypes = [pointer, pointer, pointer, pointer, index,
                                                                           index, ctypes.c_float, ctypes.c_int]
    return kernels


@dataclass
class QuantizedRows:
    """A 2-D bf16 or fp32 activation as uint8 with one scale and zero point: x ≈ (q - zero_point) · scale; `dtype`
    is the activation's (the product's output takes it)."""

    values: torch.Tensor
    scale: float
    zero_point: int
    dtype: torch.dtype


@dataclass
class PackedWeight:
    """A linear's weight times its smoothing factors (one per input channel, `smoothing_factors`) as int8 per output
    channel, packed for oneDNN, with its fp32 bias; its inputs are divided by the same factors as they quantize."""

    packed: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    bias: torch.Tensor | None
    inverse_smoothing: torch.Tensor


def smoothing_factors(activation_maxima: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One factor per input channel that moves a linear's activation outliers into its weight (SmoothQuant, α = ½):
    x · Wᵀ = (x / s) · (W · s)ᵀ with s = √(max |x| / max |w|) per channel, so both sides span √(max |x| · max |w|).
    Real transformers' activations have a few channels far wider than the rest (random weights' have none), and one
    int8 scale per tensor would give the rest a few of its 255 steps. Activation maxima below the channels' median
    count as the median: a channel quiet in the calibrating call is not divided up into an outlier in a later one.
    `activation_maxima`: max |x| per input channel, float32 (`calibrate_int8`)."""
    activations = activation_maxima
    weights = _column_maxima(weight.detach()).bfloat16().float()   # its bf16 values' (rounding keeps the maximum)
    factors = (activations.clamp_min(activations.median()) / weights.clamp_min(1e-12)).sqrt()
    return factors if bool(torch.isfinite(factors).all()) and bool((factors > 0).all()) else torch.ones_like(factors)


def _column_maxima(x: torch.Tensor) -> torch.Tensor:
    """max |x| over each column of a 2-D tensor (two reductions: 2.6× faster than through x.abs() for fp16)."""
    return torch.maximum(x.amax(0), x.amin(0).neg())


def quantize_rows(x: torch.Tensor, inverse_smoothing: torch.Tensor | None = None) -> QuantizedRows | None:
    """A contiguous 2-D bf16 or fp32 CPU tensor, its columns times `inverse_smoothing` (float32, one per column; none:
    as it is), as uint8 over its own range (which always includes 0); None — the caller's float code runs — when the
    range is not finite (the NaN or inf passes on, for the pipeline to report) or more than MAX_SPREAD times the mean
    |x| (outliers: one step of 1/255 of the range would swallow the other values)."""
    kernels = _kernels()
    rows, cols = x.shape
    inverse_smoothing = torch.ones(cols) if inverse_smoothing is None else inverse_smoothing
    summary = torch.empty(3)
    suffix = ACTIVATION_TYPES[x.dtype][0]
    getattr(kernels, f"summarize_{suffix}")(x.data_ptr(), rows, cols, inverse_smoothing.data_ptr(),
                                            summary.data_ptr(), torch.get_num_threads())
    low, high, mean_size = summary.tolist()
    if not all(math.isfinite(v) for v in (low, high, mean_size)) or high - low > MAX_SPREAD * mean_size:
        return None
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255 or 1.0
    zero_point = round(-low / scale)
    values = torch.empty(x.shape, dtype=torch.uint8)
    getattr(kernels, f"quantize_u8_{suffix}")(x.data_ptr(), values.data_ptr(), rows, cols, inverse_smoothing.data_ptr(),
                                              1 / scale, float(zero_point), torch.get_num_threads())
    return QuantizedRows(values, scale, zero_point, x.dtype)


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None,
                smoothing: torch.Tensor | None = None) -> PackedWeight:
    """A `weight` (out × in; bf16, or the file's fp16 / fp32) times `smoothing` (one factor per input channel; none:
    as it is) as symmetric int8 per output channel of its bf16 values (at most ±`weight_limit()`), packed for oneDNN's
    u8 × s8 product. The weight is read as it is (a file's mapped one: its pages, not a converted copy)."""
    weight = weight.detach()
    weight = (weight if weight.dtype in SCALAR_TYPES else weight.to(torch.bfloat16)).contiguous()
    rows, cols = weight.shape
    smoothing = torch.ones(cols) if smoothing is None else smoothing.float().contiguous()
    values, scales = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows)
    quantize = getattr(_kernels(), f"quantize_weight_rows_{SCALAR_TYPES[weight.dtype][0]}")
    quantize(weight.data_ptr(), smoothing.data_ptr(), values.data_ptr(), scales.data_ptr(), rows, cols,
             float(weight_limit()), torch.get_num_threads())
    return PackedWeight(torch.ops.onednn.qlinear_prepack(values, None), scales,
                        torch.zeros(len(scales), dtype=torch.long),
                        None if bias is None else bias.detach().float(), 1 / smoothing)


@functools.cache
def weight_limit() -> int:
    """The largest integer a packed weight takes: 127 where the CPU multiplies u8 × s8 into 32-bit sums (VNNI, AMX),
    63 elsewhere: there oneDNN's AVX2 / AVX-512 products add pairs of u8 × s8 products in 16 bits first
    (vpmaddubsw), which saturate at 32767 (2 · 255 · 127 = 64770; 2 · 255 · 63 = 32130): a 64 → 48 product had 3.3 %
    error vs fp64 with ±127 weights on an AVX2 CPU, 1.5 % with ±63, its integer arithmetic then exact."""
    flags = set(cpu_description()[1].split())
    return 127 if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else 63


def _in_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`; without gradients, an fp16 / fp32 file's weight going to bf16 converts into a reused buffer
    (no fresh pages per weight), read from the file where it is a view of one (models/conversion.py), and a 16-bit
    one going to fp32 widens into one (models/half_weights.py)."""
    if weight.dtype == dtype or torch.is_grad_enabled() or dtype not in (torch.bfloat16, torch.float32):
        return weight.to(dtype)
    if dtype == torch.float32:
        return widened(weight)
    copy_weights([(converted := scratch("int8-weight", tuple(weight.shape)), weight)])
    return converted


def int8_linear(x: QuantizedRows, weight: PackedWeight, activation: str = "none") -> torch.Tensor:
    """x · weightᵀ + bias in x's dtype (bf16 or fp32) by oneDNN's int8 product, with `activation` ("none" or "gelu")
    fused."""
    return torch.ops.onednn.qlinear_pointwise(x.values, x.scale, x.zero_point, weight.packed, weight.scales,
                                              weight.zero_points, weight.bias, 1.0, 0, x.dtype, activation, [], "none")


CHOICE_NAMES = {torch.bfloat16: "int8-linear", torch.float32: "int8-linear-fp32"}   # of int8_pays' kept choices


@functools.cache
def int8_pays(dtype: torch.dtype) -> bool:
    """Whether int8 products (their activations' quantization included) beat products in `dtype` (bf16, or fp32
    for the fast fp32 path) on this machine, measured once on SD1.5's feed-forward output at 512²
    (8192 × 1280 → 320) and kept (models/tuning.py); bf16 never without native bf16 math (int8 products with bf16
    output run oneDNN's reference code there: minutes for that one product)."""
    def ways():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8192, 1280, generator=generator).to(dtype)
        weight = torch.randn(320, 1280, generator=generator).to(dtype)
        packed = pack_weight(weight, None, smoothing_factors(_column_maxima(x).float(), weight))
        return lambda: int8_linear(quantize_rows(x, packed.inverse_smoothing), packed), lambda: F.linear(x, weight)

    return candidate_pays(CHOICE_NAMES[dtype], ways, dtype)


def int8_available(dtype: torch.dtype) -> bool:
    """Whether int8 products run for a model computing in `dtype` (bf16, or fp32 on the fast fp32 path) on this
    machine: the quantizers built and int8 measured faster than `dtype`'s products."""
    return dtype in CHOICE_NAMES and _kernels() is not None and int8_pays(dtype)


def int8_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call of a linear runs in int8: a bf16 or fp32 CPU input without gradients, a CPU weight, int8
    available for its dtype here."""
    return (fast_cpu_tensor(x) and weight.device.type == "cpu" and weight.is_floating_point()
            and x.shape[-1] == weight.shape[1] and int8_available(x.dtype))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def packed_for(module: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, pack):
    """`module`'s packed weights, made by pack() again whenever its weight or bias changed (storage or version: the
    weight patcher bumps it). A weight read from a mapped file (the load leaves these unconverted) then gives its
    pages back: only the packed copy stays in memory."""
    key = tuple(None if t is None else (t.data_ptr(), t._version) for t in (weight, bias))
    if getattr(module, "_int8", (None,))[0] != key:
        module._int8 = (key, pack())
        release_file_pages(weight)
    return module._int8[1]


class Int8Layer:
    """What the int8 linears (Int8Linear, Int8GEGLU) are besides their torch class: under `calibrating` each records
    its input's max |x| per channel before its product (`_record_maxima`)."""

    def calibrating(self) -> bool:
        """Whether a `calibrating` block is running this layer's model."""
        return getattr(self, "_calibrating", False)


def _record_maxima(module: Int8Layer, rows: torch.Tensor) -> None:
    """Under `calibrating`: keep the running max |x| per channel of `rows` on `module` and drop its packed weights
    (their smoothing comes from these maxima: the product packs them again)."""
    if module.calibrating():
        maxima, kept = _column_maxima(rows).float(), getattr(module, "_activation_maxima", None)
        module._activation_maxima = maxima if kept is None else torch.maximum(kept, maxima)
        module.__dict__.pop("_int8", None)


def _smoothing(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """`module`'s smoothing factors for `weight` from its calibrated activation maxima (None, none: uncalibrated)."""
    maxima = getattr(module, "_activation_maxima", None)
    return None if maxima is None else smoothing_factors(maxima, weight)


def _int8_product(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor | None:
    """x · weightᵀ + bias over x's last dimension as rows (x's other dimensions flattened) by the int8 product, the
    packed weight kept on `module`; None where int8 does not apply or x is not finite (the caller's float code
    runs)."""
    if not int8_applies(x, weight):
        return None
    rows = _rows(x)
    _record_maxima(module, rows)
    packed = packed_for(module, weight, bias, lambda: pack_weight(weight, bias, _smoothing(module, weight)))
    quantized = quantize_rows(rows, packed.inverse_smoothing)
    return None if quantized is None else int8_linear(quantized, packed)


class Int8Linear(Int8Layer, torch.nn.Linear):
    """A linear computed by oneDNN's int8 product (its weight packed once per version)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _int8_product(self, x, self.weight, self.bias)
        if out is None:   # the weight may be the file's fp16 / fp32 (build.py): in x's dtype for this call
            return F.linear(x, _in_dtype(self.weight, x.dtype), self.bias)
        return out.reshape(*x.shape[:-1], -1)


class Int8GEGLU(Int8Layer, FusedGEGLU):
    """GEGLU with both halves of its projection as int8 products over one quantized input: GELU fused into the
    gate's, then the product."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = self.proj.weight
        if not int8_applies(hidden_states, weight):
            return super().forward(hidden_states, *args, **kwargs)
        rows = _rows(hidden_states)
        _record_maxima(self, rows)
        value, gate = packed_for(self, weight, self.proj.bias, self._pack)
        x = quantize_rows(rows, value.inverse_smoothing)
        if x is None:   # outliers: in the input's float dtype (the weight may be the file's), fused
            return self.fused_forward(hidden_states, _in_dtype(weight, hidden_states.dtype), *args, **kwargs)
        out = int8_linear(x, value).mul_(int8_linear(x, gate, "gelu"))
        return out.reshape(*hidden_states.shape[:-1], -1)

    def _pack(self) -> tuple[PackedWeight, PackedWeight]:
        """Both halves of the projection packed, with the same smoothing factors (they read one input)."""
        weight, bias = self.proj.weight, self.proj.bias
        half, smoothing = weight.shape[0] // 2, _smoothing(self, weight)
        value_bias, gate_bias = (None, None) if bias is None else (bias[:half], bias[half:])
        return pack_weight(weight[:half], value_bias, smoothing), pack_weight(weight[half:], gate_bias, smoothing)


def _int8_class(module: torch.nn.Module) -> type | None:
    """The int8 subclass a module inside a transformer takes (or has taken); None for the others."""
    if type(module) in (torch.nn.Linear, WideningLinear, Int8Linear):
        return Int8Linear
    return Int8GEGLU if type(module) in (FusedGEGLU, Int8GEGLU) else None


# a transformer's projections in and out (SDXL's linears, SD1/SD2's 1×1 convolutions) stay in the float dtype: their
# error goes straight into the UNet's residual stream
FLOAT_PROJECTIONS = ("proj_in", "proj_out")


def _int8_modules(model: torch.nn.Module):
    """(name, module, int8 subclass) of each module `use_int8_linears` converts: the linears and GEGLUs inside
    `model`'s transformers (Transformer2DModel), except their FLOAT_PROJECTIONS and the cross-attentions' key and
    value projections, whose input is the text condition: 77 tokens, too few for int8 to gain anything, and text
    encoders' hidden states have outliers that one scale per tensor would crush the other values under."""
    for name, transformer in model.named_modules():
        if not isinstance(transformer, Transformer2DModel):
            continue
        text_inputs = {id(projection) for attention in transformer.modules()
                       if isinstance(attention, Attention) and attention.is_cross_attention
                       for projection in (attention.to_k, attention.to_v)}
        for inner, module in transformer.named_modules():
            kind = _int8_class(module)
            if kind is not None and id(module) not in text_inputs and inner not in FLOAT_PROJECTIONS:
                yield f"{name}.{inner}", module, kind


def use_int8_linears(model: torch.nn.Module) -> None:
    """Give the linears inside `model`'s transformer blocks their int8 subclass and their GEGLU the int8 one (same
    weights, same state; the float code runs wherever int8 does not apply) — all but the cross-attentions' key and
    value projections and the transformers' projections in and out (`_int8_modules`)."""
    for _, module, kind in _int8_modules(model):
        module.__class__ = kind


@contextmanager
def calibrating(model: torch.nn.Module):
    """Within: the int8 linears of `model` record max |x| per input channel of what they see (the smoothing factors'
    activation side) before their products, which pack their weights with those factors."""
    layers = [m for m in model.modules() if isinstance(m, Int8Layer)]
    for layer in layers:
        layer._calibrating = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._calibrating


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    return layer.proj.weight if isinstance(layer, Int8GEGLU) else layer.weight


CALIBRATION_SIDE = 16   # latents per side of the calibration call (batch 2, as CFG runs)


def calibrate_int8(unet: torch.nn.Module, pooled_dim: int | None) -> None:
    """One UNet call on fixed seeded inputs (latents of CALIBRATION_SIDE², a random text condition; SDXL's pooled
    embedding and size conditions) under `calibrating`: each int8 linear's activation maxima, from the loaded weights
    before any LoRA, so its smoothing — and the images — depend on the model alone. Each int8 layer packs its weight
    as the call reaches it (an int8 linear with the smoothing from the maxima it has just recorded): the packing the
    first step would do, each weight read once; the call itself costs little beyond it (16² latents)."""
    if not int8_available(unet.dtype):
        return
    config, generator = unet.config, torch.Generator().manual_seed(0)
    sample = torch.randn(2, config.in_channels, CALIBRATION_SIDE, CALIBRATION_SIDE, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    added = {}
    if config.addition_embed_type == "text_time":
        sizes = (config.projection_class_embeddings_input_dim - pooled_dim) // config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled_dim, generator=generator).to(unet.dtype),
                                       "time_ids": torch.full((2, sizes), 8.0 * CALIBRATION_SIDE).to(unet.dtype)}}
    with calibrating(unet), torch.inference_mode():
        unet(sample.to(unet.dtype), 500, context.to(unet.dtype), **added)


def calibrate_int8_before_first_use(unet: torch.nn.Module, pooled_dim: int | None,
                                     on_calibrated: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Leave `unet`'s `calibrate_int8` to `finish_int8_calibration`, which the pipeline runs before a generation
    changes or calls the UNet (before the job's LoRAs and hooks: the calibration sees the model alone) and a forward
    pre-hook before any other first call; `on_calibrated` then gets the maxima (`int8_calibration`) to keep. A load
    does not wait for the calibrating call: it packs the int8 weights, which the first step would do anyway."""
    hook = unet.register_forward_pre_hook(lambda module, args: finish_int8_calibration(module))
    unet._int8_calibration_pending = (hook, pooled_dim, on_calibrated)


def finish_int8_calibration(unet: torch.nn.Module) -> None:
    """Run `unet`'s pending int8 calibration (`calibrate_int8_before_first_use`), if it has one."""
    pending = unet.__dict__.pop("_int8_calibration_pending", None)
    if pending is not None:
        hook, pooled_dim, on_calibrated = pending
        hook.remove()
        calibrate_int8(unet, pooled_dim)
        on_calibrated(int8_calibration(unet))


def calibration_name() -> str:
    """What int8's calibration is kept as beside the converted weights (models/converted.py): it changes with the
    calibration call and with what its kernels round differently (the CPU, the thread count)."""
    return (f"int8 calibration 2: {CALIBRATION_SIDE}² latents, {torch.get_num_threads()} threads, "
            f"CPU flags {cpu_description()[1]}")


def int8_calibration(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The activation maxima `calibrate_int8` measured, by int8 layer name (for keeping: `restore_int8_calibration`)."""
    return {name: module._activation_maxima for name, module, _ in _int8_modules(model)
            if hasattr(module, "_activation_maxima")}


def restore_int8_calibration(model: torch.nn.Module, maxima: Mapping[str, torch.Tensor]) -> bool:
    """Give `model`'s int8 layers the activation maxima of an earlier calibration of the same weights (the tensors
    themselves) instead of calibrating again; False, nothing changed, where they do not fit its layers (names,
    channel counts) or there are none."""
    layers = {name: module for name, module, _ in _int8_modules(model)}
    fits = bool(maxima) and all(
        name in layers and tensor.dtype == torch.float32 and tuple(tensor.shape) == (_weight(layers[name]).shape[1],)
        for name, tensor in maxima.items())
    if fits:
        for name, tensor in maxima.items():
            layers[name]._activation_maxima = tensor
    return fits


def int8_weight_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the weights `use_int8_linears` gives int8 products (a GEGLU's is its linear's)."""
    return {f"{name}.weight" for name, _, kind in _int8_modules(model) if kind is not Int8GEGLU}
