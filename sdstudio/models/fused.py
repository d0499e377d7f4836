"""Fused layers for the CPU fast paths (bf16, and fp32 with `fast_fp32`): fewer passes over the UNet's largest
activations.

- GEGLU (every transformer block's feed-forward): diffusers computes proj(x), 2 × inner wide, then splits it and
  multiplies one half by GELU of the other: a wide product and three more passes over it. Here, where the CPU has
  AVX512-BF16 and it was measured faster (`geglu_kernel_pays`), both halves run in one pass of our C kernel
  (kernels/geglu.c: each tile's value and gate sums in registers, GELU · product on them, the weight packed for it on
  every call so LoRA patches show through): SD1.5's 8192 × 320 → 2 × 1280 in 34 ms. Elsewhere the two halves of the
  same weight (row views) run as two oneDNN linears, the gate with its GELU fused and the other half with the product
  fused (42–51 ms; diffusers' own code 72). In fp32 (the fast fp32 path), where the CPU has AVX2 and FMA and it was
  measured faster (`gelu_product_pays`), the whole projection runs as one product into a kept buffer and our C kernel
  (kernels/gelu_product.c) takes GELU · product in one pass: oneDNN's fused GELU ran at a third of the product's speed
  on AVX2 (Zen 3, SD1.5 CFG, two fused linears / product + kernel: 8192 × 320 → 2 × 1280 148 / 81 ms, 2048 × 640 →
  2 × 2560 106 / 79, 512 × 1280 → 2 × 5120 110 / 84; error vs float64 3.2–6.7e-7 / 2.4–3.3e-7).
- Transformer2DModel: diffusers makes its channels-last output NCHW-contiguous (a copy) and the next convolution
  converts it back; here the permuted view, already channels-last, goes on as it is.

Anything else (another device or dtype, gradients, a non-contiguous input) takes diffusers' own code.
"""
from __future__ import annotations

import ctypes
import functools

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from sdstudio.models.half_weights import weight_for
from sdstudio.models.native import cpu_library, release_kernel_buffers, releasing_buffers, scratch
from sdstudio.models.tuning import candidate_pays

GEGLU_PANEL = 16       # the kernel's PANEL: the inner width must be a multiple of it
GEGLU_MIN_ROWS = 1024  # fewer tokens stay with oneDNN: packing the weight is a bigger part there (SD1.5's 16² level,
                       # 512 with CFG, 1280 → 2 × 5120: 0.97×)


def fast_cpu_tensor(x: torch.Tensor) -> bool:
    """A bf16 or fp32 CPU tensor without gradients (fp32 models get the fast layers only on the fast fp32 path)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and not torch.is_grad_enabled()


@functools.cache
def _geglu_kernel() -> ctypes.CDLL | None:
    """The GEGLU kernel built for this machine; None without AVX512-BF16 or a C compiler."""
    kernel = cpu_library("geglu", "avx512_bf16")
    if kernel is not None:
        pointer, index, count = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        kernel.pack_weight.argtypes = [pointer, index, index, index, pointer, count]
        kernel.geglu.argtypes = [pointer, index, pointer, pointer, pointer, index, index, index, count]
    return kernel


def geglu_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """value · GELU(gate) of x · weightᵀ + bias split in halves (value first), for bf16 rows x (2-D, each row
    contiguous), by the GEGLU kernel; the caller checks `geglu_kernel_applies`."""
    kernel, threads = _geglu_kernel(), torch.get_num_threads()
    rows, width = x.shape
    half = weight.shape[0] // 2
    packed = scratch("geglu weight", (weight.shape[0] * width // 2,), torch.int32)
    kernel.pack_weight(weight.data_ptr(), weight.stride(0), half, width, packed.data_ptr(), threads)
    out = torch.empty(rows, half, dtype=x.dtype)
    kernel.geglu(x.data_ptr(), x.stride(0), packed.data_ptr(), None if bias is None else bias.contiguous().data_ptr(),
                 out.data_ptr(), rows, half, width, threads)
    return out


def geglu_kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `geglu_rows(x, weight, bias)` runs (bf16 CPU tensors assumed): at least GEGLU_MIN_ROWS rows of an
    even width, a weight with contiguous rows whose halves are multiples of GEGLU_PANEL, a bf16 bias or none, and the
    kernel built and measured faster here."""
    return (x.shape[0] >= GEGLU_MIN_ROWS and x.shape[1] % 2 == 0 and x.stride(1) == weight.stride(1) == 1
            and (bias is None or bias.dtype == torch.bfloat16) and weight.shape[0] % (2 * GEGLU_PANEL) == 0
            and _geglu_kernel() is not None and geglu_kernel_pays())


@functools.cache
def geglu_kernel_pays() -> bool:
    """Whether the GEGLU kernel beats the two fused oneDNN linears on this machine (models/tuning.py), timed on SD1.5's
    at 512² (CFG batch: 8192 tokens, 320 → 2 × 1280). On CPUs with AMX, oneDNN's products run on its tiles and win."""
    def ways():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8192, 320, generator=generator).bfloat16()
        weight = (torch.randn(2560, 320, generator=generator) * 0.05).bfloat16()
        return lambda: geglu_rows(x, weight, None), lambda: _onednn_geglu(x, weight, None)

    return candidate_pays("geglu-kernel", ways, torch.bfloat16)


@functools.cache
def _gelu_product_kernel() -> ctypes.CDLL | None:
    """The fp32 GELU · product kernel built for this machine; None without AVX2 and FMA or a C compiler."""
    kernel = cpu_library("gelu_product", "avx2", "fma")
    if kernel is not None:
        pointer, index = ctypes.c_void_p, ctypes.c_long
        kernel.gelu_product.argtypes = [pointer, index, index, index, pointer, ctypes.c_int]
    return kernel


def product_then_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """geglu_rows for fp32 rows x: x · weightᵀ + bias by one product into a kept buffer, then value · GELU(gate) over
    it by the gelu_product kernel; the caller checks `gelu_product_applies`."""
    rows, half = x.shape[0], weight.shape[0] // 2
    projection = scratch("geglu projection", (rows, weight.shape[0]), x.dtype)
    if bias is None:
        torch.mm(x, weight.t(), out=projection)
    else:
        torch.addmm(bias, x, weight.t(), out=projection)
    out = torch.empty(rows, half, dtype=x.dtype)
    _gelu_product_kernel().gelu_product(projection.data_ptr(), projection.stride(0), rows, half, out.data_ptr(),
                                        torch.get_num_threads())
    return out


def gelu_product_applies(bias: torch.Tensor | None) -> bool:
    """Whether `product_then_geglu` runs for fp32 rows (fp32 CPU tensors assumed): an fp32 bias or none, and the
    kernel built and measured faster here."""
    return ((bias is None or bias.dtype == torch.float32) and _gelu_product_kernel() is not None
            and gelu_product_pays())


@functools.cache
def gelu_product_pays() -> bool:
    """Whether `product_then_geglu` beats the two fused oneDNN linears in fp32 on this machine (models/tuning.py),
    timed on SD1.5's GEGLU at 512² (CFG batch: 8192 tokens, 320 → 2 × 1280)."""
    def ways():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(8192, 320, generator=generator)
        weight = torch.randn(2560, 320, generator=generator) * 0.05
        return lambda: product_then_geglu(x, weight, None), lambda: _onednn_geglu(x, weight, None)

    try:
        return candidate_pays("gelu-product", ways, torch.float32)
    finally:
        release_kernel_buffers()


def _onednn_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """geglu_rows by two oneDNN linears over the halves of the weight: GELU fused into the gate's, the product into
    the value's."""
    half = weight.shape[0] // 2
    value_bias, gate_bias = (None, None) if bias is None else (bias[:half], bias[half:])
    gate = torch.ops.mkldnn._linear_pointwise(x, weight[half:], gate_bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, gate, weight[:half], value_bias, "mul")


class FusedGEGLU(GEGLU):
    """GEGLU in one pass of our kernel where it applies, else as two oneDNN linears over the halves of its
    projection: GELU fused into the gate's, the product into the other's."""

    @releasing_buffers
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.fused_forward(hidden_states, weight_for(self.proj, hidden_states), *args, **kwargs)

    def fused_forward(self, hidden_states: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The forward with `weight` standing for the projection's (int8's bf16 code passes its weight in bf16)."""
        bias = self.proj.bias
        if not (fast_cpu_tensor(hidden_states) and hidden_states.is_contiguous() and weight.is_contiguous()
                and weight.dtype == hidden_states.dtype):
            return super().forward(hidden_states, *args, **kwargs)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if x.dtype == torch.bfloat16 and geglu_kernel_applies(x, weight, bias):
            out = geglu_rows(x, weight, bias)
        elif x.dtype == torch.float32 and gelu_product_applies(bias):
            out = product_then_geglu(x, weight, bias)
        else:
            out = _onednn_geglu(x, weight, bias)
        return out.reshape(*hidden_states.shape[:-1], -1)


class ChannelsLastTransformer2D(Transformer2DModel):
    """Transformer2DModel whose spatial output stays in the channels-last layout it is computed in."""

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if not fast_cpu_tensor(hidden_states):
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width,
                                                             inner_dim)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual


FUSED_CLASSES = {GEGLU: FusedGEGLU, Transformer2DModel: ChannelsLastTransformer2D}


def use_fused_layers(model: torch.nn.Module) -> None:
    """Give the GEGLU and Transformer2DModel modules of `model` their fused subclasses (same weights, same state)."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        fused = FUSED_CLASSES.get(type(module))
        if fused is not None:
            module.__class__ = fused
