"""A1111 sampler and scheduler names (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py,
sd_samplers_lcm.py, sd_schedulers.py) mapped to our functions, and A1111's step-count semantics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from sdstudio.errors import InvalidRequestError
from sdstudio.sampling import samplers, schedules
from sdstudio.sampling.denoisers import DiscreteSchedule


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler as A1111 lists it (`/sdapi/v1/samplers`: name, aliases, options)."""

    name: str
    function: Callable[..., Tensor]
    aliases: tuple[str, ...] = ()
    scheduler: str | None = None  # preferred scheduler name used for "Automatic"
    second_order: bool = False
    uses_ensd: bool = False
    brownian_noise: bool = False
    discard_next_to_last_sigma: bool = False
    eta_default: float | None = None  # None: the sampler takes no eta
    timesteps: bool = False  # A1111 runs it over the model's discrete timesteps and ignores the scheduler
    consistency: bool = False  # LCM: A1111 wraps the model in LCMCompVisDenoiser over the 50-step LCM schedule
    extra_kwargs: dict = field(default_factory=dict)  # fixed keyword arguments, e.g. solver_type

    @property
    def options(self) -> dict:
        """A1111's options dict for the API listing."""
        flags = {"scheduler": self.scheduler, "second_order": self.second_order, "uses_ensd": self.uses_ensd,
                 "brownian_noise": self.brownian_noise,
                 "discard_next_to_last_sigma": self.discard_next_to_last_sigma}
        return {**{k: v for k, v in flags.items() if v}, **self.extra_kwargs}

    def initial_noise_scale(self, sigmas: Tensor) -> float:
        """txt2img start: k-diffusion samplers begin at noise·σ0; A1111's timestep samplers begin at unit VP noise,
        which in our k-diffusion scale is noise·√(1+σ0²)."""
        sigma0 = sigmas[0].item()
        return (1 + sigma0 ** 2) ** 0.5 if self.timesteps else sigma0


@dataclass(frozen=True)
class SchedulerSpec:
    """One schedule type (`/sdapi/v1/schedulers`: name, label, aliases, default_rho, need_inner_model)."""

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


_ANCESTRAL_ETA = 1.0  # A1111 opt eta_ancestral
_DDIM_ETA = 0.0  # A1111 opt eta_ddim

SAMPLERS: list[SamplerSpec] = [
    SamplerSpec("DPM++ 2M", samplers.sample_dpmpp_2m, ("k_dpmpp_2m",), scheduler="karras"),
    SamplerSpec("DPM++ SDE", samplers.sample_dpmpp_sde, ("k_dpmpp_sde",), scheduler="karras", second_order=True,
                brownian_noise=True, eta_default=_ANCESTRAL_ETA),
    SamplerSpec("DPM++ 2M SDE", samplers.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), scheduler="exponential",
                brownian_noise=True, eta_default=_ANCESTRAL_ETA),
    SamplerSpec("DPM++ 2M SDE Heun", samplers.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun",),
                scheduler="exponential", brownian_noise=True, eta_default=_ANCESTRAL_ETA,
                extra_kwargs={"solver_type": "heun"}),
    SamplerSpec("DPM++ 2S a", samplers.sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), scheduler="karras",
                uses_ensd=True, second_order=True, eta_default=_ANCESTRAL_ETA),
    SamplerSpec("DPM++ 3M SDE", samplers.sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",), scheduler="exponential",
                discard_next_to_last_sigma=True, brownian_noise=True, eta_default=_ANCESTRAL_ETA),
    SamplerSpec("Euler a", samplers.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), uses_ensd=True,
                eta_default=_ANCESTRAL_ETA),
    SamplerSpec("Euler", samplers.sample_euler, ("k_euler",)),
    SamplerSpec("LMS", samplers.sample_lms, ("k_lms",)),
    SamplerSpec("Heun", samplers.sample_heun, ("k_heun",), second_order=True),
    SamplerSpec("DPM2", samplers.sample_dpm_2, ("k_dpm_2",), scheduler="karras", discard_next_to_last_sigma=True,
                second_order=True),
    SamplerSpec("DPM2 a", samplers.sample_dpm_2_ancestral, ("k_dpm_2_a",), scheduler="karras",
                discard_next_to_last_sigma=True, uses_ensd=True, second_order=True, eta_default=_ANCESTRAL_ETA),
    SamplerSpec("Restart", samplers.sample_restart, ("restart",), scheduler="karras", second_order=True),
    SamplerSpec("DDIM", samplers.sample_ddim, ("ddim",), eta_default=_DDIM_ETA, timesteps=True),
    SamplerSpec("LCM", samplers.sample_lcm, ("k_lcm",), consistency=True),
]

SCHEDULERS: list[SchedulerSpec] = [
    SchedulerSpec("automatic", "Automatic"),
    SchedulerSpec("uniform", "Uniform", need_inner_model=True),
    SchedulerSpec("karras", "Karras", default_rho=7.0),
    SchedulerSpec("exponential", "Exponential"),
    SchedulerSpec("polyexponential", "Polyexponential", default_rho=1.0),
    SchedulerSpec("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True),
    SchedulerSpec("kl_optimal", "KL Optimal"),
    SchedulerSpec("align_your_steps", "Align Your Steps"),
    SchedulerSpec("simple", "Simple", need_inner_model=True),
    SchedulerSpec("normal", "Normal", need_inner_model=True),
    SchedulerSpec("ddim", "DDIM", need_inner_model=True),
    SchedulerSpec("beta", "Beta", need_inner_model=True),
]

AUTOMATIC = SCHEDULERS[0]


def _lookup_table(items: list, names: Callable) -> dict[str, object]:
    return {name.lower(): item for item in items for name in names(item)}


_SAMPLER_NAMES = _lookup_table(SAMPLERS, lambda s: (s.name, *s.aliases))
_SCHEDULER_NAMES = _lookup_table(SCHEDULERS, lambda s: (s.name, s.label, *s.aliases))


def get_scheduler(name: str | None) -> SchedulerSpec:
    """Scheduler by name, label or alias (case-insensitive); None or "" means Automatic."""
    if not name:
        return AUTOMATIC
    try:
        return _SCHEDULER_NAMES[name.lower()]
    except KeyError:
        valid = ", ".join(s.label for s in SCHEDULERS)
        raise InvalidRequestError("scheduler", f"unknown scheduler {name!r}; valid: {valid}") from None


def _split_scheduler_suffix(name: str) -> tuple[str, SchedulerSpec] | None:
    """("DPM++ 2M", Karras) for "DPM++ 2M Karras"; None when the name ends in no scheduler label or alias."""
    for candidate in SCHEDULERS:
        for suffix in (candidate.label, *candidate.aliases):
            if name.lower().endswith(" " + suffix.lower()):
                return name[:-len(suffix) - 1], candidate
    return None


def get_sampler(name: str) -> SamplerSpec:
    """Sampler by A1111 label or alias (case-insensitive); old combined names resolve to their sampler."""
    return get_sampler_and_scheduler(name)[0]


def get_sampler_and_scheduler(sampler_name: str, scheduler_name: str | None = None
                              ) -> tuple[SamplerSpec, SchedulerSpec]:
    """Split an old combined name ("DPM++ 2M Karras") into sampler + scheduler like A1111
    `get_sampler_and_scheduler`: a suffix wins over scheduler_name, and a scheduler equal to the sampler's own
    preference becomes Automatic."""
    scheduler = get_scheduler(scheduler_name)
    name = sampler_name.strip()
    split = None if name.lower() in _SAMPLER_NAMES else _split_scheduler_suffix(name)
    if split is not None:
        name, scheduler = split
    sampler = _SAMPLER_NAMES.get(name.lower())
    if sampler is None:
        valid = ", ".join(s.name for s in SAMPLERS)
        raise InvalidRequestError("sampler_name", f"unknown sampler {sampler_name!r}; valid: {valid}")
    if sampler.scheduler == scheduler.name:
        scheduler = AUTOMATIC
    return sampler, scheduler


def resolve_schedule(sampler: SamplerSpec, scheduler_name: str | None) -> str:
    """The schedule label A1111 writes in infotext: Automatic becomes the sampler's preference if it has one."""
    scheduler = get_scheduler(scheduler_name)
    if scheduler is AUTOMATIC and sampler.scheduler is not None:
        return get_scheduler(sampler.scheduler).label
    return scheduler.label


def timestep_sigmas(steps: int, schedule: DiscreteSchedule) -> Tensor:
    """A1111 timestep samplers: t = clip(range(0, T, T // steps) + 1, 0, T−1), as descending sigmas (no final 0)."""
    timesteps = (torch.arange(0, len(schedule.sigmas), len(schedule.sigmas) // steps) + 1).clamp(
        0, len(schedule.sigmas) - 1)
    return schedule.sigmas[timesteps].flip(0)


def make_sigmas(sampler: SamplerSpec, scheduler_name: str | None, steps: int, schedule: DiscreteSchedule, *,
                is_sdxl: bool = False, sigma_min: float | None = None, sigma_max: float | None = None,
                rho: float | None = None, beta_alpha: float = 0.6, beta_beta: float = 0.6,
                discard_next_to_last_sigma: bool = False) -> Tensor:
    """Sigmas for `steps` sampling steps as A1111 `KDiffusionSampler.get_sigmas` builds them: one extra step
    then the penultimate sigma dropped when the sampler (or the caller) asks for it; overrides None = model's."""
    discard = sampler.discard_next_to_last_sigma or discard_next_to_last_sigma
    n = steps + 1 if discard else steps
    if sampler.timesteps:
        return timestep_sigmas(n, schedule)
    scheduler = get_scheduler(scheduler_name)
    if scheduler is AUTOMATIC and sampler.scheduler is not None:
        scheduler = get_scheduler(sampler.scheduler)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    builders: dict[str, Callable[[], Tensor]] = {
        "automatic": lambda: schedules.uniform(n, schedule),
        "uniform": lambda: schedules.uniform(n, schedule),
        "karras": lambda: schedules.karras(n, lo, hi, rho or 7.0),
        "exponential": lambda: schedules.exponential(n, lo, hi),
        "polyexponential": lambda: schedules.polyexponential(n, lo, hi, rho or 1.0),
        "sgm_uniform": lambda: schedules.sgm_uniform(n, schedule),
        "kl_optimal": lambda: schedules.kl_optimal(n, lo, hi),
        "align_your_steps": lambda: schedules.align_your_steps(n, is_sdxl),
        "simple": lambda: schedules.simple(n, schedule),
        "normal": lambda: schedules.normal(n, schedule),
        "ddim": lambda: schedules.ddim_uniform(n, schedule),
        "beta": lambda: schedules.beta(n, lo, hi, beta_alpha, beta_beta),
    }
    sigmas = builders[scheduler.name]()
    return schedules.discard_next_to_last(sigmas) if discard else sigmas
