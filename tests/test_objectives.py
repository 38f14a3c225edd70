"""The training objective, stated as the method: a clean latent, noise at a step, the target the
schedule says, the MSE; and on a fixed batch, training lowers it."""

import pytest
import torch

from soragen.core.config import DiTObjective, dit_preset
from soragen.models.dit import VideoDiT
from soragen.diffusion.objectives import (detail_mask, diffusion_loss, diffusion_target, flow_levels, flow_loss,
                                object_weighted_mse)
from soragen.diffusion.sampling import training_scheduler
from soragen.models.text import TextEmbedding


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 2, 8, 8, generator=g)
    tokens = torch.randn(4, 5, 16, generator=g)
    return latents, TextEmbedding(tokens, torch.ones(4, 5, dtype=torch.bool), tokens.mean(1))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_is_the_mse_to_the_schedules_target_at_the_noised_latent(prediction):
    scheduler = training_scheduler(DiTObjective(prediction=prediction).schedule())
    latents, text = batch()
    seen = {}

    def dit(noisy, t, tokens, mask, pooled):  # records what the model is shown, predicts a known thing
        seen.update(noisy=noisy, t=t)
        return torch.zeros_like(noisy)
    loss = diffusion_loss(dit, scheduler, latents, text, torch.Generator().manual_seed(7))
    # the same draws, in the same order: the noise, then the steps
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    assert torch.equal(seen["t"], t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    assert torch.allclose(seen["noisy"], a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-6)  # x_t
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(diffusion_target(scheduler, latents, noise, t), target, atol=1e-6)
    assert torch.allclose(loss, (target ** 2).mean(), atol=1e-6)  # a zero prediction's MSE


def test_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = VideoDiT(dit_preset("test", in_channels=4, text_dim=16))
    scheduler = training_scheduler(DiTObjective(prediction="v_prediction").schedule())
    latents, text = batch(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss():  # the same noise and steps every time: only the model changes
        return diffusion_loss(model, scheduler, latents, text, torch.Generator().manual_seed(3))
    first = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.7 * first


def test_the_flow_loss_is_zero_for_the_true_flow_and_the_level_is_what_the_dit_is_told():
    latents, text = batch()
    schedule = DiTObjective(prediction="flow").schedule()
    assert schedule == {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                        "flow_shift": 3.0}

    def oracle(noisy, t, tokens, mask, pooled):  # knows x0: along x_s = (1 - s) x0 + s e the flow is (x_s - x0) / s
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (noisy - latents) / s
    assert flow_loss(oracle, schedule, latents, text, torch.Generator().manual_seed(7)).item() < 1e-8

    def zero(noisy, t, tokens, mask, pooled):
        return torch.zeros_like(noisy)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    want = ((noise - latents) ** 2).mean()  # a zero prediction's MSE to the flow e - x0
    assert torch.allclose(flow_loss(zero, schedule, latents, text, torch.Generator().manual_seed(7)), want, atol=1e-6)


def test_flow_levels_are_logit_normal_and_the_shift_moves_them_toward_the_noise():
    plain = flow_levels(20000, torch.Generator().manual_seed(0), 1.0)
    shifted = flow_levels(20000, torch.Generator().manual_seed(0), 3.0)
    assert 0 < plain.min() and plain.max() < 1 and abs(plain.median().item() - 0.5) < 0.02
    assert abs(shifted.median().item() - 0.75) < 0.02  # shift 3 takes the middle level 0.5 to 0.75
    assert bool((shifted >= plain).all())


def test_auto_is_flow_for_a_flow_model_and_the_velocity_otherwise():
    assert DiTObjective().resolved(flow_model=True).prediction == "flow"
    assert DiTObjective().resolved(flow_model=False).prediction == "v_prediction"
    wan = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0, "solver_order": 2}
    assert DiTObjective(prediction="flow").schedule(wan)["flow_shift"] == 5.0  # the --init model's own
    assert DiTObjective(prediction="flow", flow_shift=2.0).schedule(wan) == {**wan, "flow_shift": 2.0}
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        DiTObjective(zero_terminal_snr=True).resolved(flow_model=True)


def test_zero_terminal_snr_needs_the_velocity():
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        DiTObjective(prediction="epsilon", zero_terminal_snr=True)
    assert DiTObjective(prediction="v_prediction", zero_terminal_snr=True).schedule() == {"prediction_type": "v_prediction",
                                                               "rescale_betas_zero_snr": True}


def test_detail_mask_marks_a_small_object_on_a_sky_gradient_and_nothing_else():
    T, H, W = 3, 32, 32
    rows = torch.linspace(-0.3, 0.6, H)  # a vertical gradient: constant along each row
    video = rows.view(1, 1, 1, H, 1).expand(1, 3, T, H, W).clone()
    video[:, 0, :, 10:16, 4:10] = 0.9  # a 6x6 red-ish square
    video[:, 1:, :, 10:16, 4:10] = -0.7
    mask = detail_mask(video)
    assert mask.shape == (1, 1, T, H, W)
    assert mask[..., 10:16, 4:10].all()
    assert mask.sum() == T * 36  # the gradient itself is not detail


def test_object_weighted_mse_weighs_an_objects_cells_and_reduces_to_the_mse():
    latents = torch.zeros(1, 4, 2, 8, 8)
    latents[:, :, :, 2:4, 2:4] = 2.0  # an object of 2x2 cells on a flat background
    target = torch.zeros_like(latents)
    on_object, off_object = target.clone(), target.clone()
    on_object[:, :, :, 2:4, 2:4] = 1.0  # the same error, once on the object's cells, once on four others
    off_object[:, :, :, 5:7, 5:7] = 1.0
    ratio = object_weighted_mse(on_object, target, latents, 4.0) / object_weighted_mse(off_object, target, latents, 4.0)
    assert torch.isclose(ratio, torch.tensor(5.0))
    assert object_weighted_mse(on_object, target, latents, 0.0) == torch.nn.functional.mse_loss(on_object, target)
    # a uniform error costs the same however the cells are weighted: the weights are normalised
    assert torch.isclose(object_weighted_mse(target + 1, target, latents, 4.0), torch.tensor(1.0))
