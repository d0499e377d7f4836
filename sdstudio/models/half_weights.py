"""The fast fp32 path's weights kept in the file's half precision, widened to fp32 as each layer runs.

Where the CPU has no native bf16 math, `--precision auto` computes in fp32 (models/build.py), and fp32 copies of an
fp16 file's weights double its memory: SD1.5's 1.7 GB of weights become 3.4 GB, SDXL's 5 become 10 (over the
10 GiB target before a single activation). Here the weights of the linear and convolution layers (all but a few
small ones: HALF_KEPT_MIN) stay in the file's fp16 or bf16 — the file's own values, so nothing is rounded and the
path computes exactly what it would with fp32 copies — and each layer widens its weight to fp32 as it runs, into a
buffer reused from one layer to the next (`widened`); the Winograd convolutions read the 16-bit weight in their
per-call weight transform directly (models/winograd.py). Norms, biases, embeddings and each model's first weight
(its `dtype`) stay fp32: a fraction of the bytes. An fp32 file keeps fp32 weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sdstudio.models.native import releasing_buffers, scratch

HALF_TYPES = (torch.float16, torch.bfloat16)
HALF_KEPT_MIN = 1 << 16   # weights with fewer values go fp32: too few bytes to matter, not worth widening per call
WIDENED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def half_kept_names(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> set[str]:
    """The names of `model`'s linear and convolution weights that stay in their 16-bit dtype of `weights` (the file's
    tensors) on the fast fp32 path: those with at least HALF_KEPT_MIN values, but the model's first weight, whose
    dtype diffusers and transformers report as the model's (`model.dtype`: the pipeline computes in it)."""
    first = next(name for name, param in model.named_parameters() if param.is_floating_point())
    names = set()
    for prefix, module in model.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        source = weights.get(name)
        if (isinstance(module, WIDENED_LAYERS) and source is not None and source.dtype in HALF_TYPES
                and source.numel() >= HALF_KEPT_MIN):
            names.add(name)
    return names - {first}


def widened(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in fp32 and its own layout: itself when it is fp32, else a copy in this thread's reused buffer (good
    until the next `widened` call: use it at once)."""
    if weight.dtype == torch.float32:
        return weight
    if weight.dim() == 4 and not weight.is_contiguous():   # a channels-last convolution weight
        out, kh, kw, inputs = weight.shape[0], *weight.shape[2:], weight.shape[1]
        buffer = scratch("widened weight", (out, kh, kw, inputs), torch.float32).permute(0, 3, 1, 2)
    else:
        buffer = scratch("widened weight", tuple(weight.shape), torch.float32)
    return buffer.copy_(weight)


def weight_for(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s weight for the input `x`: `widened` for an fp32 input, else the weight itself (the half-precision
    paths compute in their weights' dtype), or a copy in x's dtype where the weight is the file's in another (the
    int8 path's: models/int8_winograd.py)."""
    if x.dtype == torch.float32:
        return widened(layer.weight)
    return layer.weight if layer.weight.dtype == x.dtype else layer.weight.to(x.dtype)


class WideningLinear(torch.nn.Linear):
    """Linear whose 16-bit weight is widened to fp32 for an fp32 input (`weight_for`)."""

    @releasing_buffers
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight_for(self, x), self.bias)


def use_widening_linears(model: torch.nn.Module) -> None:
    """Make every plain torch Linear of `model` whose weight is 16-bit a WideningLinear (same weights and state)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype in HALF_TYPES:
            module.__class__ = WideningLinear
