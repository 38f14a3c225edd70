"""soragen's DPM-Solver++ 2M against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2)
on the schedules it claims (`supports`): the same timesteps and the same bits, step after step."""

import itertools

import pytest
import torch

from soragen.diffusion import dpm_solver
from soragen.diffusion.sampling import SCHEDULER_CONFIG, make_scheduler

CASES = list(itertools.product(("v_prediction", "epsilon", "sample"), ("linear", "scaled_linear"),
                               ("trailing", "leading", "linspace")))


@pytest.mark.parametrize("prediction,betas,spacing", CASES)
def test_the_same_bits_as_diffusers(prediction, betas, spacing):
    from diffusers import DPMSolverMultistepScheduler
    g = torch.Generator().manual_seed(0)
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction, "beta_schedule": betas, "timestep_spacing": spacing,
              "beta_start": 0.00085, "beta_end": 0.012} if betas == "scaled_linear" else \
        {**SCHEDULER_CONFIG, "prediction_type": prediction, "timestep_spacing": spacing}
    for steps in (1, 2, 3, 10, 25):
        ref = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        ours = dpm_solver.DPMSolver2M(config)
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert torch.equal(ref.timesteps, ours.timesteps)
        x = torch.randn(1, 4, 3, 5, 5, generator=g)
        y = x.clone()
        for t in ref.timesteps:
            out = torch.randn(x.shape, generator=g)
            x, y = ref.step(out, t, x).prev_sample, ours.step(out, t, y).prev_sample
            assert torch.equal(x, y), (steps, int(t), (x - y).abs().max())


def test_the_sampler_made_for_each_schedule():
    assert isinstance(make_scheduler("dpm++", dict(SCHEDULER_CONFIG)), dpm_solver.DPMSolver2M)
    for other in ({"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}):
        assert not isinstance(make_scheduler("dpm++", {**SCHEDULER_CONFIG, **other}), dpm_solver.DPMSolver2M)
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
    assert not isinstance(make_scheduler("dpm++", flow), dpm_solver.DPMSolver2M)
    assert not isinstance(make_scheduler("ddim", dict(SCHEDULER_CONFIG)), dpm_solver.DPMSolver2M)


@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
def test_the_training_schedule_noises_as_diffusers_ddpm_does(betas):
    from diffusers import DDPMScheduler

    from soragen.diffusion import ddpm
    from soragen.diffusion.sampling import training_scheduler
    config = {**SCHEDULER_CONFIG, "beta_schedule": betas}
    ours, ref = training_scheduler(config), DDPMScheduler.from_config(config)
    assert isinstance(ours, ddpm.Schedule) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 2, 5, 5, generator=g), torch.randn(3, 4, 2, 5, 5, generator=g)
    t = torch.tensor([0, 517, 999])
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    assert not isinstance(training_scheduler({**config, "rescale_betas_zero_snr": True}), ddpm.Schedule)
