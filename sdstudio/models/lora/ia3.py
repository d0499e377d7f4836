"""(IA)³: ΔW = W ⊙ w, w scaling output rows (or input columns when `on_input` is set) — A1111 network_ia3."""
from __future__ import annotations

from torch import Tensor

from sdstudio.models.lora.base import Adapter


def load(tensors: dict[str, Tensor]) -> Adapter | None:
    """An IA3 adapter, or None (an IA3 module has a 1-D `weight` and the `on_input` flag)."""
    if "weight" not in tensors or "on_input" not in tensors:
        return None
    scale = tensors["weight"].float()
    on_input = bool(tensors["on_input"].item())

    def weight_delta(weight: Tensor) -> Tensor:
        if on_input:
            return weight * scale.reshape(1, -1, *[1] * (weight.ndim - 2))
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1))

    return Adapter("ia3", ["weight", "on_input"], weight_delta)
