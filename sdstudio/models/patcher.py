"""Weight patching: record → apply → restore, the original of each touched parameter kept untouched.

Anything that changes weights (LoRA networks, the LoRA merge tool) hands the patcher, per parameter, a list of
patches (an identity, a strength and a function giving ΔW in fp32). W = W₀ + Σ strength·ΔW is computed in fp32 and
stored in the weight's dtype and layout in a tensor of its own (the previous patch set's, when there is one) that
the parameter then holds (`param.data`), so the module sees the patched weight at zero cost per step, W₀ (often a
view of the memory-mapped file) is never written, and restoring is handing W₀ back: bit-exact and free. Only
parameters whose patch list changed are touched, and each touched one's version counter moves, so what is derived
from a weight (the int8 path's packed copies, models/int8.py) is made again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable

import torch


@dataclass(frozen=True)
class Patch:
    """One change of one parameter: ΔW(W₀) in fp32 (same shape as W, on any device), scaled by `strength`."""

    source: Hashable                       # identifies the adapter (e.g. (lora file, module name))
    strength: float
    delta: Callable[[torch.Tensor], torch.Tensor] = lambda w: torch.zeros_like(w)
    factors: tuple[torch.Tensor, torch.Tensor] | None = None   # ΔW = A @ B (flattened): fused add, no ΔW tensor

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
        scratch = _Scratch()
        # tensors made in inference mode have no version counter, and a parameter holding one could not show a change
        with torch.inference_mode(False):
            for name in set(self._applied) | set(patches):
                wanted = tuple(p.signature for p in patches.get(name, ()))
                if self._applied.get(name, ()) == wanted:
                    continue
                self._write(name, patches.get(name, []), scratch)
                torch.autograd.graph.increment_version(self.parameters[name])   # caches of it (int8 packs) see it
                touched += 1
        return touched

    def restore(self) -> None:
        """Every patched parameter back to its original bits."""
        self.set_patches({})

    def _write(self, name: str, patches: list[Patch], scratch: _Scratch) -> None:
        param = self.parameters[name]
        original = self._backups.setdefault(name, param.data)
        if not patches:
            param.data = original
            del self._backups[name]
            self._applied.pop(name, None)
            return
        # an fp32 contiguous weight is merged straight into its result; any other (half precision, channels-last)
        # is merged in fp32 scratch buffers, then copied into its own dtype and layout
        direct = original.dtype == torch.float32 and original.is_contiguous()
        current = param.data
        # the buffer of the previous patch set, when there is one, takes the result: no fresh pages to fault in
        reusable = current.data_ptr() != original.data_ptr() and current.stride() == original.stride()
        with torch.no_grad():
            # factors multiply out in the logical (O, I·kh·kw) order: fp32 and contiguous
            base = original if direct else scratch.take(0, original.shape, original.device).copy_(original)
            merged = None
            for patch in patches:
                if patch.strength == 0:
                    continue
                if merged is None:
                    if direct:
                        merged = current if reusable else torch.empty_like(base)
                    else:
                        merged = scratch.take(1, base.shape, base.device)
                    source = base
                else:
                    source = merged
                if patch.factors is not None and patch.factors[0].shape[0] * patch.factors[1].shape[1] == base.numel():
                    a, b = (f.to(base.device) for f in patch.factors)
                    torch.addmm(source.reshape(a.shape[0], -1), a, b, alpha=patch.strength,
                                out=merged.view(a.shape[0], -1))
                else:
                    torch.add(source, patch.delta(base).to(base.device), alpha=patch.strength, out=merged)
            if merged is None:
                param.data = original
            elif direct:
                param.data = merged
            else:
                param.data = (current if reusable else torch.empty_like(original)).copy_(merged)
        self._applied[name] = tuple(p.signature for p in patches)

    @property
    def patched(self) -> list[str]:
        """Names of the parameters currently differing from their originals."""
        return sorted(self._applied)


class _Scratch:
    """fp32 working buffers reused from one half-precision parameter to the next during one `set_patches`
    (allocating each afresh costs a page fault per 4 KiB; they go with the call)."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A contiguous fp32 tensor of `shape` on `device` in buffer `slot` (its contents are whatever was there)."""
        count = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < count or buffer.device != device:
            buffer = self._buffers[slot] = torch.empty(count, dtype=torch.float32, device=device)
        return buffer[:count].view(shape)
