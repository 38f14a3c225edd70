"""The DDPM noise schedule that training noises latents with: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e,
a_t the cumulative product of 1 - beta over the first t steps, and the velocity
v = sqrt(a_t) e - sqrt(1 - a_t) x0 that v-prediction teaches.

The same numbers as diffusers' `DDPMScheduler.add_noise` / `get_velocity` (tests hold the two to the
same bits), without importing diffusers in every training process. Schedules this module does not
describe (`supports`: a cosine schedule, zero-terminal-SNR betas) stay diffusers'.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

BETAS = ("linear", "scaled_linear")


def supports(config: dict) -> bool:
    """A complete schedule config (sampling.SCHEDULER_CONFIG merged in) whose betas this module makes."""
    return config.get("beta_schedule") in BETAS and not config.get("rescale_betas_zero_snr") \
        and not config.get("trained_betas")


def alphas_cumprod(config: dict) -> torch.Tensor:
    """a_t for t = 0 .. num_train_timesteps - 1 (float32), from linear or scaled-linear betas."""
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    if config["beta_schedule"] == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    else:
        betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class Schedule:
    """Called as diffusers' DDPMScheduler is in training: `add_noise`, `get_velocity`, `config`."""

    def __init__(self, config: dict):
        self.config = SimpleNamespace(**config)
        self.alphas_cumprod = alphas_cumprod(config)

    def _scales(self, like: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(a_t) and sqrt(1 - a_t) per clip, shaped to broadcast over `like`."""
        self.alphas_cumprod = self.alphas_cumprod.to(like.device)
        a = self.alphas_cumprod.to(like.dtype)[timesteps.to(like.device)]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (a ** 0.5).flatten().view(shape), ((1 - a) ** 0.5).flatten().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        signal, scale = self._scales(x0, timesteps)
        return signal * x0 + scale * noise

    def get_velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        signal, scale = self._scales(x0, timesteps)
        return signal * noise - scale * x0
