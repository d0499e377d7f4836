"""LoRA / LoCon (kohya, PEFT and diffusers spellings): ΔW = up @ down · alpha/rank, with CP `lora_mid` (Tucker)."""
from __future__ import annotations

import torch
from torch import Tensor

from sdstudio.models.lora.base import Adapter, rank_scale

# (up, down, mid) suffix spellings found in the wild (formats.md §4.3)
SPELLINGS = (
    ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    ("lora_B.weight", "lora_A.weight", None),
    ("lora.up.weight", "lora.down.weight", None),
    ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight", None),
    ("lora_B.default.weight", "lora_A.default.weight", None),
    ("lora_B", "lora_A", None),
)


def load(tensors: dict[str, Tensor]) -> Adapter | None:
    """A LoRA adapter from one module's tensors (suffix -> tensor), or None when they are not LoRA."""
    for up_key, down_key, mid_key in SPELLINGS:
        if up_key in tensors and down_key in tensors:
            up, down = tensors[up_key].float(), tensors[down_key].float()
            mid = tensors.get(mid_key).float() if mid_key and mid_key in tensors else None
            scale = rank_scale(tensors.get("alpha"), down.shape[0])
            keys = [up_key, down_key] + [k for k in (mid_key, "alpha") if k and k in tensors]

            def weight_delta(weight: Tensor, up=up, down=down, mid=mid, scale=scale) -> Tensor:
                if mid is None:
                    return ((up.flatten(1) * scale) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
                return torch.einsum("m n h w, n i, o m -> o i h w", mid, down.flatten(1), up.flatten(1) * scale)

            factors = ((up.flatten(1) * scale).contiguous(), down.flatten(1).contiguous()) if mid is None else None
            return Adapter("lora", keys, weight_delta, factors=factors)
    return None
