"""Attention for the CPU fast paths: multi-head attention by our flash-attention kernels (or OpenVINO's), one wide
head by blocks. The fast fp32 path's models get the same processor: its multi-head attention by the fp32 flash
kernel (kernels/flash_attention_fp32.c: the same online softmax with fp32 FMA products, 256-bit on AVX2, 512-bit on
AVX-512; SD1.5's 8 heads of 40 over 4096 tokens 1.13–1.17× PyTorch's kernel on AVX2, error 4.9e-7 against its
3.7e-7), where measured faster, and the CFG saving below (a self-attention over a batch of two equal halves computed
once); the rest goes to diffusers' processor.

On CPUs without AMX, PyTorch's flash-attention kernel runs the UNet's long self-attention (4096 tokens at 512², head
width 40 or 64) at a fraction of the speed of its matrix products: it was 29 % of an SD1.5 step. On CPUs with
AVX512-BF16, our C kernel (kernels/flash_attention.c: both products as bf16 dot products with fp32 sums, the softmax
online per block of query rows and keys, scores in fp32) runs it 2.8× faster than PyTorch's and 1.5× faster than
OpenVINO's CPU SDPA kernel (8 heads of 40, 4096 tokens, CFG batch: 127 vs 349 and 185 ms), and the cross-attention
over the prompt's 77 tokens 3.4× faster than PyTorch's (3.8 vs 13.0 ms; bench/attention.py); only the smallest
attention (fewer than FLASH_MIN_SCORES scores per head) stays with PyTorch. Where our kernel is not built (no
AVX512-BF16, no C compiler) or is measured slower, long attention (keys from LONG_ATTENTION on) goes through
OpenVINO's kernel (1.6–2× PyTorch's there), its graph (reshape to heads → SDPA → merge heads) built in code per head
count. Attention has no weights, so none of this costs anything at load, and LoRA patching is untouched.

The VAE's attention block (one head of 512 over every latent pixel: 4096 tokens at 512², 65536 at 2048²) runs as
blocks of query rows, each two oneDNN matrix products around a softmax: 2–3× PyTorch's kernel at 4096 to 65536
tokens; OpenVINO's kernel is as fast at 4096 but falls below PyTorch's once the keys outgrow the cache. Scores are
rounded to bf16 before the softmax, as OpenVINO's kernel does (relative output error vs fp32 4.5e-3 for scores of
spread 1, 1.3e-2 for spread 3, the same for both kernels; PyTorch's keeps them fp32: 1.7e-3).

These kernels were measured faster on AVX512-BF16 without AMX; on another CPU each is used only where it beats
the kernel it replaces there (`flash_pays`, `openvino_pays`, `blocked_pays`: measured once per machine,
models/tuning.py).

Any case the narrow paths do not cover (masks, spatial or q/k norms, another device or dtype, gradients, neither
the flash kernel nor OpenVINO for a multi-head attention) goes to diffusers' own processor.
"""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sdstudio.models.native import cpu_library, release_kernel_buffers, releasing_buffers, scratch
from sdstudio.models.tuning import candidate_pays

LONG_ATTENTION = 1024   # keys from this many tokens on go through OpenVINO (measured crossover: 77 no, 1024 yes)
FLASH_MAX_WIDTH = 256   # head widths the flash kernel takes (even ones up to this)
FLASH_MIN_SCORES = 16384   # scores per head from which it runs (measured, 8 heads: 256 × 77 1.1 vs PyTorch's 1.9
                           # ms, 64 × 77 0.59 vs 0.54)
FLASH_TASK_ROWS = 64    # query rows per task of the flash kernel's threads (a multiple of its 8-row tiles)
ROWS = 256   # query rows per block (measured, width 512, rows 128 / 256 / 512: 4096 tokens 96 / 89 / 88 ms, 16384
             # tokens 1.69 / 1.53 / 1.48 s, 65536 tokens 33.8 / 30.3 / 30.0 s; a block's scores: 32 MiB at 65536)


@functools.cache
def _openvino():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


@functools.cache
def _compiled_attention(heads: int, threads: int):
    """OpenVINO model (batch, tokens, heads·width) ×3 → (batch, tokens, heads·width) in bf16, compiled for CPU."""
    ov = _openvino()
    from openvino import opset13 as ops

    def heads_first(x):
        x = ops.reshape(x, ops.constant(np.array([0, 0, heads, -1], dtype=np.int64)), special_zero=True)
        return ops.transpose(x, ops.constant(np.array([0, 2, 1, 3], dtype=np.int64)))

    inputs = [ops.parameter(ov.PartialShape([-1, -1, -1]), ov.Type.bf16, name=name) for name in ("q", "k", "v")]
    attended = ops.scaled_dot_product_attention(*(heads_first(x) for x in inputs), causal=False)
    merged = ops.reshape(ops.transpose(attended, ops.constant(np.array([0, 2, 1, 3], dtype=np.int64))),
                         ops.constant(np.array([0, 0, -1], dtype=np.int64)), special_zero=True)
    return ov.Core().compile_model(ov.Model([merged], inputs), "CPU",
                                   {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads})


def openvino_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q·kᵀ/√width)·v per head for bf16 (batch, tokens, heads·width) tensors, computed by OpenVINO."""
    ov = _openvino()
    request = _compiled_attention(heads, torch.get_num_threads()).create_infer_request()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    shared = [ov.Tensor(x.contiguous().view(torch.int16).numpy(), x.shape, ov.Type.bf16) for x in (q, k, v, out)]
    request.set_output_tensor(0, shared.pop())
    request.infer(shared, share_inputs=True)
    return out


FLASH_KERNELS = {torch.bfloat16: ("flash_attention", "avx512_bf16"),     # source, CPU flags it needs
                 torch.float32: ("flash_attention_fp32", "avx2", "fma")}


@functools.cache
def _flash_kernels(dtype: torch.dtype = torch.bfloat16) -> ctypes.CDLL | None:
    """The flash-attention kernel for `dtype` built for this machine; None without the CPU instructions it needs
    (AVX512-BF16 for bf16, AVX2 and FMA for fp32) or a C compiler."""
    kernels = cpu_library(*FLASH_KERNELS[dtype])
    if kernels is not None:
        pointer, index = ctypes.c_void_p, ctypes.c_long
        kernels.pack.argtypes = [pointer, pointer, *[index] * 6, pointer, pointer, ctypes.c_int]
        kernels.attend.argtypes = [pointer, index, pointer, pointer, pointer, *[index] * 7, ctypes.c_float, index,
                                   ctypes.c_int]
    return kernels


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q·kᵀ/√width)·v per head for bf16 or fp32 (batch, tokens, heads·width) tensors (k and v: the same
    number of tokens, any), computed by the flash-attention kernel of their dtype; width even and at most
    FLASH_MAX_WIDTH."""
    kernels = _flash_kernels(q.dtype)
    q, k, v = (x.contiguous() for x in (q, k, v))
    batch, tokens_q, channels = q.shape
    tokens_k, width = k.shape[1], channels // heads
    padded, blocks, size = -(-tokens_k // 32) * 32, -(-width // 16), q.dtype.itemsize
    keys = scratch("flash keys", (batch * heads * padded * width * size // 4,), torch.int32)
    values = scratch("flash values", (batch * heads * padded * blocks * 16 * size // 4,), torch.int32)
    kernels.pack(k.data_ptr(), v.data_ptr(), batch, heads, channels, tokens_k, padded, width, keys.data_ptr(),
                 values.data_ptr(), torch.get_num_threads())
    out = torch.empty_like(q)
    kernels.attend(q.data_ptr(), channels, keys.data_ptr(), values.data_ptr(), out.data_ptr(), channels, batch, heads,
                   tokens_q, tokens_k, padded, width, width ** -0.5, FLASH_TASK_ROWS, torch.get_num_threads())
    return out


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """softmax(q·kᵀ/√width)·v for one head (`heads` 1: the other kernels' signature), bf16 (batch, tokens, width)
    tensors: a block of query rows at a time, its scores (bf16) by one matrix product, softmax, then the product
    with v into the output's rows."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    q = q * q.shape[-1] ** -0.5
    for image in range(q.shape[0]):
        keys_t, values = k[image].t(), v[image]
        for start in range(0, q.shape[1], ROWS):
            scores = torch.mm(q[image, start:start + ROWS], keys_t)
            torch.mm(torch.softmax(scores, -1), values, out=out[image, start:start + ROWS])
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """PyTorch's SDPA for (batch, tokens, heads·width) tensors."""
    split = [x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(q.shape)


def _pays(name: str, heads: int, width: int, kernel, baseline=_sdpa, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether `kernel(q, k, v, heads)` beats `baseline` (PyTorch's SDPA) on this machine for 4096 tokens of
    `heads` × `width` (SD1.5's largest attention at 512²) in `dtype`, measured once per machine (choice `name`,
    "-fp32" added for fp32)."""
    name += "" if dtype == torch.bfloat16 else "-fp32"
    def ways():
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4096, heads * width, generator=generator).to(dtype) for _ in range(3))
        return lambda: kernel(q, k, v, heads), lambda: baseline(q, k, v, heads)

    try:
        return candidate_pays(name, ways, dtype)
    finally:
        release_kernel_buffers()


def _replaced_by_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The kernel the flash kernel replaces: OpenVINO's where that beats PyTorch's, else PyTorch's (decided only
    when the flash kernel is measured: a kept choice imports no OpenVINO)."""
    return (openvino_attention if openvino_pays() else _sdpa)(q, k, v, heads)


@functools.cache
def flash_pays(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the flash kernel for `dtype` beats the one it replaces on this machine (bf16: OpenVINO's where that
    beats PyTorch's; fp32: PyTorch's): the UNet's self-attention (8 heads of 40)."""
    if _flash_kernels(dtype) is None:
        return False
    return _pays("flash-attention", 8, 40, flash_attention,
                 _replaced_by_flash if dtype == torch.bfloat16 else _sdpa, dtype)


@functools.cache
def openvino_pays() -> bool:
    """Whether OpenVINO's kernel beats PyTorch's on this machine: the UNet's self-attention (8 heads of 40)."""
    return _openvino() is not None and _pays("openvino-attention", 8, 40, openvino_attention)


@functools.cache
def blocked_pays(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether `blocked_attention` in `dtype` beats PyTorch's kernel on this machine: the VAE's attention block (one
    head of 512)."""
    return _pays("blocked-attention", 1, 512, blocked_attention, dtype=dtype)


def _repeated_halves(x: torch.Tensor) -> bool:
    """True when the second half of the batch repeats the first (a CFG batch before the text condition enters)."""
    half = x.shape[0] // 2
    return (x.shape[0] % 2 == 0 and half > 0 and torch.equal(x[0, :1], x[half, :1])
            and torch.equal(x[:half], x[half:]))


class FastCPUAttention:
    """diffusers attention processor: long plain attention of bf16 or fp32 CPU tensors by the flash kernel of their
    dtype or (bf16) OpenVINO (a single head by `blocked_attention`), each where measured faster, the rest via
    diffusers' AttnProcessor2_0 (PyTorch SDPA), with the same steps around it (a VAE block's 4-D input, group norm,
    residual). A self-attention whose batch is one half repeated (a CFG step's first transformer block: the text
    condition enters after it) computes the half once."""

    def __init__(self):
        self.fallback = AttnProcessor2_0()

    @releasing_buffers
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if (encoder_hidden_states is None and attention_mask is None and not torch.is_grad_enabled()
                and _repeated_halves(hidden_states)):   # exact: each image's attention is its own
            half = self(attn, hidden_states[:hidden_states.shape[0] // 2], None, None, temb, *args, **kwargs)
            return torch.cat([half, half])
        kernel = self._kernel(attn, hidden_states, encoder_hidden_states, attention_mask)
        if kernel is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual, shape = hidden_states, hidden_states.shape
        if hidden_states.ndim == 4:   # a VAE attention block: (batch, channels, height, width) → tokens
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = kernel(q, k, v, attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else out

    @staticmethod
    def _kernel(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                attention_mask: torch.Tensor | None):
        """The kernel(q, k, v, heads) for this attention on this machine; None: diffusers' processor."""
        width = attn.inner_dim // attn.heads
        queries = math.prod(hidden_states.shape[2:]) if hidden_states.ndim == 4 else hidden_states.shape[1]
        if encoder_hidden_states is None:   # self-attention: the keys are the tokens (a 4-D input's pixels)
            keys = queries
        elif hidden_states.ndim == 3 and encoder_hidden_states.ndim == 3:
            keys = encoder_hidden_states.shape[1]
        else:
            return None
        dtype = hidden_states.dtype
        if (torch.is_grad_enabled() or attention_mask is not None or hidden_states.ndim not in (3, 4)
                or hidden_states.device.type != "cpu" or dtype not in FLASH_KERNELS
                or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None
                or attn.norm_cross or abs(attn.scale - width ** -0.5) >= 1e-9 or attn.inner_dim != attn.inner_kv_dim):
            return None
        if attn.heads == 1:
            return blocked_attention if keys >= LONG_ATTENTION and blocked_pays(dtype) else None
        if queries * keys >= FLASH_MIN_SCORES and width % 2 == 0 and width <= FLASH_MAX_WIDTH and flash_pays(dtype):
            return flash_attention
        return openvino_attention if dtype == torch.bfloat16 and keys >= LONG_ATTENTION and openvino_pays() else None


def use_fast_cpu_attention(model: torch.nn.Module) -> None:
    """Give every diffusers Attention in `model` the FastCPUAttention processor (one shared instance)."""
    processor = FastCPUAttention()
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
