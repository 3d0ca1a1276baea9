"""Gaussian diffusion pieces (pure torch): noise schedules, q_sample, DDPM/DDIM samplers, classifier-free guidance.

DDPM: Ho et al. 2020; cosine schedule: Nichol & Dhariwal 2021; DDIM: Song et al. 2021; guidance: Ho & Salimans 2022.
A denoiser here is any callable ``eps_fn(x_t, t) -> eps`` with ``t`` a (B,) long tensor of timesteps.
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

    ``linear``: 1e-4 -> 0.02 at T=1000 (rescaled for other T as in improved DDPM); ``cosine``: from
    alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, betas clipped at 0.999.
    """
    if kind == "linear":
        scale = 1000 / timesteps
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
        for name, value in (("betas", betas), ("alphas_cumprod", alphas_cumprod), ("posterior_variance", posterior_variance),
                            ("alpha_bar_from_minus_1", torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod]))):
            self.register_buffer(name, value.float(), persistent=False)

    def alpha_bar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """alpha_bar at integer steps ``t`` (B,), shaped (B, 1, ..., 1) to broadcast over ``ndim``-d tensors; t=-1 gives 1."""
        return self.alpha_bar_from_minus_1[t + 1].view(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
    alpha_bar = schedule.alpha_bar(t, x0.ndim)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def predict_x0(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Invert q_sample given the noise: x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    alpha_bar = schedule.alpha_bar(t, x_t.ndim)
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def guided_eps(eps_cond: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
               null_label: int, guidance_scale: float) -> EpsFn:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), so s=0 is unconditional and s=1 conditional.

    ``eps_cond(x_t, t, labels)`` is the class-conditional denoiser; ``null_label`` is the dropped-label class.
    One batched forward pass serves both terms when 0 < s != 1.
    """
    null = torch.full_like(labels, null_label)
    if guidance_scale == 0:
        return lambda x, t: eps_cond(x, t, null)
    if guidance_scale == 1:
        return lambda x, t: eps_cond(x, t, labels)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = eps_cond(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, ...)
        eps_c, eps_u = both.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return eps_fn


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, noise: torch.Tensor, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                clip: float | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps with the posterior variance beta_tilde_t, starting from ``noise``."""
    x = noise
    for step in reversed(range(schedule.timesteps)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0 = predict_x0(x, t, eps_fn(x, t), schedule)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        alpha_bar, previous = schedule.alpha_bar(t, x.ndim), schedule.alpha_bar(t - 1, x.ndim)
        beta = 1 - alpha_bar / previous
        mean = (previous.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - previous) * x) / (1 - alpha_bar)  # posterior mean
        x = mean
        if step > 0:
            x = x + schedule.posterior_variance[step].sqrt() * torch.randn(x.shape, generator=generator, device=x.device)
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
        eps = eps_fn(x, t)
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
