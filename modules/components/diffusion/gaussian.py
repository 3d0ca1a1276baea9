"""Gaussian diffusion pieces (pure torch): noise schedules, q_sample, DDPM/DDIM samplers, classifier-free guidance,
and improved DDPM's learned variance with its variational-bound loss term.

DDPM: Ho et al. 2020; cosine schedule, learned variance, L_vlb: Nichol & Dhariwal 2021 (openai/improved-diffusion);
DDIM: Song et al. 2021; guidance: Ho & Salimans 2022. A denoiser here is any callable ``eps_fn(x_t, t)`` with ``t``
a (B,) long tensor of timesteps, returning eps (B, C, ...) or, with a learned variance, eps and the variance
interpolation values concatenated on the channel axis (B, 2C, ...).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from modules.components.errors import ConfigError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCHEDULES = ("linear", "cosine")


def make_betas(kind: str, timesteps: int) -> torch.Tensor:
    """Per-step noise variances beta_1..beta_T (float64).

    ``linear``: 1e-4 -> 0.02 at T=1000 (rescaled for other T as in improved DDPM: beta_T = 20 / T, so it
    needs T > 20, else beta_T >= 1 and alpha_bar reaches 0); ``cosine``: from
    alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, betas clipped at 0.999.
    """
    if timesteps < 1:
        raise ConfigError(f"a noise schedule needs timesteps >= 1, got {timesteps}")
    if kind == "linear":
        scale = 1000 / timesteps
        if scale * 0.02 >= 1:
            raise ConfigError(f"the linear schedule rescaled to {timesteps} timesteps has beta_T = 20 / T = "
                              f"{scale * 0.02:.2f} >= 1 (x_T would carry no signal and log-SNR is infinite): use "
                              "timesteps > 20 or the cosine schedule")
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if kind == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ConfigError(f"unknown noise schedule '{kind}': pick one of {', '.join(SCHEDULES)}")


class NoiseSchedule(nn.Module):
    """Buffers of a discrete diffusion: ``betas``, ``alphas_cumprod`` (alpha_bar) and the DDPM posterior variance."""

    def __init__(self, kind: str = "linear", timesteps: int = 1000):
        super().__init__()
        self.kind, self.timesteps = kind, timesteps
        betas = make_betas(kind, timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)  # beta_tilde_t
        # beta_tilde_0 = 0: improved DDPM clips its log at t=0 to beta_tilde_1 (the learned range's lower end)
        log_posterior = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        buffers = (("betas", betas), ("alphas_cumprod", alphas_cumprod), ("posterior_variance", posterior_variance),
                   ("posterior_log_variance_clipped", log_posterior), ("log_betas", torch.log(betas)),
                   ("log_snr", torch.log(alphas_cumprod / (1 - alphas_cumprod))),
                   ("posterior_mean_coef1", betas * previous.sqrt() / (1 - alphas_cumprod)),
                   ("posterior_mean_coef2", (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod)),
                   ("alpha_bar_from_minus_1", torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])))
        for name, value in buffers:
            self.register_buffer(name, value.float(), persistent=False)

    def alpha_bar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """alpha_bar at integer steps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast over ``ndim``-d tensors; t=-1 gives 1."""
        return self.alpha_bar_from_minus_1[t + 1].view(-1, *([1] * (ndim - 1)))

    def at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Buffer ``name`` at steps ``t`` (B,), shaped (B, 1, ..., 1)."""
        return getattr(self, name)[t].view(-1, *([1] * (ndim - 1)))

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self.at("posterior_mean_coef1", t, x_t.ndim) * x0 + self.at("posterior_mean_coef2", t, x_t.ndim) * x_t

    def learned_log_variance(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """improved DDPM's learned-range variance: v in [-1, 1] interpolates log beta_tilde_t (v=-1) .. log beta_t (v=1)."""
        fraction = (values + 1) / 2
        return (fraction * self.at("log_betas", t, values.ndim)
                + (1 - fraction) * self.at("posterior_log_variance_clipped", t, values.ndim))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
    alpha_bar = schedule.alpha_bar(t, x0.ndim)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Invert q_sample given the noise: x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    alpha_bar = schedule.alpha_bar(t, x_t.ndim)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def split_output(output: torch.Tensor, learn_sigma: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps, variance values or None) of a denoiser output that carries 2C channels when ``learn_sigma``."""
    if not learn_sigma:
        return output, None
    eps, values = output.chunk(2, dim=1)
    return eps, values


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that improved DDPM's decoder likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-likelihood (nats, per element) of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales));
    the end bins take the tails, as improved DDPM's decoder term L_0."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_terms(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
              values: torch.Tensor) -> torch.Tensor:
    """Per-sample variational-bound term in bits/dim (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
    the discretised decoder NLL at t = 0, with p's mean from ``eps`` and its learned-range variance from ``values``.

    Pass ``eps.detach()`` to train only the variance through this term (improved DDPM's hybrid loss).
    """
    dims = tuple(range(1, x0.ndim))
    model_log_variance = schedule.learned_log_variance(values, t)
    model_mean = schedule.posterior_mean(predict_x0(x_t, t, eps, schedule), x_t, t)
    true_mean = schedule.posterior_mean(x0, x_t, t)
    true_log_variance = schedule.at("posterior_log_variance_clipped", t, x0.ndim)
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).mean(dim=dims) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).mean(dim=dims) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def guided_eps(eps_cond: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
               null_label: int, guidance_scale: float, learn_sigma: bool = False) -> EpsFn:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), so s=0 is unconditional and s=1 conditional.

    ``eps_cond(x_t, t, labels)`` is the class-conditional denoiser; ``null_label`` is the dropped-label class.
    One batched forward pass serves both terms when 0 < s != 1. With ``learn_sigma`` the output's second half of
    channels (the variance) is not guided: it is the conditional prediction's, as in DiT's ``forward_with_cfg``.
    """
    null = torch.full_like(labels, null_label)
    if guidance_scale == 0:
        return lambda x, t: eps_cond(x, t, null)
    if guidance_scale == 1:
        return lambda x, t: eps_cond(x, t, labels)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = eps_cond(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, ...)
        out_c, out_u = both.chunk(2)
        (eps_c, values), (eps_u, _) = split_output(out_c, learn_sigma), split_output(out_u, learn_sigma)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        return eps if values is None else torch.cat([eps, values], dim=1)

    return eps_fn


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, noise: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                clip: float | None = None, learn_sigma: bool = False) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps, starting from ``noise``.

    The step variance is the learned one (``learn_sigma``: the output's second half of channels, improved DDPM's
    learned range) or else the fixed posterior variance beta_tilde_t.
    """
    x = noise
    for step in reversed(range(schedule.timesteps)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        eps, values = split_output(eps_fn(x, t), learn_sigma)
        x0 = predict_x0(x, t, eps, schedule)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = schedule.posterior_mean(x0, x, t)
        if step == 0:
            return mean
        log_variance = (schedule.learned_log_variance(values, t) if values is not None
                        else schedule.posterior_variance[step].log())
        x = mean + torch.exp(0.5 * log_variance) * torch.randn(x.shape, generator=generator, device=x.device)
    return x


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """DDIM's uniform sub-sequence ``i * T / steps`` (i < steps), descending: every step when steps=T.

    Never T-1 for fewer steps: with the cosine schedule alpha_bar(T-1) ~ 1e-9, and a DDIM jump from there
    multiplies the eps error by sqrt(alpha_bar(t_prev) / alpha_bar(T-1)) ~ 10^3.
    """
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"sampling steps {steps} must be between 1 and the {timesteps} training timesteps")
    return [i * timesteps // steps for i in reversed(range(steps))]


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, noise: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0,
                generator: torch.Generator | None = None, clip: float | None = None) -> torch.Tensor:
    """DDIM sampling with ``steps`` steps; ``eta=0`` is deterministic, ``eta=1`` with all T steps is DDPM."""
    x = noise
    sequence = ddim_timesteps(schedule.timesteps, steps)
    for i, step in enumerate(sequence):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        t_prev = torch.full_like(t, sequence[i + 1] if i + 1 < len(sequence) else -1)
        eps = eps_fn(x, t)[:, : x.shape[1]]  # a learned variance (extra channels) plays no part in DDIM
        x0 = predict_x0(x, t, eps, schedule)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            alpha_bar_t = schedule.alpha_bar(t, x.ndim)
            eps = (x - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()  # keep eps consistent with the clipped x0
        alpha_bar, previous = schedule.alpha_bar(t, x.ndim), schedule.alpha_bar(t_prev, x.ndim)
        sigma = eta * ((1 - previous) / (1 - alpha_bar) * (1 - alpha_bar / previous)).sqrt()
        x = previous.sqrt() * x0 + (1 - previous - sigma**2).clamp_min(0).sqrt() * eps
        if eta > 0 and i + 1 < len(sequence):
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    return x


class IdentityAutoencoder(nn.Module):
    """The default latent hook: diffusion in pixel space. A latent autoencoder implements the same four members."""

    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
