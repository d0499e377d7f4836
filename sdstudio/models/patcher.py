"""In-place weight patching: record → apply → restore, one exact backup per touched parameter.

Anything that changes weights (LoRA networks, the LoRA merge tool) hands the patcher, per parameter, a list of
patches (an identity, a strength and a function giving ΔW in fp32). W = W₀ + Σ strength·ΔW is computed in fp32 and
stored in the weight's dtype; W₀ is restored bit-exactly. Only parameters whose patch list changed are touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch


@dataclass(frozen=True)
class Patch:
    """One change of one parameter: ΔW(W₀) in fp32 (same shape as W), scaled by `strength`."""

    source: Hashable                       # identifies the adapter (e.g. (lora file, module name))
    strength: float
    delta: Callable[[torch.Tensor], torch.Tensor] = lambda w: torch.zeros_like(w)

    @property
    def signature(self) -> tuple:
        return (self.source, self.strength)


class WeightPatcher:
    """Patches parameters of a fixed set of named tensors (name -> live parameter)."""

    def __init__(self, parameters: dict[str, torch.Tensor]):
        self.parameters = parameters
        self._backups: dict[str, torch.Tensor] = {}
        self._applied: dict[str, tuple] = {}

    def set_patches(self, patches: dict[str, list[Patch]]) -> int:
        """Make the weights equal W₀ + Σ patches for the given names and W₀ everywhere else; returns how many
        parameters were rewritten (unchanged patch lists cost nothing)."""
        touched = 0
        for name in set(self._applied) | set(patches):
            wanted = tuple(p.signature for p in patches.get(name, ()))
            if self._applied.get(name, ()) == wanted:
                continue
            self._write(name, patches.get(name, []))
            touched += 1
        return touched

    def restore(self) -> None:
        """Every patched parameter back to its original bits."""
        self.set_patches({})

    def _write(self, name: str, patches: list[Patch]) -> None:
        param = self.parameters[name]
        if name not in self._backups:
            self._backups[name] = param.detach().clone()
        original = self._backups[name]
        with torch.no_grad():
            if not patches:
                param.copy_(original)
                del self._backups[name]
                self._applied.pop(name, None)
                return
            base = original.float()
            total = torch.zeros_like(base)
            for patch in patches:
                if patch.strength != 0:
                    total += patch.strength * patch.delta(base)
            param.copy_((base + total).to(param.dtype))
        self._applied[name] = tuple(p.signature for p in patches)

    @property
    def patched(self) -> list[str]:
        """Names of the parameters currently differing from their originals."""
        return sorted(self._applied)
