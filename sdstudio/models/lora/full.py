"""Full / diff adapters (LyCORIS `diff`, `diff_b`): the weight (and bias) delta stored as is."""
from __future__ import annotations

from torch import Tensor

from sdstudio.models.lora.base import Adapter


def load(tensors: dict[str, Tensor]) -> Adapter | None:
    """A full-delta adapter, or None."""
    if "diff" not in tensors and "diff_b" not in tensors:
        return None
    diff = tensors["diff"].float() if "diff" in tensors else None
    return Adapter("full", [k for k in ("diff", "diff_b") if k in tensors],
                   (lambda weight: diff) if diff is not None else None,
                   bias_delta=tensors["diff_b"].float() if "diff_b" in tensors else None)
