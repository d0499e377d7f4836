"""Sigma schedules as A1111 `modules/sd_schedulers.py` builds them: descending float32 tensors (n+1,), ending
in 0 (except KL Optimal, which A1111 ends at sigma_min)."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from sdstudio.sampling.denoisers import DiscreteSchedule

# Align Your Steps 10-step schedules (11 sigmas) from NVIDIA's "how to" page, as A1111 ships them.
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """k-diffusion `get_sigmas(n)`: t = linspace(T−1, 0, n) mapped to sigma, then 0."""
    return schedule.get_sigmas(n)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: σ_i = (σmax^(1/ρ) + i/(n−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, then 0."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas evenly spaced in log σ from σmax to σmin, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """log σ = log σmin + ramp^ρ·(log σmax − log σmin), ramp from 1 to 0, then 0."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _timestep_spaced(n: int, schedule: DiscreteSchedule, sgm: bool) -> Tensor:
    """Sigmas at timesteps linspace(t(σmax), t(σmin)) over n points (or n+1 minus the last when sgm), then 0."""
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    timesteps = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return _append_zero(schedule.t_to_sigma(timesteps))


def sgm_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """SGM Uniform: n timesteps from linspace(T−1, 0, n+1) without its last point, as sigmas, then 0."""
    return _timestep_spaced(n, schedule, sgm=True)


def normal(n: int, schedule: DiscreteSchedule) -> Tensor:
    """Normal: n timesteps from linspace(t(σmax), t(σmin), n) as sigmas, then 0."""
    return _timestep_spaced(n, schedule, sgm=False)


def simple(n: int, schedule: DiscreteSchedule) -> Tensor:
    """Simple: every (T/n)-th trained sigma from the top, sigmas[-(1 + int(i·T/n))], then 0."""
    stride = len(schedule.sigmas) / n
    return _append_zero(torch.stack([schedule.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """DDIM schedule: trained sigmas at t = 1, 1+s, 1+2s, … (s = T // n) in descending order, then 0.
    Like A1111 this can give more than n steps when T is not a multiple of n."""
    stride = max(len(schedule.sigmas) // n, 1)
    return _append_zero(schedule.sigmas[1::stride].flip(0))


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Beta schedule (Lee et al. 2024): σ = σmin + ppf_Beta(α,β)(1 − i/(n−1))·(σmax − σmin), then 0."""
    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return _append_zero(torch.tensor(sigma_min + quantiles * (sigma_max - sigma_min)))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """KL-optimal (Sabour et al. 2024): σ_i = tan((i/n)·atan σmin + (1 − i/n)·atan σmax), i = 0..n.
    As in A1111 the last value is σmin, not 0."""
    i = torch.arange(n + 1)
    return torch.tan(i / n * math.atan(sigma_min) + (1.0 - i / n) * math.atan(sigma_max)).float()


def _loglinear_interp(values: list[float], num: int) -> np.ndarray:
    """Resample a decreasing sequence to num points, interpolating linearly in log space."""
    xs = np.linspace(0, 1, len(values))
    ys = np.log(values[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num), xs, ys))[::-1].copy()


def align_your_steps(n: int, is_sdxl: bool = False) -> Tensor:
    """Align Your Steps (Sabour et al. 2024): the 11-value SD1.5 / SDXL table, log-linearly resampled to n, then 0."""
    table = AYS_SDXL if is_sdxl else AYS_SD15
    values = table if n == len(table) else _loglinear_interp(table, n)
    return _append_zero(torch.tensor(np.asarray(values, dtype=np.float64)))


def discard_next_to_last(sigmas: Tensor) -> Tensor:
    """Drop the second-to-last sigma (A1111 `discard_next_to_last_sigma`)."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])
