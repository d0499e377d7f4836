"""Fused layers for the bf16 CPU fast path: fewer passes over the UNet's largest activations.

- GEGLU (every transformer block's feed-forward): diffusers computes proj(x), 2 × inner wide, then splits it and
  multiplies one half by GELU of the other: a wide product and three more passes over it. Here the two halves of the
  same weight (row views, so LoRA patches show through) run as two oneDNN linears, the gate with its GELU fused and
  the other half with the product fused: SD1.5's 8192 × 320 → 2 × 1280 takes 42 instead of 72 ms.
- Transformer2DModel: diffusers makes its channels-last output NCHW-contiguous (a copy) and the next convolution
  converts it back; here the permuted view, already channels-last, goes on as it is.

Anything else (another device or dtype, gradients, a non-contiguous input) takes diffusers' own code.
"""
from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.transformers.transformer_2d import Transformer2DModel


def fast_cpu_tensor(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()


class FusedGEGLU(GEGLU):
    """GEGLU as two oneDNN linears over the halves of its projection: GELU fused into the gate's, the product
    into the other's."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.fused_forward(hidden_states, self.proj.weight, *args, **kwargs)

    def fused_forward(self, hidden_states: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The forward with `weight` standing for the projection's (int8's bf16 code passes its weight in bf16)."""
        bias = self.proj.bias
        if not (fast_cpu_tensor(hidden_states) and hidden_states.is_contiguous() and weight.is_contiguous()
                and weight.dtype == torch.bfloat16):
            return super().forward(hidden_states, *args, **kwargs)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        half = weight.shape[0] // 2
        value_bias, gate_bias = (None, None) if bias is None else (bias[:half], bias[half:])
        gate = torch.ops.mkldnn._linear_pointwise(x, weight[half:], gate_bias, "gelu", [], "none")
        out = torch.ops.mkldnn._linear_pointwise(x, gate, weight[:half], value_bias, "mul")
        return out.reshape(*hidden_states.shape[:-1], half)


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
