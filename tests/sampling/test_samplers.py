"""Samplers against k-diffusion 0.1.1.post1 (same model, x, sigmas, noise) and against exact solutions."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from sdstudio.sampling import samplers, schedules
from sdstudio.sampling.brownian import BrownianTreeNoiseSampler
from sdstudio.sampling.denoisers import DiscreteSchedule, EpsDenoiser
from sdstudio.sampling.registry import get_sampler, make_sigmas, timestep_sigmas
from tests.sampling.kdiffusion_ref import external as k_external
from tests.sampling.kdiffusion_ref import sampling as k_sampling

SCHEDULE = DiscreteSchedule()
SIGMAS = schedules.karras(12, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
WEIGHT = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(7))


def toy_denoiser(x, sigma, **kwargs):
    """A fixed nonlinear stand-in for a UNet-based denoiser."""
    s = sigma.view(-1, 1, 1, 1)
    return 0.8 * torch.tanh(x * WEIGHT / (1 + s ** 2) ** 0.5) + 0.1 * x / (1 + s)


def seeded_noise(x, seed):
    """A noise sampler drawing from its own seeded generator (like A1111's per-image generators)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator)


def start_x(seed=0):
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


def run_both(name, ours_kwargs=None, ref_kwargs=None, model=toy_denoiser, sigmas=SIGMAS):
    ours_steps, ref_steps = [], []
    ours = getattr(samplers, name)(model, start_x(), sigmas, callback=ours_steps.append, **(ours_kwargs or {}))
    ref = getattr(k_sampling, name)(model, start_x(), sigmas, callback=ref_steps.append, disable=True,
                                    **(ref_kwargs or {}))
    return ours, ref, ours_steps, ref_steps


DETERMINISTIC = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m"]
ANCESTRAL = ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"]
BROWNIAN = ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_match_kdiffusion(name):
    ours, ref, ours_steps, ref_steps = run_both(name)
    assert (ours - ref).abs().max() <= 1e-4
    assert len(ours_steps) == len(ref_steps) == len(SIGMAS) - 1
    for a, b in zip(ours_steps, ref_steps):
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"])
        assert float(a["sigma_hat"]) == float(b["sigma_hat"])
        assert (a["denoised"] - b["denoised"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ANCESTRAL)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_samplers_match_kdiffusion(name, eta):
    x = start_x()
    kwargs = lambda: {"eta": eta, "s_noise": 0.9, "noise_sampler": seeded_noise(x, 42)}
    ours, ref, _, _ = run_both(name, kwargs(), kwargs())
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_matches_kdiffusion(name):
    # k-diffusion draws churn noise from the global RNG; ours draws it from the noise sampler.
    x = start_x()
    opts = {"s_churn": 2.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.003}
    torch.manual_seed(5)
    ref = getattr(k_sampling, name)(toy_denoiser, x, SIGMAS, disable=True, **opts)
    torch.manual_seed(5)
    ours = getattr(samplers, name)(toy_denoiser, x, SIGMAS, noise_sampler=lambda s, sn: torch.randn_like(x), **opts)
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - samplers.sample_euler(toy_denoiser, x, SIGMAS)).abs().max() > 1e-3  # churn did something


@pytest.mark.parametrize("name", BROWNIAN)
@pytest.mark.parametrize("seed", [1234, [11, 12]])
def test_brownian_samplers_match_kdiffusion(name, seed):
    x = start_x()
    lo, hi = SIGMAS[SIGMAS > 0].min(), SIGMAS.max()
    ours, ref, _, _ = run_both(
        name,
        {"noise_sampler": BrownianTreeNoiseSampler(x, lo, hi, seed=seed)},
        {"noise_sampler": k_sampling.BrownianTreeNoiseSampler(x, lo, hi, seed=seed)},
    )
    assert (ours - ref).abs().max() <= 1e-4


def test_dpmpp_2m_sde_heun_solver_matches_kdiffusion_and_differs_from_midpoint():
    x = start_x()
    lo, hi = SIGMAS[SIGMAS > 0].min(), SIGMAS.max()
    ours, ref, _, _ = run_both(
        "sample_dpmpp_2m_sde",
        {"noise_sampler": BrownianTreeNoiseSampler(x, lo, hi, seed=3), "solver_type": "heun", "eta": 0.7},
        {"noise_sampler": k_sampling.BrownianTreeNoiseSampler(x, lo, hi, seed=3), "solver_type": "heun", "eta": 0.7},
    )
    midpoint = samplers.sample_dpmpp_2m_sde(toy_denoiser, x, SIGMAS, eta=0.7,
                                            noise_sampler=BrownianTreeNoiseSampler(x, lo, hi, seed=3))
    assert (ours - ref).abs().max() <= 1e-4
    assert (ours - midpoint).abs().max() > 1e-4


def test_brownian_tree_noise_matches_kdiffusion_and_is_unit_variance():
    x = torch.zeros(2, 4, 16, 16)
    ours = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[5, 6])
    ref = k_sampling.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[5, 6])
    a, b = ours(torch.tensor(14.6), torch.tensor(7.0)), ref(torch.tensor(14.6), torch.tensor(7.0))
    assert torch.equal(a, b)
    assert abs(a.std().item() - 1) < 0.1
    # Each batch item has its own tree: item 1 of seeds [5, 6] equals a single tree seeded 6.
    single = BrownianTreeNoiseSampler(x[:1], 0.03, 14.6, seed=[6])(torch.tensor(14.6), torch.tensor(7.0))
    assert torch.equal(a[1], single[0])


def test_eps_denoiser_chain_matches_kdiffusion_compvis():
    """DPM++ 2M over our DiscreteSchedule-wrapped eps model vs k-diffusion CompVisDenoiser + get_sigmas."""
    class Inner:
        alphas_cumprod = SCHEDULE.alphas_cumprod

        @staticmethod
        def apply_model(x, t, cond):
            return torch.sin(x + t.view(-1, 1, 1, 1) / 300) * cond

    cond = torch.tensor(0.7)
    ours_model = EpsDenoiser(lambda x, t, cond: Inner.apply_model(x, t, cond), SCHEDULE)
    ref_model = k_external.CompVisDenoiser(Inner())
    sigmas = SCHEDULE.get_sigmas(9)
    assert torch.allclose(sigmas, ref_model.get_sigmas(9))
    x = start_x() / SIGMAS[0] * sigmas[0]
    ours = samplers.sample_dpmpp_2m(ours_model, x, sigmas, extra_args={"cond": cond})
    ref = k_sampling.sample_dpmpp_2m(ref_model, x, sigmas, extra_args={"cond": cond}, disable=True)
    assert (ours - ref).abs().max() <= 1e-4


# --- exact solutions -------------------------------------------------------------------------------------------
MU, S = 0.3, 0.5  # Gaussian data N(MU, S²): the ideal denoiser is analytic.


def gaussian_denoiser(x, sigma, **kwargs):
    s2 = sigma.view(-1, 1, 1, 1).double() ** 2
    return (MU + S ** 2 / (S ** 2 + s2) * (x - MU)).to(x.dtype)


def point_denoiser(x, sigma, **kwargs):
    """Data is the single point x0 = 0.25 everywhere: the ideal denoiser returns it exactly."""
    return torch.full_like(x, 0.25)


@pytest.mark.parametrize("spec_name", ["Euler", "Heun", "DPM2", "LMS", "DPM++ 2M", "Restart", "LCM", "DDIM"])
def test_samplers_land_on_single_data_point(spec_name):
    spec = get_sampler(spec_name)
    sigmas = make_sigmas(spec, "karras", 20, SCHEDULE)
    if spec.timesteps:
        sigmas = torch.cat([sigmas, torch.zeros(1)])
    x = start_x() / SIGMAS[0] * sigmas[0]
    kwargs = dict(spec.extra_kwargs)
    if "noise_sampler" in inspect.signature(spec.function).parameters:
        kwargs["noise_sampler"] = seeded_noise(x, 1)
    out = spec.function(point_denoiser, x, sigmas, **kwargs)
    assert (out - 0.25).abs().max() <= 1e-4


@pytest.mark.parametrize("name, tolerance", [("sample_euler", 0.04), ("sample_heun", 2e-3), ("sample_dpmpp_2m", 2e-3),
                                             ("sample_lms", 2e-3), ("sample_dpm_2", 2e-3)])
def test_deterministic_samplers_follow_the_exact_ode_on_gaussian_data(name, tolerance):
    """Probability-flow ODE for N(μ, s²): x(σ) = μ + √(s²+σ²)/√(s²+σ0²)·(x(σ0) − μ)."""
    sigmas = schedules.karras(100, 0.002, 14.6).double()
    x = start_x().double() / SIGMAS[0] * sigmas[0]
    out = getattr(samplers, name)(gaussian_denoiser, x, sigmas)
    exact = MU + S / math.sqrt(S ** 2 + sigmas[0].item() ** 2) * (x - MU)
    assert (out - exact).abs().max() <= tolerance


@pytest.mark.parametrize("spec_name, steps", [("Restart", 40), ("DPM2 a", 40), ("DPM++ 2S a", 40), ("DPM++ SDE", 200),
                                              ("DPM++ 2M SDE", 40), ("DPM++ 3M SDE", 40), ("Euler a", 200),
                                              ("DDIM", 200)])
def test_stochastic_samplers_sample_the_gaussian_data(spec_name, steps):
    """Ancestral/SDE samplers with the ideal denoiser of N(μ, s²) must end with samples of N(μ, s²)
    (first-order ones need more steps to get there)."""
    spec = get_sampler(spec_name)
    sigmas = make_sigmas(spec, None, steps, SCHEDULE)
    noise = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    x = noise * spec.initial_noise_scale(sigmas)
    kwargs = dict(spec.extra_kwargs)
    if spec.eta_default is not None:
        kwargs["eta"] = 1.0
    out = spec.function(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise(x, 3), **kwargs)
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() - S) < 0.03


def test_restart_model_evaluations_follow_a1111_plan():
    """20 steps: 11 Karras steps + one restart of 9 steps (restart_steps = 9, times = 1); Heun = 2 evaluations
    per step except the final Euler step to 0."""
    calls = []
    sigmas = schedules.karras(20, SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    samplers.sample_restart(lambda x, s: calls.append(s[0].item()) or torch.zeros_like(x), start_x(), sigmas,
                            noise_sampler=seeded_noise(start_x(), 0))
    assert len(calls) == 2 * (11 + 9) - 1
    assert any(b > a for a, b in zip(calls, calls[1:]))  # the restart jumps back up in sigma


def test_lcm_step_is_denoise_then_renoise():
    x = start_x()
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    noise = seeded_noise(x, 4)
    expected_noise = noise(None, None)
    out = samplers.sample_lcm(lambda x, s: 0.5 * x, x, sigmas, noise_sampler=seeded_noise(x, 4))
    assert torch.allclose(out, 0.5 * (0.5 * x + 2.0 * expected_noise))


def test_ddim_matches_a1111_update_over_timesteps():
    """A1111 ddim(): VP-space loop over t = range(0, 1000, 1000 // steps) + 1 with an eps model (Song et al.
    eq. 12, sigma_t = eta·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))), written out independently here."""
    def eps_model(x, t, **kwargs):
        return torch.cos(x * WEIGHT + t.view(-1, 1, 1, 1) / 500)

    steps, eta = 10, 0.6
    alphas = SCHEDULE.alphas_cumprod.double()
    timesteps = [t + 1 for t in range(0, 1000, 1000 // steps)]
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    draws = seeded_noise(noise, 8)
    x = noise.double()
    for index in range(len(timesteps) - 1, 0, -1):
        a_t, a_prev = alphas[timesteps[index]], alphas[timesteps[index - 1]]
        e_t = eps_model(x.float(), torch.full((2,), float(timesteps[index]))).double()
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        sigma_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma_t ** 2).sqrt() * e_t + sigma_t * draws(None, None)

    spec = get_sampler("DDIM")
    sigmas = make_sigmas(spec, None, steps, SCHEDULE)
    assert torch.allclose(sigmas, timestep_sigmas(steps, SCHEDULE))
    ours = samplers.sample_ddim(EpsDenoiser(eps_model, SCHEDULE), noise * spec.initial_noise_scale(sigmas), sigmas,
                                eta=eta, noise_sampler=seeded_noise(noise, 8))
    assert (ours - x).abs().max() <= 1e-4
