"""LoHa (LyCORIS): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/rank; with Tucker cores hada_t1/t2 for convs."""
from __future__ import annotations

import torch
from torch import Tensor

from sdstudio.models.lora.base import Adapter, rank_scale

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _factor(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
    if t is None:
        return a @ b
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def load(tensors: dict[str, Tensor]) -> Adapter | None:
    """A LoHa adapter, or None."""
    if not all(k in tensors for k in KEYS):
        return None
    w1a, w1b, w2a, w2b = (tensors[k].float() for k in KEYS)
    t1 = tensors["hada_t1"].float() if "hada_t1" in tensors else None
    t2 = tensors["hada_t2"].float() if "hada_t2" in tensors else None
    scale = rank_scale(tensors.get("alpha"), w1b.shape[0])
    keys = list(KEYS) + [k for k in ("hada_t1", "hada_t2", "alpha") if k in tensors]
    return Adapter("loha", keys, lambda weight: _factor(w1a, w1b, t1) * _factor(w2a, w2b, t2) * scale)
