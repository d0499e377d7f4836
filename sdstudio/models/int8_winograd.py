"""3×3 convolutions of the CPU's `--precision auto` path: Winograd F(2×2, 3×3) with its 16 products in int8.

The fast paths' Winograd convolutions (models/winograd.py) multiply in bf16 (or fp32); a UNet step is mostly these
products, and int8 ones run about twice as fast where the CPU multiplies 8-bit integers into 32-bit sums (VNNI, AMX).
F(2×2)'s transformed input tile is Bᵀ·d·B of a 4×4 input tile, the transformed filter G·g·Gᵀ: 16 values each, and
position p of the output tile's transform is the product over channels of the inputs' and filters' values at p — 16
independent matrix products (tiles × channels in) · (channels in × channels out). Here each of the 16 is one s8 × s8
product into int32 sums (torch._int_mm: oneDNN's; as fast as its packed u8 × s8 linears on these shapes, and the
weights stay plain tensors):

- weights: the transformed filters, int8 per position and output channel (symmetric, at most ±`weight_limit()`),
  made once and again whenever the weight changes (a LoRA patch bumps its version: models/int8.py's `packed_for`).
  Under `--precision auto` the load leaves these layers' weights as the file's own mapped tensors, and packing gives
  their pages back: in memory there is only the int8 copy, 16/9 of the weight's count in bytes (8/9 of its bf16 size);
- activations: the transformed input, int8 per position and tile (symmetric over the tile's channels: a tile's
  values are one row of each position's product, so its scale factors out of the sum like the weight's). One C
  pass transforms each tile into fp32 in the cache, then quantizes each position over its own largest |value|, so
  the transformed input never exists in the float dtype, and a tile is quantized the same whatever else the image
  holds (a bright patch, a spike, the other half of a CFG batch); per-pass scales coarsened every tile to the
  widest one's range (per layer 2.1 % error on random weights, 1.4 % per tile). Where a pass's tiles' ranges (twice
  their largest |value|) are on average more than MAX_SPREAD times the mean |value| at some position (an outlier
  channel that takes every tile's range), the layer's float code runs;
- the output transform reads the int32 sums times the scales of their position's tile and output channel, adds the
  bias.

Per layer the error is ~1.5 % of the output's size (F(2×2) in bf16: 0.4 %); SD1.5's UNet call on two AVX512-VNNI
cores takes 2.5 s instead of 3.35 with the bf16 Winograd convolutions (final image vs fp32, the linears in int8 too:
SD1.5 36.3 → 37.1 dB, SDXL 31.5 → 32.2 from per-pass to per-tile scales). F(4×4)'s transforms would spread the values
over a wider range than 8 bits keep; F(2×2)'s only add and subtract. Where int8 products are not available or this is
measured no faster than the dtype's own Winograd (`int8_winograd_available`), the layers keep their float code, as do
convolutions outside the narrow case (`int8_winograd_applies`).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from sdstudio.models.int8 import MAX_SPREAD, int8_available, packed_for, weight_limit
from sdstudio.models.native import compiled_library, releasing_buffers, scratch
from sdstudio.models.tuning import candidate_pays
from sdstudio.models.winograd import (CHANNEL_BLOCK, SUFFIXES, WEIGHT_TYPES, WinogradConv2d, conv_inputs,
                                      input_transform_source, output_transform_source, plain_3x3, plain_3x3_layer,
                                      transform_header, weight_transform_source, winograd_conv2d)

M = 2                  # the output tile: F(2×2, 3×3)
POSITIONS = (M + 2) ** 2
MIN_CHANNELS = 256     # as the bf16 Winograd's (models/winograd.py): the UNet's 320 and wider
CHUNK_BYTES = 16 << 20   # at most this much quantized transformed input at once (a part of the tiles)
WEIGHT_BLOCK = 256     # output channels transformed and quantized at once while packing (bounds its fp32 buffers)


def kernel_source(dtype: torch.dtype) -> str:
    """C source of the input pass (`input_transform_s8`), the weight transforms into fp32 and the output transform
    (int32 products, scaled) of F(2×2) on `dtype` (bf16 or fp32) activations."""
    def keep(i: int, j: int, value: str) -> str:
        p = i * (M + 2) + j
        return (f"for (int k = 0; k < CH; k++) {{ float v = {value}, a = v < 0.f ? -v : v;"
                f" tile[{p} * c + c0 + k] = v; peak[{p}][k] = a > peak[{p}][k] ? a : peak[{p}][k];"
                f" size[{p}][k] += a; }}")

    # each tile's transform kept in fp32 (its thread's part of `work`), then each position quantized over the
    # tile's own largest |value| (symmetric, |s| ≤ 127): rounds half up by truncating s + 128.5 as whole vectors
    # (GCC's vector extensions: the lane loop alone compiles to scalar conversions)
    transform = input_transform_source(
        M, "input_transform_s8", "signed char *v, float *tile_scale, float *summary, float *work",
        keep, clauses=" reduction(+:peaks[:N * N]) reduction(+:sizes[:N * N])", before="""
  /* summary[0][p] = the sum over the tiles of their largest |value| at position p, summary[1][p] = the sum of
     every |value| at p (a NaN makes it NaN) */
  float peaks[N * N], sizes[N * N];
  for (int p = 0; p < N * N; p++) { peaks[p] = 0.f; sizes[p] = 0.f; }""", after="""
  for (int p = 0; p < N * N; p++) { summary[p] = peaks[p]; summary[N * N + p] = sizes[p]; }""", tile_before="""
    float *tile = work + (long)omp_get_thread_num() * N * N * c, peak[N * N][CH], size[N * N][CH];
    for (int p = 0; p < N * N; p++) for (int k = 0; k < CH; k++) { peak[p][k] = 0.f; size[p][k] = 0.f; }""",
        tile_after="""
    for (int p = 0; p < N * N; p++) {
      float largest = 0.f, total = 0.f;
      for (int k = 0; k < CH; k++) { largest = peak[p][k] > largest ? peak[p][k] : largest; total += size[p][k]; }
      float scale = largest > 0.f ? largest / 127.f : 1.f, factor = 1.f / scale;
      tile_scale[p * count + t - first] = scale;
      peaks[p] += largest;
      sizes[p] += total;
      for (int c0 = 0; c0 < c; c0 += CH) {
        lanes s = *(lanes *)(tile + p * c + c0) * factor;
        *(bytes *)(v + (p * count + t - first) * c + c0) =
            __builtin_convertvector(__builtin_convertvector(s + 128.5f, whole) - 128, bytes);
      }
    }""")
    vectors = """int omp_get_thread_num(void);
typedef float lanes __attribute__((vector_size(CH * 4)));
typedef int whole __attribute__((vector_size(CH * 4)));
typedef signed char bytes __attribute__((vector_size(CH), aligned(1)));
"""
    quantize_filters = """
/* each of the rows × cols fp32 transformed filters t (a position's output channel per row) → values (row r at
   values + (r / block) * position_stride + (r % block) * cols) as round(t / scale), scale = the row's largest
   |value| / limit (scales[(r / block) * scale_stride + r % block]) */
void quantize_filters(const float *t, long rows, long cols, long block, signed char *values, long position_stride,
                      float *scales, long scale_stride, float limit, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; r++) {
    const float *row = t + r * cols;
    float largest = 0.f;
    for (long i = 0; i < cols; i++) { float a = row[i] < 0.f ? -row[i] : row[i]; largest = a > largest ? a : largest; }
    float scale = largest > 0.f ? largest / limit : 1.f, inverse = 1.f / scale;
    signed char *out = values + (r / block) * position_stride + (r % block) * cols;
    for (long i = 0; i < cols; i++) {
      float v = row[i] * inverse;
      out[i] = (signed char)(v < 0.f ? v - 0.5f : v + 0.5f);
    }
    scales[(r / block) * scale_stride + r % block] = scale;
  }
}
"""
    return "\n".join([transform_header(dtype, M), vectors, transform,
                      *(weight_transform_source(M, weight_dtype, "float", "") for weight_dtype in WEIGHT_TYPES[dtype]),
                      quantize_filters, output_transform_source(M, "int", scaled=True)])


@functools.cache
def _kernels(dtype: torch.dtype) -> ctypes.CDLL | None:
    """The compiled passes of `dtype` (built once per source and machine); None, logged once, where they cannot be."""
    kernels = compiled_library(f"int8-winograd-{SUFFIXES[dtype]}", kernel_source(dtype))
    if kernels is None:
        return None
    pointer, size, index = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    grid = [*[size] * 7, index, index, size]   # batch, h, w, c, pad, rows, cols; first, count; threads
    kernels.input_transform_s8.argtypes = [pointer, pointer, pointer, pointer, pointer, *grid]
    for weight_dtype in WEIGHT_TYPES[dtype]:
        getattr(kernels, f"weight_transform_{SUFFIXES[weight_dtype]}").argtypes = [pointer, pointer, size, size, size]
    kernels.output_transform.argtypes = [pointer, pointer, pointer, pointer, pointer, *[size] * 7, index, index, size]
    kernels.quantize_filters.argtypes = [pointer, index, index, index, pointer, index, pointer, index, ctypes.c_float,
                                         size]
    return kernels


@dataclass
class WinogradWeight:
    """A 3×3 convolution's weight as F(2×2)'s 16 transformed filters G·g·Gᵀ in int8: `values` [16, out, in], one
    scale per position and output channel (`scales` [16, out]: w ≈ values · scales)."""

    values: torch.Tensor
    scales: torch.Tensor


def pack_winograd_weight(weight: torch.Tensor, dtype: torch.dtype) -> WinogradWeight:
    """A 3×3 `weight` (out × in × 3 × 3; bf16, or the file's fp16 / fp32) as F(2×2)'s 16 transformed filters
    (computed in fp32 by the C weight transform of the `dtype` activations' kernels, WEIGHT_BLOCK output channels at a
    time), each an int8 matrix with one scale per output channel (symmetric, at most ±`weight_limit()`)."""
    kernels = _kernels(dtype)
    out_channels, in_channels = weight.shape[:2]
    limit, threads = weight_limit(), torch.get_num_threads()
    values = torch.empty(POSITIONS, out_channels, in_channels, dtype=torch.int8)
    scales = torch.empty(POSITIONS, out_channels)
    transform = getattr(kernels, f"weight_transform_{SUFFIXES[weight.dtype]}")
    for low in range(0, out_channels, WEIGHT_BLOCK):
        block = weight[low:low + WEIGHT_BLOCK].detach().permute(0, 2, 3, 1).contiguous()   # [out][3][3][in]
        transformed = scratch("int8-winograd-weight", (POSITIONS, len(block), in_channels), torch.float32)
        transform(block.data_ptr(), transformed.data_ptr(), len(block), in_channels, threads)
        kernels.quantize_filters(transformed.data_ptr(), POSITIONS * len(block), in_channels, len(block),
                                 values[0, low].data_ptr(), out_channels * in_channels, scales[0, low:].data_ptr(),
                                 out_channels, float(limit), threads)
    return WinogradWeight(values, scales)


def int8_winograd_conv2d(x: torch.Tensor, weight: WinogradWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """conv2d(x, weight, bias, padding=1) for a bf16 or fp32 CPU tensor by F(2×2)'s 16 int8 products (s8 × s8 into
    int32, torch._int_mm), the weight packed by `pack_winograd_weight`, channels-last output; None where a pass's
    transformed input has an outlier channel or is not finite (the caller's float code runs). The caller checks
    `int8_winograd_applies` first."""
    kernels = _kernels(x.dtype)
    batch, channels, height, width = x.shape
    out_channels = weight.values.shape[1]
    rows, cols = -(-height // M), -(-width // M)
    tiles = batch * rows * cols
    x = x.contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(batch, out_channels, height, width, dtype=x.dtype, memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    span = max(1, min(tiles, CHUNK_BYTES // (POSITIONS * channels)))   # tiles per pass
    work = scratch("int8-winograd-tiles", (threads, POSITIONS, channels), torch.float32)
    for first in range(0, tiles, span):
        count = min(span, tiles - first)
        v = scratch("int8-winograd-input", (POSITIONS, count, channels), torch.int8)
        tile_scales, summary = torch.empty(POSITIONS, count), torch.empty(2, POSITIONS)
        kernels.input_transform_s8(x.data_ptr(), v.data_ptr(), tile_scales.data_ptr(), summary.data_ptr(),
                                   work.data_ptr(), batch, height, width, channels, 1, rows, cols, first, count,
                                   threads)
        peaks, sizes = summary[0] / count, summary[1] / (count * channels)
        if not bool(torch.isfinite(summary).all()) or bool((2 * peaks > MAX_SPREAD * sizes).any()):
            return None
        products = scratch("int8-winograd-products", (POSITIONS, count, out_channels), torch.int32)
        for p in range(POSITIONS):
            torch._int_mm(v[p], weight.values[p].t(), out=products[p])
        kernels.output_transform(products.data_ptr(), weight.scales.data_ptr(), tile_scales.data_ptr(),
                                 None if bias is None else bias.data_ptr(), y.data_ptr(), batch, height, width,
                                 out_channels, out_channels, rows, cols, first, count, threads)
    return y


def int8_winograd_applies(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` takes the int8 Winograd path: a plain 3×3 convolution of a bf16 or fp32 CPU tensor without
    gradients, channels in multiples of CHANNEL_BLOCK and at least MIN_CHANNELS in, `int8_winograd_available` for its
    dtype."""
    return plain_3x3(conv, x) and _converts(conv) and int8_winograd_available(x.dtype)


def int8_winograd_available(dtype: torch.dtype) -> bool:
    """Whether int8 Winograd convolutions run for a model computing in `dtype` (bf16, or fp32 on the fast fp32 path)
    on this machine: int8 products available, the passes built and measured faster than the dtype's own ones."""
    return int8_available(dtype) and _kernels(dtype) is not None and int8_winograd_pays(dtype)


@functools.cache
def int8_winograd_pays(dtype: torch.dtype) -> bool:
    """Whether the int8 Winograd convolution beats the dtype's own fast convolution (its Winograd one) on this
    machine, timed on SD1.5's most frequent 3×3 convolution at 512² (320 → 320 channels, 64², CFG batch) with the
    weight packed beforehand, as a model's is (models/tuning.py)."""
    def ways():
        x, weight, bias = conv_inputs(2, 320, 320, 64, 64, dtype)
        packed = pack_winograd_weight(weight, dtype)
        return lambda: int8_winograd_conv2d(x, packed, bias), lambda: winograd_conv2d(x, weight, bias)

    return candidate_pays(f"int8-winograd-{SUFFIXES[dtype]}", ways, dtype)


class Int8WinogradConv2d(WinogradConv2d):
    """A 3×3 convolution by F(2×2)'s int8 products where `int8_winograd_applies` (its weight packed once per
    version), else as WinogradConv2d (the file's weight read in the input's dtype)."""

    @releasing_buffers
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int8_winograd_applies(self, x):
            packed = packed_for(self, self.weight, None, lambda: pack_winograd_weight(self.weight, x.dtype))
            out = int8_winograd_conv2d(x, packed, self.bias)
            if out is not None:
                return out
        return super().forward(x)


def _converts(conv: torch.nn.Module) -> bool:
    """Whether `conv` is a convolution `use_int8_convolutions` converts: a plain 3×3 one (stride 1, padding 1, no
    dilation or groups) with channels in and out in multiples of CHANNEL_BLOCK and at least MIN_CHANNELS in."""
    return (type(conv) in (torch.nn.Conv2d, WinogradConv2d, Int8WinogradConv2d) and plain_3x3_layer(conv)
            and conv.in_channels >= MIN_CHANNELS and conv.in_channels % CHANNEL_BLOCK == 0
            and conv.out_channels % CHANNEL_BLOCK == 0)


def _int8_convolutions(model: torch.nn.Module, dtype: torch.dtype) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each convolution of `model` `use_int8_convolutions` converts (`_converts`); none where
    int8 Winograd is not available for `dtype`."""
    if not int8_winograd_available(dtype):
        return []
    return [(name, module) for name, module in model.named_modules() if _converts(module)]


def use_int8_convolutions(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give `model`'s plain 3×3 convolutions of MIN_CHANNELS or more the int8 Winograd subclass (same weights, same
    state; their float code runs wherever int8 does not apply) where `int8_winograd_available` for `dtype`, the dtype
    the model computes in."""
    for _, module in _int8_convolutions(model, dtype):
        module.__class__ = Int8WinogradConv2d


def int8_convolution_weight_names(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """The state-dict names of the weights `use_int8_convolutions(model, dtype)` gives int8 products."""
    return {f"{name}.weight" for name, _ in _int8_convolutions(model, dtype)}
