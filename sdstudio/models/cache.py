"""Loaded checkpoints kept within a RAM budget, least recently used evicted: switching back is instant, and a
failed load never replaces (or evicts) what was loaded before."""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch

from sdstudio.models.checkpoint import LoadedCheckpoint, load_checkpoint
from sdstudio.models.converted import ConvertedWeights

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 8 * 2**30  # bytes of weights kept loaded


def model_bytes(model: LoadedCheckpoint) -> int:
    """Bytes of the weights a loaded checkpoint holds (UNet, VAEs, text encoders)."""
    modules = [model.unet, model.vae] + [e.model for e in model.text_encoders]
    if model.own_vae is not None and model.own_vae is not model.vae:
        modules.append(model.own_vae)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class CheckpointCache:
    """`get()` returns a cached model or loads it; the current model changes only after a successful load."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET, converted: ConvertedWeights | None = None,
                 int8_linears: bool = False, fast_fp32: bool = False):
        self.budget = budget_bytes
        self.converted = converted    # converted weights kept on disk between processes (models/converted.py)
        self.int8_linears = int8_linears   # every model's UNet transformer linears in int8 (`--precision auto`)
        self.fast_fp32 = fast_fp32         # every fp32 model with the fast kernels (the fast paths, no bf16)
        self._models: OrderedDict[tuple, LoadedCheckpoint] = OrderedDict()
        self.current: LoadedCheckpoint | None = None

    def get(self, path: str | Path, use_ema: bool = False, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> LoadedCheckpoint:
        """The checkpoint at `path` (loaded once per file version, EMA choice, dtype and device), made current."""
        path = Path(path)
        stat = path.stat() if path.exists() else None
        key = (path.resolve(), stat.st_size if stat else None, stat.st_mtime_ns if stat else None, use_ema, dtype,
               torch.device(device))
        model = self._models.get(key)
        if model is None:   # raises: nothing changes
            model = load_checkpoint(path, use_ema=use_ema, dtype=dtype, converted=self.converted, device=device,
                                    int8_linears=self.int8_linears, fast_fp32=self.fast_fp32)
            self._models[key] = model
            self._evict(keep=key)
        self._models.move_to_end(key)
        self.current = model
        return model

    def _evict(self, keep: tuple) -> None:
        while len(self._models) > 1 and sum(model_bytes(m) for m in self._models.values()) > self.budget:
            oldest = next(k for k in self._models if k != keep)
            log.info("unloading %s to stay within the RAM budget", oldest[0].name)
            del self._models[oldest]

    def loaded(self) -> list[Path]:
        """Paths of the checkpoints held, least recently used first."""
        return [key[0] for key in self._models]
