"""Brownian-tree noise for the SDE samplers, with k-diffusion's seeding so results match it."""
from __future__ import annotations

from typing import Callable

import torch
import torchsde
from torch import Tensor


def _ordered(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    """(low, high, sign): sign is -1 when the arguments came in descending order."""
    return (a, b, 1) if a < b else (b, a, -1)


class BrownianTreeNoiseSampler:
    """Noise for an SDE step σ→σ_next: W(σ_next) − W(σ) of a Brownian motion, divided by √|Δσ|
    (k-diffusion `BrownianTreeNoiseSampler`). With a list of seeds each batch item has its own tree."""

    def __init__(self, x: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor,
                 seed: int | list[int] | None = None, transform: Callable[[Tensor], Tensor] = lambda s: s):
        self.transform = transform
        t0, t1 = transform(torch.as_tensor(sigma_min)), transform(torch.as_tensor(sigma_max))
        t0, t1, self.sign = _ordered(t0, t1)
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"seed: {len(seeds)} seeds for a batch of {x.shape[0]}")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    def __call__(self, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
        """Unit-variance noise shaped like x for the step sigma -> sigma_next."""
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        low, high, sign = _ordered(t0, t1)
        w = torch.stack([tree(low, high) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (t1 - t0).abs().sqrt()
