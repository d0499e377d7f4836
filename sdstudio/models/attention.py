"""Attention for the bf16 CPU fast path: long attention through OpenVINO's SDPA kernel.

On CPUs without AMX, PyTorch's flash-attention kernel runs the UNet's long self-attention (4096 tokens at 512²,
head width 40 or 64) at a fraction of the speed of its matrix products: it was 29 % of an SD1.5 step. OpenVINO's
CPU SDPA kernel does the same attention 1.6–2× faster (bench/RESULTS.md). Attention has no weights, so this costs
nothing at load and LoRA patching is untouched; the OpenVINO graph (reshape to heads → SDPA → merge heads) is
built in code per head count and compiles in milliseconds. Short attention (cross-attention over 77 tokens, the
smallest levels) stays with PyTorch, which is faster there. Any case the narrow path does not cover (masks,
group norm, residual, 4-D input, another device or dtype, gradients, OpenVINO not installed) goes to diffusers' own processor.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

LONG_ATTENTION = 1024   # keys from this many tokens on go through OpenVINO (measured crossover: 77 no, 1024 yes)


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


def _repeated_halves(x: torch.Tensor) -> bool:
    """True when the second half of the batch repeats the first (a CFG batch before the text condition enters)."""
    half = x.shape[0] // 2
    return (x.shape[0] % 2 == 0 and half > 0 and torch.equal(x[0, :1], x[half, :1])
            and torch.equal(x[:half], x[half:]))


class FastCPUAttention:
    """diffusers attention processor: long plain attention of bf16 CPU tensors via OpenVINO, the rest via
    diffusers' AttnProcessor2_0 (PyTorch SDPA). A self-attention whose batch is one half repeated (a CFG step's
    first transformer block: the text condition enters after it) computes the half once."""

    def __init__(self):
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if (encoder_hidden_states is None and attention_mask is None and not torch.is_grad_enabled()
                and _repeated_halves(hidden_states)):   # exact: each image's attention is its own
            half = self(attn, hidden_states[:hidden_states.shape[0] // 2], None, None, temb, *args, **kwargs)
            return torch.cat([half, half])
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if not self._covers(attn, hidden_states, context, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = openvino_attention(q, k, v, attn.heads)
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def _covers(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor,
                attention_mask: torch.Tensor | None) -> bool:
        width = attn.inner_dim // attn.heads
        return (_openvino() is not None and not torch.is_grad_enabled() and attention_mask is None
                and hidden_states.ndim == 3
                and hidden_states.device.type == "cpu" and hidden_states.dtype == torch.bfloat16
                and context.shape[1] >= LONG_ATTENTION and attn.group_norm is None and attn.spatial_norm is None
                and attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
                and not attn.residual_connection and attn.rescale_output_factor == 1.0
                and abs(attn.scale - width ** -0.5) < 1e-9 and attn.inner_dim == attn.inner_kv_dim)


def use_fast_cpu_attention(model: torch.nn.Module) -> None:
    """Give every diffusers Attention in `model` the FastCPUAttention processor (one shared instance)."""
    processor = FastCPUAttention()
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
