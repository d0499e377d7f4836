"""DiscreteSchedule, eps/v wrappers vs k-diffusion external.py, and CFG with composable parts."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from sdstudio.sampling.denoisers import CFGConds, CFGDenoiser, DiscreteSchedule, EpsDenoiser, VDenoiser, sd_alphas_cumprod
from tests.sampling.kdiffusion_ref import external as k_external

SCHEDULE = DiscreteSchedule()


def test_sd_alphas_match_diffusers_scaled_linear_schedule():
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(sd_alphas_cumprod(), ref.float(), rtol=1e-6)
    assert abs(SCHEDULE.sigma_min - 0.0292) < 1e-4 and abs(SCHEDULE.sigma_max - 14.6146) < 1e-4


def test_sigma_t_mapping_matches_kdiffusion():
    ref = k_external.DiscreteSchedule(SCHEDULE.sigmas, quantize=False)
    sigma = torch.tensor([14.6, 7.3, 1.0, 0.5, 0.03, SCHEDULE.sigma_min])
    assert torch.allclose(SCHEDULE.sigma_to_t(sigma), ref.sigma_to_t(sigma))
    t = torch.tensor([999.0, 500.5, 12.25, 0.0])
    assert torch.allclose(SCHEDULE.t_to_sigma(t), ref.t_to_sigma(t))
    assert torch.allclose(SCHEDULE.get_sigmas(7), ref.get_sigmas(7))
    # Round trip on the trained grid lands on integer timesteps.
    assert torch.allclose(SCHEDULE.sigma_to_t(SCHEDULE.sigmas[[3, 400, 951]]), torch.tensor([3.0, 400.0, 951.0]),
                          atol=1e-3)


class _Inner:
    alphas_cumprod = SCHEDULE.alphas_cumprod

    @staticmethod
    def apply_model(x, t, cond):
        return torch.tanh(x * cond + t.view(-1, 1, 1, 1) / 1000)


def test_eps_denoiser_matches_compvis_denoiser():
    x, sigma, cond = torch.randn(3, 4, 5, 5) * 3, torch.tensor([5.0, 1.0, 0.1]), torch.tensor(0.6)
    ours = EpsDenoiser(_Inner.apply_model, SCHEDULE)(x, sigma, cond=cond)
    ref = k_external.CompVisDenoiser(_Inner())(x, sigma, cond=cond)
    assert (ours - ref).abs().max() <= 1e-5


def test_v_denoiser_matches_compvis_v_denoiser():
    x, sigma, cond = torch.randn(3, 4, 5, 5) * 3, torch.tensor([5.0, 1.0, 0.1]), torch.tensor(0.6)
    ours = VDenoiser(_Inner.apply_model, SCHEDULE)(x, sigma, cond=cond)
    ref = k_external.CompVisVDenoiser(_Inner())(x, sigma, cond=cond)
    assert (ours - ref).abs().max() <= 1e-5


def test_eps_and_v_denoisers_recover_x0_from_exact_predictions():
    """x = x0 + σ·ε: an eps model that returns ε, or a v model returning v = √ᾱ·ε − √(1−ᾱ)·x0, give back x0."""
    x0, eps, sigma = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([3.0, 0.2])
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps
    alpha = 1 / (1 + s ** 2)
    eps_out = EpsDenoiser(lambda x_in, t: eps, SCHEDULE)(x, sigma)
    v_out = VDenoiser(lambda x_in, t: alpha.sqrt() * eps - (1 - alpha).sqrt() * x0, SCHEDULE)(x, sigma)
    assert torch.allclose(eps_out, x0, atol=1e-5) and torch.allclose(v_out, x0, atol=1e-5)


class _Recorder:
    """Denoiser whose output depends on x, sigma and the cond, recording each call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, crossattn, vector):
        self.batches.append(x.shape[0])
        return x * crossattn.mean(dim=(1, 2)).view(-1, 1, 1, 1) + vector.sum(1).view(-1, 1, 1, 1) / sigma.view(-1, 1, 1, 1)


def _cond(value, tokens=4):
    return {"crossattn": torch.full((tokens, 8), value), "vector": torch.full((3,), value)}


def test_cfg_runs_one_batch_and_combines_like_a1111():
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([2.0, 2.0])
    parts = [[(_cond(1.0), 1.0)], [(_cond(2.0), 0.7), (_cond(-1.0), 0.3)]]
    uncond = [_cond(0.5), _cond(0.25)]
    recorder = _Recorder()
    out = CFGDenoiser(recorder, cond_scale=7.5)(x, sigma, CFGConds.build(parts, uncond))
    assert recorder.batches == [5]  # 3 positive parts + 2 negatives in one call

    def single(i, c):
        return _Recorder()(x[i:i + 1], sigma[i:i + 1], c["crossattn"][None], c["vector"][None])

    for i in range(2):
        u = single(i, uncond[i])
        expected = u + sum(w * 7.5 * (single(i, c) - u) for c, w in parts[i])
        assert torch.allclose(out[i:i + 1], expected, atol=1e-5)


def test_cfg_skipping_uncond_runs_only_the_parts_and_lets_each_image_first_part_stand_in():
    # A1111 NGMS / Skip Early CFG: the negatives are not run; the first part's result takes the uncond's place
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.5, 0.5])
    parts = [[(_cond(1.0), 1.0)], [(_cond(2.0), 0.7), (_cond(-1.0), 0.3)]]
    uncond = [_cond(0.5), _cond(0.25)]
    recorder = _Recorder()
    out = CFGDenoiser(recorder, cond_scale=7.5)(x, sigma, CFGConds.build(parts, uncond), skip_uncond=True)
    assert recorder.batches == [3]  # the 3 positive parts only

    def single(i, c):
        return _Recorder()(x[i:i + 1], sigma[i:i + 1], c["crossattn"][None], c["vector"][None])

    assert torch.allclose(out[0:1], single(0, parts[0][0][0]), atol=1e-5)   # one part: its denoised latent
    first = single(1, parts[1][0][0])
    expected = first + sum(w * 7.5 * (single(1, c) - first) for c, w in parts[1])
    assert torch.allclose(out[1:2], expected, atol=1e-5)


def test_cfg_with_different_token_counts_pads_parts_and_runs_uncond_apart():
    x, sigma = torch.randn(1, 4, 3, 3), torch.tensor([1.5])
    short, long = _cond(1.0, tokens=4), _cond(3.0, tokens=8)
    conds = CFGConds.build([[(short, 0.5), (long, 0.5)]], [_cond(0.0, tokens=4)])
    assert conds.cond["crossattn"].shape == (2, 8, 8)
    assert torch.equal(conds.cond["crossattn"][0, 4:], short["crossattn"][-1:].expand(4, 8))  # last token repeated
    recorder = _Recorder()
    CFGDenoiser(recorder, cond_scale=5.0)(x, sigma, conds)
    assert recorder.batches == [2, 1]


def test_lcm_schedule_uses_every_20th_timestep_from_the_top():
    from sdstudio.sampling.denoisers import LCMSchedule, sd_alphas_cumprod

    full = sd_alphas_cumprod()
    lcm = LCMSchedule(full)
    assert len(lcm.sigmas) == 50
    assert torch.equal(lcm.alphas_cumprod[-1], full[999]) and torch.equal(lcm.alphas_cumprod[0], full[19])
    assert lcm.sigma_to_t(lcm.sigmas[[0, 10, 49]]).tolist() == [19.0, 219.0, 999.0]
    # a sigma between two LCM sigmas snaps to the nearer one (in log space)
    between = (lcm.log_sigmas[10] * 0.8 + lcm.log_sigmas[11] * 0.2).exp()
    assert lcm.sigma_to_t(between.reshape(1)).item() == 219.0
    sigmas = lcm.get_sigmas(4)
    assert torch.isclose(sigmas[0], lcm.sigmas[-1]) and sigmas[-1] == 0 and len(sigmas) == 5


def test_lcm_denoiser_applies_the_consistency_boundary_condition():
    from sdstudio.sampling.denoisers import LCMDenoiser, LCMSchedule

    lcm = LCMSchedule()
    eps = torch.full((1, 1, 2, 2), 0.3)
    denoiser = LCMDenoiser(lambda x, t: eps, lcm)
    x = torch.full((1, 1, 2, 2), 2.0)
    sigma = lcm.sigmas[20:21]
    t = 20 * 20 + 19
    x0 = x - sigma * eps
    scaled = t * 10.0
    expected = scaled / (scaled ** 2 + 0.25) ** 0.5 * x0 + 0.25 / (scaled ** 2 + 0.25) * x
    assert torch.allclose(denoiser(x, sigma), expected)
