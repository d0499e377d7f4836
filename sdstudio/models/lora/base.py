"""What every LoRA/LyCORIS format module returns: an adapter that gives ΔW for one weight (fp32, incl. its own
alpha/rank scale), with DoRA's weight decomposition applied when the file carries `dora_scale`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor


def fit_shape(delta: Tensor, weight: Tensor) -> Tensor:
    """ΔW reshaped to the weight; a 4-input-channel conv delta zero-padded for 9/8-channel inpainting convs (A1111)."""
    if delta.shape == weight.shape:
        return delta
    if delta.numel() == weight.numel():
        return delta.reshape(weight.shape)
    if delta.ndim == 4 and weight.ndim == 4 and delta.shape[1] < weight.shape[1] and \
            (delta.shape[0], *delta.shape[2:]) == (weight.shape[0], *weight.shape[2:]):
        padded = weight.new_zeros(weight.shape)
        padded[:, :delta.shape[1]] = delta
        return padded
    raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(weight.shape)}")


@dataclass
class Adapter:
    """ΔW for one module's weight (and optionally its bias), computed on demand in fp32."""

    kind: str
    keys: list[str]                               # the file keys this adapter used
    weight_delta: Callable[[Tensor], Tensor] | None  # weight (fp32) -> ΔW (fp32, any shape with the same numel)
    bias_delta: Tensor | None = None
    dora_scale: Tensor | None = field(default=None, repr=False)
    factors: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # ΔW = A @ B when low-rank (plain LoRA)

    @property
    def low_rank_factors(self) -> tuple[Tensor, Tensor] | None:
        """(A, B) with ΔW = A @ B (flattened to 2-D) when that is the whole delta (no DoRA), for a fused update."""
        return self.factors if self.dora_scale is None else None

    def delta(self, weight: Tensor) -> Tensor:
        """ΔW (fp32, weight's shape) at strength 1; DoRA: W·m/‖W+ΔW‖ − W (A1111 `apply_weight_decompose`)."""
        delta = fit_shape(self.weight_delta(weight).float(), weight)
        if self.dora_scale is None:
            return delta
        merged = weight + delta
        scale = self.dora_scale.float()
        if scale.shape[0] == weight.shape[0] and scale.numel() == weight.shape[0]:   # PEFT: per output row
            norm = merged.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
            scale = scale.reshape(norm.shape)
        else:                                                                         # LyCORIS/kohya: per input column
            norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, -1, *[1] * (weight.ndim - 2))
            scale = scale.reshape(norm.shape)
        return merged * (scale / norm) - weight


def rank_scale(alpha: Tensor | None, rank: int) -> float:
    """alpha / rank, or 1 when the file has no alpha (A1111 and ComfyUI)."""
    return float(alpha) / rank if alpha is not None else 1.0
