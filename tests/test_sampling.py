"""Diffusion: noising then one step with the true noise gives back the clean latent; guidance
runs as one batch; the same seed gives the same result."""

import pytest
import torch

from soragen.core.errors import UsageError
from soragen.diffusion.sampling import make_scheduler, sample, training_scheduler
from soragen.models.text import TextEmbedding


def test_ddim_with_the_true_noise_recovers_the_clean_latent():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    for prediction in ("epsilon", "v_prediction"):
        scheduler = make_scheduler("ddim", {"prediction_type": prediction})
        scheduler.set_timesteps(10)
        for t in scheduler.timesteps:
            x_t = training_scheduler().add_noise(x0, noise, torch.tensor([int(t)]))
            a = training_scheduler().alphas_cumprod[int(t)]
            truth = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            out = scheduler.step(truth, t, x_t)
            assert torch.allclose(out.pred_original_sample, x0, atol=1e-4)


@pytest.mark.parametrize("prediction, zero_snr", [("epsilon", False), ("v_prediction", False), ("v_prediction", True)])
def test_a_full_run_with_an_oracle_lands_on_the_clean_latent(prediction, zero_snr):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 2, 4, 4, generator=g)
    config = {"prediction_type": prediction, **({"rescale_betas_zero_snr": True} if zero_snr else {})}
    alphas = training_scheduler(config).alphas_cumprod
    assert (alphas[-1] == 0) == zero_snr  # rescaled: the last training step is pure noise, as sampling starts

    def oracle(x, t, text):  # the noise (or velocity) that explains x_t given x0
        a = alphas[t.long()].view(-1, 1, 1, 1, 1)
        noise = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0

    empty = TextEmbedding(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 2))
    for name in ("ddim", "dpm++", "unipc"):
        out = sample(oracle, torch.randn(x0.shape, generator=g), empty, empty, make_scheduler(name, config), 8, 1.0)
        assert torch.allclose(out, x0, atol=1e-3), name


def test_guidance_batches_both_passes_and_mixes_them():
    calls = []
    cond = TextEmbedding(torch.ones(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2))
    uncond = TextEmbedding(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 2))

    def model(x, t, text):
        calls.append((x.shape[0], text.tokens.shape, text.mask.tolist()))
        return text.pooled[:, :1, None, None, None].expand(x.shape[0], *x.shape[1:]) + 0 * x

    sample(model, torch.zeros(1, 1, 1, 2, 2), cond, uncond, make_scheduler("ddim"), 2, guidance=3.0)
    assert len(calls) == 2 and calls[0][0] == 2  # one batch of cond + uncond per step
    assert calls[0][2] == [[True, True, True], [True, False, False]]  # uncond padded and masked


def test_unknown_sampler_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown sampler"):
        make_scheduler("euler-magic")
