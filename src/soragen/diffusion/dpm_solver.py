"""DPM-Solver++ (2M): the built-in model's default sampler, on a DDPM noise schedule.

The same numbers as diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2)` (midpoint, first order on the last step, final sigma 0), step for step; the tests
hold the two to the same bits. Ours because every diffusers module import first loads the library's
utilities (torch's compiler among them): seconds of a new process for arithmetic on ten numbers.
Other samplers, and schedules this file does not describe (`supports`), stay diffusers'.

The method, in the notation of Lu et al.: with alpha_t, sigma_t the signal and noise scales of
x_t = alpha_t x0 + sigma_t e and lambda_t = log(alpha_t / sigma_t), each step turns the model's
output into a prediction of x0 and moves from lambda_s to lambda_t by the exponential integrator,
first order on the first step, then correcting with the slope between the last two x0 predictions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from soragen.diffusion import ddpm

PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")


def supports(config: dict) -> bool:
    """A DDPM schedule this sampler reproduces (a complete config: sampling.SCHEDULER_CONFIG merged in)."""
    return (ddpm.supports(config) and config.get("prediction_type") in PREDICTIONS
            and config.get("timestep_spacing") in SPACINGS and not config.get("use_flow_sigmas"))


class DPMSolver2M:
    """Called as diffusers' schedulers are by `sampling.sample`: `set_timesteps(steps)`, then
    `step(model_output, t, x).prev_sample` once per timestep in `timesteps`."""

    init_noise_sigma = 1.0
    order = 2

    def __init__(self, config: dict):
        self.config = SimpleNamespace(**config)
        self.alphas_cumprod = ddpm.alphas_cumprod(config)
        self.timesteps = torch.zeros(0, dtype=torch.int64)

    def set_timesteps(self, steps: int) -> None:
        """`steps` timesteps spaced as the config says, and the sigma (noise-to-signal ratio) of each,
        interpolated in the training schedule, then 0 after the last."""
        c, n = self.config, self.config.num_train_timesteps
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            timesteps = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += c.steps_offset
        else:  # trailing: the first step at the last training timestep, pure noise
            timesteps = np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(dtype=torch.int64)
        self.index, self.previous_x0 = 0, None

    @staticmethod
    def scales(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha, sigma_t, lambda) at a noise-to-signal ratio `sigma`."""
        alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
        scale = sigma * alpha
        return alpha, scale, torch.log(alpha) - torch.log(scale)

    def predict_x0(self, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type == "sample":
            return model_output
        alpha, sigma, _ = self.scales(self.sigmas[self.index])
        if self.config.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha
        return alpha * x - sigma * model_output  # v_prediction

    def step(self, model_output: torch.Tensor, timestep, x: torch.Tensor) -> SimpleNamespace:
        x0 = self.predict_x0(model_output, x)
        x = x.to(torch.float32)
        alpha_t, sigma_t, lambda_t = self.scales(self.sigmas[self.index + 1])
        _, sigma_s, lambda_s = self.scales(self.sigmas[self.index])
        h = lambda_t - lambda_s
        x_next = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * x0
        last = self.index == len(self.timesteps) - 1
        if self.previous_x0 is not None and not last:  # second order: the slope between the last two x0
            lambda_r = self.scales(self.sigmas[self.index - 1])[2]
            slope = 1.0 / ((lambda_s - lambda_r) / h) * (x0 - self.previous_x0)
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * slope
        self.previous_x0, self.index = x0, self.index + 1
        return SimpleNamespace(prev_sample=x_next.to(model_output.dtype))
