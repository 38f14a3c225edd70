"""Samplers (diffusers schedulers) and the sampling loop with classifier-free guidance."""

from __future__ import annotations

from typing import Callable

import torch

from soragen.core.config import PREDICTIONS, SAMPLERS, check_keys
from soragen.core.errors import SoragenError, UsageError
from soragen.diffusion import ddpm, dpm_solver

# The noise schedule: DiT's linear betas over 1000 steps, the DiT predicting the velocity (what
# `soragen train` teaches by default). Every model folder stores its own, which wins.
# "trailing" spacing makes few-step sampling start from pure noise.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="trailing",
)


# What a model folder's scheduler_config.json may say, checked before diffusers builds from it (a
# num_train_timesteps of 10**12 would allocate terabytes of betas).
SCHEDULE_LIMITS = {
    "num_train_timesteps": (int, dict(low=1, high=100_000)),
    "beta_start": (float, dict(above=0, high=1)),
    "beta_end": (float, dict(above=0, high=1)),
    "beta_schedule": (str, dict(choices=("linear", "scaled_linear", "squaredcos_cap_v2"))),
    "prediction_type": (str, dict(choices=PREDICTIONS + ("flow_prediction",))),
    "flow_shift": (float, dict(above=0, high=100)),
    "use_flow_sigmas": (bool, {}),
    "solver_order": (int, dict(low=1, high=3)),
    "timestep_spacing": (str, dict(choices=("linspace", "leading", "trailing"))),
    "steps_offset": (int, dict(low=0, high=1000)),
    "clip_sample": (bool, {}),
    "set_alpha_to_one": (bool, {}),
    "rescale_betas_zero_snr": (bool, {}),
}


def check_schedule(config: dict) -> dict:
    """`config` if every setting it has that we know is of the right type and in range, else ConfigError."""
    if not isinstance(config, dict):
        raise ValueError(f"a scheduler config must be a JSON object, got {type(config).__name__}")
    check_keys(config, SCHEDULE_LIMITS)
    return config


def read_schedule(folder) -> dict:
    """A model folder's noise schedule (scheduler/scheduler_config.json), checked; SoragenError naming the file."""
    from soragen.core.jsonfile import INCOMPLETE, read_json
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    config = read_json(scheduler_file, INCOMPLETE)
    try:
        return check_schedule(config)
    except ValueError as err:
        raise SoragenError(f"{scheduler_file}: {err}") from err


FLOW_ONLY = ("euler", "lcm")  # flow matching's Euler and LCM: no DDPM schedule
LISTED = ("euler", "lcm", "unipc")  # the flow samplers whose schedulers take a list of timesteps (as sigmas)


def check_sampler(sampler: str, scheduler_config: dict, source) -> None:
    """A model's default sampler must be one that samples its noise schedule (`source`: the file that names it)."""
    flow = is_flow(scheduler_config)
    if (sampler == "ddim" and flow) or (sampler in FLOW_ONLY and not flow):
        raise SoragenError(f"{source}: sampling.sampler {sampler} cannot sample this model's "
                           f"{'flow-matching' if flow else 'DDPM'} noise schedule")


def training_scheduler(config: dict | None = None):
    """What training noises latents with: soragen.diffusion.ddpm where it describes the schedule (the
    same bits as diffusers'), diffusers' DDPMScheduler otherwise."""
    config = {**SCHEDULER_CONFIG, **(config or {})}
    if ddpm.supports(config):
        return ddpm.Schedule(config)
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(config)


def is_flow(config: dict | None) -> bool:
    """A flow-matching schedule (Wan's): the model predicts the flow e - x0 along x_t = (1 - s) x0 + s e."""
    return bool(config) and (config.get("prediction_type") == "flow_prediction" or bool(config.get("use_flow_sigmas")))


def make_scheduler(name: str, config: dict | None = None, shift: float | None = None):
    """The sampler `name` built on the model's noise schedule; `shift` overrides a flow schedule's
    flow_shift (more of the steps at high noise as it grows)."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if is_flow(config):
        return _flow_scheduler(name, dict(config), shift)
    if name in FLOW_ONLY:
        raise UsageError(f"--sampler {name} is flow matching's {dict(euler='Euler', lcm='LCM')[name]}, and this "
                         f"model's noise schedule is DDPM's: choose ddim, dpm++ or unipc")
    config = {**SCHEDULER_CONFIG, **(config or {})}
    if name == "dpm++" and dpm_solver.supports(config):  # diffusers' numbers without importing diffusers
        return dpm_solver.DPMSolver2M(config)
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, solver_order=2)


def _flow_scheduler(name: str, config: dict, shift: float | None):
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler,
                           UniPCMultistepScheduler)
    flow_shift = config.get("flow_shift", 1.0) if shift is None else shift
    config.update(flow_shift=flow_shift, use_flow_sigmas=True, prediction_type="flow_prediction")
    if name == "ddim":
        raise UsageError("--sampler ddim cannot sample a flow-matching model (it steps a DDPM noise schedule); "
                         "choose unipc, dpm++ or euler")
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "lcm":  # re-noises at every step: from the generator sample() passes to its step
        return FlowMatchLCMScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=flow_shift)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=flow_shift)


def check_timesteps(name: str, config: dict | None, timesteps: tuple[float, ...], steps: int) -> None:
    """An explicit list of timesteps (decreasing and positive, as SamplingDefaults checks) must be
    one the sampler can take, within the schedule's training timesteps, as many as the steps."""
    if not timesteps:
        return
    if not is_flow(config) or name not in LISTED:
        raise UsageError(f"--timesteps needs a flow-matching model (such as Wan) and --sampler euler, lcm or unipc, "
                         f"whose schedulers take a list; {name} on this model makes its own")
    top = (config or {}).get("num_train_timesteps", 1000)
    if timesteps[0] > top:
        raise UsageError(f"--timesteps must be above 0 and at most {top} (the model's training timesteps), got "
                         f"{timesteps[0]:g}")
    if len(timesteps) != steps:
        raise UsageError(f"--timesteps lists {len(timesteps)} timesteps and --steps is {steps}: they must agree "
                         f"(give one of them)")


def set_schedule(scheduler, steps: int, timesteps: tuple[float, ...] = ()) -> None:
    """The scheduler's timesteps: `steps` spread as it spreads them, or `timesteps` (the training
    units before the shift) given as sigmas t / num_train_timesteps, which the scheduler shifts
    and makes the timesteps the model sees from, so that sigma and timestep agree (as diffusers'
    flow schedulers advise; LightX2V's warped denoising steps are these)."""
    if not timesteps:
        scheduler.set_timesteps(steps)
        return
    scheduler.set_timesteps(sigmas=[t / scheduler.config.num_train_timesteps for t in timesteps])


def sample(model: Callable[..., torch.Tensor], noise: torch.Tensor, cond, uncond, scheduler, steps: int,
            guidance: float | Callable[[float], float], eta: float = 0.0, generator: torch.Generator | None = None,
            progress: Callable[[int, int], None] | None = None, timesteps: tuple[float, ...] = ()) -> torch.Tensor:
    """Run the sampler from `noise` (B, C, T, H, W) to a clean latent.

    `model(x, t, text)` predicts what the scheduler's prediction_type says (noise or velocity;
    `scheduler.step` converts); `cond` and `uncond` are TextEmbeddings for the batch. With
    guidance != 1 both passes run as one batch of 2B: out = out_u + g * (out_c - out_u).
    `guidance` may be a function of the timestep (two experts, each with its own scale).
    `timesteps`: an explicit schedule (set_schedule). A scheduler that draws noise in its step
    (DDIM's eta, LCM's re-noising) draws it from `generator`, after the starting noise: one
    stream, so that a seed gives the same video every time."""
    set_schedule(scheduler, steps, timesteps)
    scale = guidance if callable(guidance) else (lambda t: guidance)
    guided = any(scale(float(t)) != 1.0 for t in scheduler.timesteps)
    text = cond.cat(uncond) if guided else cond
    params = _step_params(scheduler)
    step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedules start at the noise itself
    for i, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        t_batch = torch.full((model_in.shape[0],), float(t), device=x.device)
        out = model(model_in, t_batch, text).float()
        if guided:
            out_cond, out_uncond = out.chunk(2)
            out = out_uncond + scale(float(t)) * (out_cond - out_uncond)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        if progress:
            progress(i + 1, len(scheduler.timesteps))
    return x


def _step_params(scheduler) -> set[str]:
    import inspect
    return set(inspect.signature(scheduler.step).parameters)

