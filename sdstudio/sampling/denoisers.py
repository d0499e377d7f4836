"""Denoiser wrappers: a discrete noise schedule, eps/v-prediction -> x0 (k-diffusion semantics), and CFG."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# The Stable Diffusion training schedule: "scaled linear" betas over 1000 steps.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_STEPS = 1000

Cond = dict[str, Tensor]
"""Conditioning of one image (no batch dim), e.g. {"crossattn": (T, C), "vector": (D,)}."""

ModelFn = Callable[..., Tensor]
"""`model(x_in, t, **cond) -> eps or v`, x_in (B, C, H, W), t (B,) float timesteps."""


def sd_alphas_cumprod(steps: int = SD_TRAIN_STEPS, beta_start: float = SD_BETA_START,
                      beta_end: float = SD_BETA_END) -> Tensor:
    """ᾱ_t (steps,) float32 of the scaled-linear beta schedule, computed in float64 like the original LDM code."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to x until it has ndim dims."""
    return x[(...,) + (None,) * (ndim - x.ndim)]


class DiscreteSchedule:
    """Map between the model's discrete timesteps and sigmas = sqrt((1-ᾱ)/ᾱ) (k-diffusion `DiscreteSchedule`)."""

    def __init__(self, alphas_cumprod: Tensor | None = None):
        alphas = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().float().cpu()
        self.alphas_cumprod = alphas
        self.sigmas = ((1 - alphas) / alphas) ** 0.5  # (T,) ascending with t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        """Smallest trained sigma (t = 0)."""
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        """Largest trained sigma (t = T-1)."""
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep for each sigma, interpolating linearly in log sigma."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma for each (fractional) timestep, interpolating linearly in log sigma."""
        t = t.float()
        log_sigmas = self.log_sigmas.to(t.device)
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    def get_sigmas(self, n: int) -> Tensor:
        """The "uniform" schedule: n sigmas at t = linspace(T-1, 0, n), then 0; shape (n+1,)."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])


LCM_ORIGINAL_STEPS = 50  # LCM models are distilled on 50 of the 1000 training timesteps
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


class LCMSchedule(DiscreteSchedule):
    """A1111 `LCMCompVisDenoiser`'s schedule: the 50 timesteps LCM was distilled on (every 20th from the top),
    with sigma→t snapped to the nearest of them and t expressed in the original 1000-step numbering."""

    def __init__(self, alphas_cumprod: Tensor | None = None):
        full = DiscreteSchedule(alphas_cumprod).alphas_cumprod
        self.skip = len(full) // LCM_ORIGINAL_STEPS
        super().__init__(full[len(full) - 1 - torch.arange(LCM_ORIGINAL_STEPS) * self.skip].flip(0))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timestep (in 1000-step numbering) of the nearest LCM sigma."""
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]
        return (dists.abs().argmin(dim=0).view(sigma.shape) * self.skip + (self.skip - 1)).float()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return super().t_to_sigma(((t - (self.skip - 1)) / self.skip).clamp(0, len(self.sigmas) - 1))

    def get_sigmas(self, n: int) -> Tensor:
        """A1111: t = linspace(t(σmax), t(σmin), n) through t_to_sigma, then 0."""
        start = self.sigma_to_t(torch.tensor(self.sigma_max))
        end = self.sigma_to_t(torch.tensor(self.sigma_min))
        return torch.cat([self.t_to_sigma(torch.linspace(start.item(), end.item(), n)), torch.zeros(1)])


class LCMDenoiser:
    """A1111 `LCMCompVisDenoiser`: eps-model x0 estimate, then the consistency boundary condition
    c_skip·x + c_out·x0 with the scaled timestep 10·t (Luo et al. 2023, eq. 9)."""

    def __init__(self, model: ModelFn, schedule: LCMSchedule):
        self.model = model
        self.schedule = schedule

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        t = self.schedule.sigma_to_t(sigma)
        c_in = append_dims(1 / (sigma ** 2 + 1) ** 0.5, x.ndim)
        x0 = x - append_dims(sigma, x.ndim) * self.model(x * c_in, t, **cond)
        scaled_t = append_dims(t, x.ndim) * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA ** 2 / (scaled_t ** 2 + LCM_SIGMA_DATA ** 2)
        c_out = scaled_t / (scaled_t ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5
        return c_out * x0 + c_skip * x


class EpsDenoiser:
    """x0 from an eps-prediction model: D(x, σ) = x - σ·eps(x/√(σ²+1), t(σ)) (k-diffusion `CompVisDenoiser`)."""

    def __init__(self, model: ModelFn, schedule: DiscreteSchedule):
        self.model = model
        self.schedule = schedule

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        """x (B, C, H, W) noisy latents at noise level sigma (B,) -> denoised (B, C, H, W)."""
        c_out = append_dims(-sigma, x.ndim)
        c_in = append_dims(1 / (sigma ** 2 + 1) ** 0.5, x.ndim)
        eps = self.model(x * c_in, self.schedule.sigma_to_t(sigma), **cond)
        return x + eps * c_out


class VDenoiser:
    """x0 from a v-prediction model: D = x/(σ²+1) - σ/√(σ²+1)·v (k-diffusion `CompVisVDenoiser`)."""

    def __init__(self, model: ModelFn, schedule: DiscreteSchedule):
        self.model = model
        self.schedule = schedule

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        """x (B, C, H, W) noisy latents at noise level sigma (B,) -> denoised (B, C, H, W)."""
        s = append_dims(sigma, x.ndim)
        c_skip = 1 / (s ** 2 + 1)
        c_out = -s / (s ** 2 + 1) ** 0.5
        c_in = 1 / (s ** 2 + 1) ** 0.5
        return self.model(x * c_in, self.schedule.sigma_to_t(sigma), **cond) * c_out + x * c_skip


def stack_conds(conds: list[Cond]) -> Cond:
    """Stack per-image cond dicts into batched tensors; shorter token axes (dim 0) are padded by repeating
    their last vector, like A1111 `stack_conds`."""
    out = {}
    for key in conds[0]:
        values = [c[key] for c in conds]
        if values[0].ndim >= 2:
            longest = max(v.shape[0] for v in values)
            values = [torch.cat([v, v[-1:].expand(longest - v.shape[0], *v.shape[1:])]) for v in values]
        out[key] = torch.stack(values)
    return out


@dataclass
class CFGConds:
    """Positive parts (AND-composed, each with a weight) and the negative cond for a batch of images."""

    cond: Cond  # all positive parts stacked, (P, ...)
    uncond: Cond  # one negative cond per image, (B, ...)
    part_image: Tensor  # (P,) long: which image each part belongs to
    part_weight: Tensor  # (P,) float: each part's AND weight

    @classmethod
    def build(cls, parts: list[list[tuple[Cond, float]]], uncond: list[Cond]) -> "CFGConds":
        """parts[b] = [(cond, weight), ...] for image b; uncond[b] = image b's negative cond."""
        flat = [(b, c, w) for b, image_parts in enumerate(parts) for c, w in image_parts]
        return cls(
            cond=stack_conds([c for _, c, _ in flat]),
            uncond=stack_conds(uncond),
            part_image=torch.tensor([b for b, _, _ in flat], dtype=torch.long),
            part_weight=torch.tensor([w for _, _, w in flat], dtype=torch.float32),
        )


class CFGDenoiser:
    """Classifier-free guidance with composable parts: uncond + Σ w_i·scale·(cond_i − uncond)
    (A1111 `CFGDenoiser.combine_denoised`)."""

    def __init__(self, denoiser: Callable[..., Tensor], cond_scale: float):
        self.denoiser = denoiser
        self.cond_scale = cond_scale

    def __call__(self, x: Tensor, sigma: Tensor, conds: CFGConds, skip_uncond: bool = False) -> Tensor:
        """x (B, C, H, W), sigma (B,) -> guided denoised (B, C, H, W); cond and uncond run in one batch when
        their shapes agree (else two calls, as A1111 does for different token counts). `skip_uncond`: the negative
        prompt is not run at all and each image's first part stands in for it (A1111's NGMS and Skip Early CFG:
        one image's result is then just its prompt's denoised latent)."""
        idx = conds.part_image.to(x.device)
        x_parts, sigma_parts = x[idx], sigma[idx]
        n_parts = len(idx)
        if skip_uncond:
            out_cond = self.denoiser(x_parts, sigma_parts, **{k: v.to(x.device) for k, v in conds.cond.items()})
            counts = torch.bincount(idx, minlength=x.shape[0])
            out_uncond = out_cond[counts.cumsum(0) - counts]   # parts are grouped by image: each one's first
        elif all(conds.cond[k].shape[1:] == conds.uncond[k].shape[1:] for k in conds.cond):
            cond_in = {k: torch.cat([conds.cond[k], conds.uncond[k]]).to(x.device) for k in conds.cond}
            out = self.denoiser(torch.cat([x_parts, x]), torch.cat([sigma_parts, sigma]), **cond_in)
            out_cond, out_uncond = out[:n_parts], out[n_parts:]
        else:
            out_cond = self.denoiser(x_parts, sigma_parts, **{k: v.to(x.device) for k, v in conds.cond.items()})
            out_uncond = self.denoiser(x, sigma, **{k: v.to(x.device) for k, v in conds.uncond.items()})
        weights = append_dims(conds.part_weight.to(x.device, out_cond.dtype) * self.cond_scale, x.ndim)
        delta = (out_cond - out_uncond[idx]) * weights
        return out_uncond.index_add(0, idx, delta)
