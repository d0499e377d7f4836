"""LoKr (LyCORIS): ΔW = kron(w1, w2) · alpha/rank, each factor full or decomposed (a @ b, or Tucker with t2)."""
from __future__ import annotations

import torch
from torch import Tensor

from sdstudio.models.lora.base import Adapter, rank_scale


def load(tensors: dict[str, Tensor]) -> Adapter | None:
    """A LoKr adapter, or None."""
    has_w1 = "lokr_w1" in tensors or ("lokr_w1_a" in tensors and "lokr_w1_b" in tensors)
    has_w2 = "lokr_w2" in tensors or ("lokr_w2_a" in tensors and "lokr_w2_b" in tensors)
    if not (has_w1 and has_w2):
        return None
    f = {k: v.float() for k, v in tensors.items() if k.startswith("lokr_")}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"]).contiguous()
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    # the rank is the inner width of the decomposed factor (w1's first, as ComfyUI); both full -> no scale
    rank = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else None
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    scale = rank_scale(tensors.get("alpha"), rank) if rank is not None else 1.0
    return Adapter("lokr", [k for k in tensors if k.startswith("lokr_") or k == "alpha"],
                   lambda weight: torch.kron(w1, w2) * scale)
