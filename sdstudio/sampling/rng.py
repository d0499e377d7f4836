"""A1111-compatible seeds and noise (``modules/rng.py``, ``modules/processing.py``).

Every image of a batch owns one generator seeded with that image's seed: it draws the image's initial
noise and then, in order, each ancestral/SDE step's noise (A1111 routes k-diffusion's ``torch.randn_like``
to ``ImageRNG.next``). So an infotext's seed reproduces one image whatever the batch was.

Noise sources (A1111 option ``randn_source``, infotext key ``RNG``):

- ``"CPU"``: ``torch.Generator("cpu").manual_seed(seed)`` and ``torch.randn(shape, generator=g)``.
- ``"NV"``: NVIDIA CUDA's ``torch.randn`` emulated with numpy Philox4x32-10 (``sampling/philox.py``).
- ``"GPU"`` (A1111's default, written as no ``RNG`` key): on a CUDA machine ``torch.randn`` with a CUDA
  generator; on a machine without CUDA the NV emulation, so infotexts made on NVIDIA GPUs reproduce here.
  (A1111 itself falls back to CPU on Apple MPS; images made that way need ``"CPU"`` here.)

Noise is returned as float32 on the CPU; callers move it to their device.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from sdstudio.errors import InvalidRequestError
from sdstudio.sampling.philox import PhiloxGenerator

SOURCES = ("GPU", "CPU", "NV")
# A1111 draws random seeds with random.randrange(4294967294): 0 .. 2**32 - 3.
_RANDOM_SEED_LIMIT = 4294967294
# torch.Generator.manual_seed accepts [-2**63, 2**64); negatives act as their two's complement.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# Pixels per latent cell: seed_resize_from_w/h are pixel sizes, noise is made at latent size.
_LATENT_FACTOR = 8


def random_seed() -> int:
    """A fresh random seed in A1111's range 0 .. 4294967293."""
    return secrets.randbelow(_RANDOM_SEED_LIMIT)


def resolve_seed(seed: int | float | str | None) -> int:
    """A1111 ``get_fixed_seed``: -1, None, "" or a non-numeric string -> random_seed(); else int(seed)."""
    if isinstance(seed, str):
        try:
            seed = int(seed.strip())
        except ValueError:
            seed = -1
    if seed is None or seed == -1:
        return random_seed()
    return int(seed)


def batch_seeds(seed: int | str | None, subseed: int | str | None, subseed_strength: float,
                count: int) -> tuple[list[int], list[int]]:
    """A1111 ``all_seeds``/``all_subseeds`` for ``count`` images (batch size x batch count)."""
    first_seed, first_subseed = resolve_seed(seed), resolve_seed(subseed)
    seed_step = 1 if subseed_strength == 0 else 0  # variation seeds keep one seed for the whole batch
    seeds = [first_seed + seed_step * i for i in range(count)]
    subseeds = [first_subseed + i for i in range(count)]
    return seeds, subseeds


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise InvalidRequestError("randn_source", f"{source!r} is not one of {', '.join(SOURCES)}")


class NoiseStream:
    """One seeded generator of successive standard-normal draws (the A1111 ``create_generator`` result)."""

    def __init__(self, seed: int, source: str = "GPU"):
        _check_source(source)
        if not _SEED_MIN <= seed <= _SEED_MAX:
            raise InvalidRequestError("seed", f"{seed} is outside {_SEED_MIN} .. {_SEED_MAX}")
        self._philox: PhiloxGenerator | None = None
        self._torch: torch.Generator | None = None
        if source == "NV" or (source == "GPU" and not torch.cuda.is_available()):
            self._philox = PhiloxGenerator(seed)
        else:
            self._torch = torch.Generator("cpu" if source == "CPU" else "cuda").manual_seed(seed)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """Next draw of ``shape``: float32 CPU tensor."""
        if self._philox is not None:
            return torch.from_numpy(self._philox.randn(tuple(shape)))
        noise = torch.randn(tuple(shape), generator=self._torch, device=self._torch.device, dtype=torch.float32)
        return noise.cpu()


def randn(seed: int, shape: Sequence[int], source: str = "GPU") -> torch.Tensor:
    """First noise of ``seed``: float32 CPU tensor of ``shape`` (one sample, e.g. (C, H, W))."""
    return NoiseStream(seed, source).randn(shape)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111 ``rng.slerp`` of two (C, H, W) noises, treating dim 1 (H) as the vector axis of each (C, W) column.

    If the columns are nearly parallel (mean cosine > 0.9995) it returns ``low * val + high * (1 - val)``,
    exactly as A1111 writes it (the weights are swapped relative to the spherical branch).
    """
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)  # (C, W) cosines
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


def _paste_centred(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A1111 seed resize: ``noise`` (C, h, w) centred on ``target`` (C, H, W), cropped where larger."""
    dx = (target.shape[2] - noise.shape[2]) // 2
    dy = (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)  # where the pasted block starts in the target
    sx, sy = max(-dx, 0), max(-dy, 0)  # where it starts in the source
    target[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return target


class ImageRNG:
    """A1111 ``ImageRNG``: per-image noise generators for one batch of latents of ``shape`` (C, H, W)."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                 source: str = "GPU", eta_noise_seed_delta: int = 0):
        _check_source(source)
        self.shape = tuple(shape)
        self.seeds = list(seeds)
        self.subseeds = None if subseeds is None else list(subseeds)
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.source = source
        self.eta_noise_seed_delta = eta_noise_seed_delta
        self._streams: list[NoiseStream] | None = None  # per-image generators, made by first()

    def _noise_shape(self) -> tuple[int, ...]:
        """Shape the seed's noise is made at: the target, or the latent of the resize-from size."""
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // _LATENT_FACTOR, self.seed_resize_from_w // _LATENT_FACTOR)

    def _subseed(self, index: int) -> int:
        return self.subseeds[index] if index < len(self.subseeds) else 0  # A1111 pads missing subseeds with 0

    def first(self) -> torch.Tensor:
        """Initial noise (B, C, H, W): randn(seed), slerped toward randn(subseed), pasted from the resize-from size."""
        noise_shape = self._noise_shape()
        use_subseeds = self.subseeds is not None and self.subseed_strength != 0
        self._streams = [NoiseStream(seed, self.source) for seed in self.seeds]
        images = []
        for i, (seed, stream) in enumerate(zip(self.seeds, self._streams)):
            # The image's own generator draws exactly one target-shaped tensor here, whatever the branch.
            target = stream.randn(self.shape)
            noise = target if noise_shape == self.shape else randn(seed, noise_shape, self.source)
            if use_subseeds:
                noise = slerp(self.subseed_strength, noise, randn(self._subseed(i), noise_shape, self.source))
            if noise_shape != self.shape:
                noise = _paste_centred(target, noise)
            images.append(noise)
        if self.eta_noise_seed_delta:
            self._streams = [NoiseStream(seed + self.eta_noise_seed_delta, self.source) for seed in self.seeds]
        return torch.stack(images)

    def next(self) -> torch.Tensor:
        """Next noise (B, C, H, W) from each image's generator; the first call returns first(), as in A1111."""
        if self._streams is None:
            return self.first()
        return torch.stack([stream.randn(self.shape) for stream in self._streams])

    def noise_sampler(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """k-diffusion ``noise_sampler(sigma, sigma_next)``: next() on sigma's device, (B, C, H, W)."""
        return self.next().to(sigma.device)
