"""Samplers as plain functions over a denoiser `model(x, sigma, **extra_args) -> x0`, numerically matching
k-diffusion 0.1.1.post1 `k_diffusion/sampling.py`, plus the ones A1111 adds (DDIM, LCM, Restart).

Every sampler has the signature `sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`:
x (B, C, H, W) starts at noise level sigmas[0], sigmas (n+1,) descending. Random noise comes only from
`noise_sampler(sigma, sigma_next) -> Tensor` (unit variance, shaped like x); `disable` is accepted for
k-diffusion compatibility only — progress is reported through `callback(StepInfo)`.
"""
from __future__ import annotations

from typing import Callable, TypedDict

import numpy as np
import torch
from torch import Tensor

from sdstudio.sampling.brownian import BrownianTreeNoiseSampler
from sdstudio.sampling.denoisers import append_dims
from sdstudio.sampling.schedules import karras

NoiseSampler = Callable[[Tensor, Tensor], Tensor]


class StepInfo(TypedDict):
    """What a sampler reports after each model evaluation (k-diffusion's callback dict)."""

    x: Tensor
    i: int
    sigma: Tensor
    sigma_hat: Tensor
    denoised: Tensor


Callback = Callable[[StepInfo], None]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative dx/dσ = (x − D(x, σ)) / σ."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor | float]:
    """(sigma_down, sigma_up): deterministic step target and the noise to add back for an ancestral step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: Tensor) -> NoiseSampler:
    """Fresh `randn_like(x)` noise on every call (k-diffusion's default)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def _brownian_default(x: Tensor, sigmas: Tensor) -> NoiseSampler:
    """Randomly seeded Brownian tree over the schedule's nonzero sigma range (k-diffusion's SDE default)."""
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


def _report(callback: Callback | None, x: Tensor, i: int, sigma: Tensor, sigma_hat: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x: Tensor, sigma: Tensor, n_steps: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
           noise_sampler: NoiseSampler) -> tuple[Tensor, Tensor]:
    """Karras et al. (2022) Algorithm 2 lines 4–6: raise the noise to sigma_hat = σ(1+γ); returns (x, sigma_hat)."""
    gamma = min(s_churn / n_steps, 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(sigma, sigma_hat) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
                 disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Euler steps, Algorithm 2 of Karras et al. (2022) with optional churn."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
                disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Heun steps, Algorithm 2 of Karras et al. (2022); Euler for the last step to σ = 0."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = _heun_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


def _heun_step(model, x: Tensor, d: Tensor, sigma: Tensor, sigma_to: Tensor, s_in: Tensor, extra_args: dict) -> Tensor:
    """Heun (trapezoidal) step from sigma to sigma_to; plain Euler when sigma_to is 0."""
    dt = sigma_to - sigma
    if sigma_to == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_to, model(x_2, sigma_to * s_in, **extra_args))
    return x + (d + d_2) / 2 * dt


def _dpm2_step(model, x: Tensor, d: Tensor, sigma: Tensor, sigma_to: Tensor, s_in: Tensor, extra_args: dict) -> Tensor:
    """DPM-Solver-2 step from sigma to sigma_to through the log-space midpoint."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
    return x + d_2 * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
                 disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver-2 steps inside Algorithm 2 of Karras et al. (2022) (k-diffusion `sample_dpm_2`)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm2_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(model, x, d, sigmas[i], sigma_down, s_in, extra_args)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _lms_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """∫_{t_i}^{t_{i+1}} of the j-th Lagrange basis polynomial through t_i, t_{i-1}, …, t_{i-order+1} (exact)."""
    nodes = [t[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    basis = basis / np.prod([t[i - j] - node for node in nodes])
    integral = basis.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


@torch.no_grad()
def sample_lms(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
               disable: bool | None = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams–Bashforth in σ) of up to `order` past derivatives (k-diffusion `sample_lms`)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coeff(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def _t(sigma: Tensor) -> Tensor:
    """DPM-Solver time t = −log σ."""
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    """σ = exp(−t)."""
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                              callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                              s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                     callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None, r: float = 0.5) -> Tensor:
    """DPM-Solver++ (stochastic, two stages per step), k-diffusion `sample_dpmpp_sde`."""
    noise_sampler = noise_sampler or _brownian_default(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Stage 1: to the intermediate time s.
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
        # Stage 2: the full step with the blended denoised estimate.
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None) -> Tensor:
    """DPM-Solver++(2M), multistep second order (Lu et al. 2022, Algorithm 2)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            denoised_d = denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE with a 'midpoint' or 'heun' second-order correction (k-diffusion)."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"solver_type: must be 'heun' or 'midpoint', got {solver_type!r}")
    noise_sampler = noise_sampler or _brownian_default(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * eta_h).expm1().neg().sqrt() * s_noise)
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(3M) SDE, third-order multistep (k-diffusion `sample_dpmpp_3m_sde`)."""
    noise_sampler = noise_sampler or _brownian_default(x, sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = (x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                     * (-2 * h * eta).expm1().neg().sqrt() * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_lcm(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
               disable: bool | None = None, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): jump to x0, re-noise to σ_next."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_ddim(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
                disable: bool | None = None, eta: float = 0.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) as A1111 `sd_samplers_timesteps_impl.ddim` runs it, in VP space with
    ᾱ = 1/(1+σ²). x is in k-diffusion scale (x0 + σ·ε); returns the VP latent √ᾱ_last·x at the last sigma,
    which is what A1111 decodes (equal to x when the last sigma is 0)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    alphas = (1 / (1 + sigmas.double() ** 2)).tolist()
    x = x * alphas[0] ** 0.5
    for i in range(len(sigmas) - 1):
        a_t, a_prev = alphas[i], alphas[i + 1]
        denoised = model(x / a_t ** 0.5, sigmas[i] * s_in, **extra_args)
        e_t = (x - a_t ** 0.5 * denoised) / (1 - a_t) ** 0.5
        sigma_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev ** 0.5 * denoised + (1 - a_prev - sigma_t ** 2) ** 0.5 * e_t
        if sigma_t > 0:
            x = x + sigma_t * noise_sampler(sigmas[i], sigmas[i + 1])
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
    return x


def _restart_steps(sigmas: Tensor, restart_list: dict[float, list] | None) -> list[tuple[Tensor, Tensor]]:
    """The (σ_from, σ_to) pairs of a Restart run: the main schedule with restart segments spliced in."""
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item())
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    by_index = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            restart_steps, restart_times, restart_max = by_index[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                pairs.extend(list(zip(sigma_restart[:-1], sigma_restart[1:])) * restart_times)
    return pairs


@torch.no_grad()
def sample_restart(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback | None = None,
                   disable: bool | None = None, s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                   restart_list: dict[float, list] | None = None) -> Tensor:
    """Restart sampling (Xu et al. 2023) as A1111 `restart_sampler`: Heun steps; at each restart the noise is
    raised back up and the segment re-run. restart_list = {σ_min: [steps, times, σ_max]} (None = A1111's auto)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    last_sigma = None
    for step_id, (old_sigma, new_sigma) in enumerate(_restart_steps(sigmas, restart_list)):
        if last_sigma is not None and last_sigma < old_sigma:
            x = x + noise_sampler(last_sigma, old_sigma) * s_noise * (old_sigma ** 2 - last_sigma ** 2) ** 0.5
        denoised = model(x, old_sigma * s_in, **extra_args)
        d = to_d(x, old_sigma, denoised)
        _report(callback, x, step_id, new_sigma, old_sigma, denoised)
        x = _heun_step(model, x, d, old_sigma, new_sigma, s_in, extra_args)
        last_sigma = new_sigma
    return x
