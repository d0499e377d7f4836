"""Sigma schedules (hand-computed values, k-diffusion where it has them) and the A1111 name registry."""
from __future__ import annotations

import math

import pytest
import torch

from sdstudio.errors import InvalidRequestError
from sdstudio.sampling import schedules
from sdstudio.sampling.denoisers import DiscreteSchedule
from sdstudio.sampling.registry import (SCHEDULERS, get_sampler, get_sampler_and_scheduler, get_scheduler,
                                        make_sigmas, resolve_schedule)
from tests.sampling.kdiffusion_ref import external as k_external
from tests.sampling.kdiffusion_ref import sampling as k_sampling

SCHEDULE = DiscreteSchedule()
LO, HI = SCHEDULE.sigma_min, SCHEDULE.sigma_max


@pytest.mark.parametrize("name", [s.name for s in SCHEDULERS])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_every_schedule_is_descending_with_n_plus_1_values(name, steps):
    sigmas = make_sigmas(get_sampler("Euler"), name, steps, SCHEDULE)
    if name != "ddim":  # A1111's DDIM schedule may give more steps (see test below)
        assert len(sigmas) == steps + 1
    assert sigmas.dtype == torch.float32
    assert torch.all(sigmas[1:] < sigmas[:-1]) or steps == 1
    if name == "kl_optimal":
        assert sigmas[-1].item() == pytest.approx(LO, rel=1e-5)  # A1111 ends KL Optimal at sigma_min
    else:
        assert sigmas[-1] == 0


def test_kdiffusion_schedules_match():
    assert torch.allclose(schedules.karras(9, LO, HI), k_sampling.get_sigmas_karras(9, LO, HI))
    assert torch.allclose(schedules.exponential(9, LO, HI), k_sampling.get_sigmas_exponential(9, LO, HI))
    assert torch.allclose(schedules.polyexponential(9, LO, HI, 2.0),
                          k_sampling.get_sigmas_polyexponential(9, LO, HI, 2.0))
    ref_model = k_external.DiscreteSchedule(SCHEDULE.sigmas, quantize=False)
    assert torch.allclose(schedules.uniform(9, SCHEDULE), ref_model.get_sigmas(9))


def test_karras_hand_computed():
    # n = 3, ρ = 1: plain linear ramp from σmax to σmin.
    assert torch.allclose(schedules.karras(3, 1.0, 9.0, rho=1.0), torch.tensor([9.0, 5.0, 1.0, 0.0]))
    # n = 3, ρ = 7: middle value ((√[7]9 + √[7]1) / 2)^7.
    mid = ((9 ** (1 / 7) + 1) / 2) ** 7
    assert schedules.karras(3, 1.0, 9.0)[1].item() == pytest.approx(mid, rel=1e-6)


def test_exponential_is_geometric():
    sigmas = schedules.exponential(5, 0.1, 10.0)[:-1]
    assert torch.allclose(sigmas[1:] / sigmas[:-1], torch.full((4,), 10 ** -0.5), rtol=1e-5)


def test_sgm_uniform_drops_the_last_of_n_plus_1_timesteps():
    # uniform: t = 999, 666, 333, 0 ; sgm_uniform: t = 999, 749.25, 499.5, 249.75 (linspace over 5 points minus last)
    assert torch.allclose(schedules.uniform(4, SCHEDULE)[:-1], SCHEDULE.sigmas[[999, 666, 333, 0]])
    expected = SCHEDULE.t_to_sigma(torch.tensor([999.0, 749.25, 499.5, 249.75]))
    assert torch.allclose(schedules.sgm_uniform(4, SCHEDULE)[:-1], expected, rtol=1e-4)
    assert schedules.sgm_uniform(4, SCHEDULE)[-2] > schedules.uniform(4, SCHEDULE)[-2]


def test_simple_and_ddim_pick_trained_sigmas():
    # simple, n = 4: sigmas[-1], sigmas[-251], sigmas[-501], sigmas[-751]
    assert torch.equal(schedules.simple(4, SCHEDULE)[:-1], SCHEDULE.sigmas[[999, 749, 499, 249]])
    # ddim, n = 4: t = 1, 251, 501, 751 reversed
    assert torch.equal(schedules.ddim_uniform(4, SCHEDULE)[:-1], SCHEDULE.sigmas[[751, 501, 251, 1]])
    # n = 30: stride 33 gives t = 1, 34, …, 991 — 31 values, as in A1111
    assert len(schedules.ddim_uniform(30, SCHEDULE)) == 32


def test_align_your_steps_tables_and_resampling():
    sd15 = schedules.align_your_steps(10 + 1)
    assert torch.allclose(sd15, torch.tensor(schedules.AYS_SD15 + [0.0]))
    assert schedules.align_your_steps(11, is_sdxl=True)[3].item() == pytest.approx(2.181)
    resampled = schedules.align_your_steps(21)
    assert resampled[0].item() == pytest.approx(14.615) and resampled[-2].item() == pytest.approx(0.029)
    # 21 points over 11: every other point is a table value, the ones between are log-space midpoints.
    assert resampled[2].item() == pytest.approx(6.475, rel=1e-5)
    assert resampled[1].item() == pytest.approx(math.sqrt(14.615 * 6.475), rel=1e-5)


def test_beta_schedule_endpoints_and_symmetry():
    sigmas = schedules.beta(5, 1.0, 9.0)
    assert sigmas[0].item() == pytest.approx(9.0) and sigmas[-2].item() == pytest.approx(1.0)
    assert sigmas[2].item() == pytest.approx(5.0, rel=1e-5)  # Beta(0.6, 0.6) is symmetric: median 0.5
    assert sigmas[1].item() + sigmas[3].item() == pytest.approx(10.0, rel=1e-5)


def test_kl_optimal_formula():
    sigmas = schedules.kl_optimal(2, 1.0, 9.0)
    assert sigmas[0].item() == pytest.approx(9.0, rel=1e-5)
    assert sigmas[1].item() == pytest.approx(math.tan((math.atan(1.0) + math.atan(9.0)) / 2), rel=1e-5)


def test_discard_next_to_last_sigma_adds_a_step_then_drops_the_penultimate():
    full = schedules.karras(11, LO, HI)
    sigmas = make_sigmas(get_sampler("DPM2"), "karras", 10, SCHEDULE)
    assert torch.equal(sigmas, torch.cat([full[:-2], full[-1:]]))
    assert len(sigmas) == 11


def test_automatic_uses_the_samplers_preference_else_uniform():
    assert torch.equal(make_sigmas(get_sampler("DPM++ 2M"), "Automatic", 8, SCHEDULE), schedules.karras(8, LO, HI))
    assert torch.equal(make_sigmas(get_sampler("Euler a"), None, 8, SCHEDULE), schedules.uniform(8, SCHEDULE))
    assert torch.equal(make_sigmas(get_sampler("Euler a"), "karras", 8, SCHEDULE), schedules.karras(8, LO, HI))


def test_ddim_sampler_runs_over_a1111_timesteps():
    # steps 10: t = 1, 101, …, 901 (range(0, 1000, 100) + 1), descending, no final 0
    sigmas = make_sigmas(get_sampler("DDIM"), "Karras", 10, SCHEDULE)
    assert torch.equal(sigmas, SCHEDULE.sigmas[list(range(901, 0, -100))])


def test_resolve_schedule_labels():
    assert resolve_schedule(get_sampler("DPM++ 2M"), "Automatic") == "Karras"
    assert resolve_schedule(get_sampler("DPM++ 2M SDE"), None) == "Exponential"
    assert resolve_schedule(get_sampler("Euler a"), "automatic") == "Automatic"
    assert resolve_schedule(get_sampler("Euler a"), "sgm_uniform") == "SGM Uniform"


def test_sampler_names_aliases_and_combined_names():
    assert get_sampler("k_euler_a").name == "Euler a"
    assert get_sampler("dpm++ 2m sde heun").extra_kwargs == {"solver_type": "heun"}
    sampler, scheduler = get_sampler_and_scheduler("DPM++ 2M Karras")
    assert (sampler.name, scheduler.label) == ("DPM++ 2M", "Automatic")  # Karras is its own preference
    sampler, scheduler = get_sampler_and_scheduler("Euler a Karras", "Exponential")
    assert (sampler.name, scheduler.label) == ("Euler a", "Karras")
    assert get_sampler_and_scheduler("Euler", "SGMUniform")[1].name == "sgm_uniform"
    assert get_scheduler("Align Your Steps").name == "align_your_steps"


def test_unknown_names_list_valid_ones():
    with pytest.raises(InvalidRequestError) as err:
        get_sampler("Euler b")
    assert err.value.field == "sampler_name" and "'Euler b'" in str(err.value) and "DPM++ 2M" in str(err.value)
    with pytest.raises(InvalidRequestError) as err:
        get_scheduler("zigzag")
    assert err.value.field == "scheduler" and "Karras" in str(err.value)
