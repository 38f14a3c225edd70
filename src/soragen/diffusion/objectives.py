"""What training minimises: the DiT's diffusion loss, and the VAE's reconstruction + KL.

The diffusion objective, in the scheduler's notation (alpha_bar_t: the signal kept at step t):

    x0                                   a clean latent (the VAE's, normalised)
    e ~ N(0, I),  t ~ U{0 .. T-1}         noise and a step, one per clip
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) e        scheduler.add_noise
    target = e                           (epsilon prediction)
           = sqrt(alpha_bar_t) e - sqrt(1 - alpha_bar_t) x0    (v prediction: the velocity)
    loss = mean (DiT(x_t, t, text) - target)^2

Measured in x0 terms, the epsilon loss weighs a step by its SNR and the velocity loss by SNR + 1:
at high noise, where a video's layout and colours are decided, the epsilon loss is close to no
signal at all, so soragen trains v-prediction by default for DDPM models.

Flow matching (Wan's objective, `flow_loss`) draws a straight line from the clip to the noise:

    s = shift u / (1 + (shift - 1) u),  u = sigmoid(n), n ~ N(0, 1)      the noise level, one per clip
    x_s = (1 - s) x0 + s e                                              t = 1000 s is what the DiT is told
    target = e - x0                                                     the flow, the same all along the line
    loss = mean (DiT(x_s, t, text) - target)^2

The levels are logit-normal (SD3's finding: the middle levels, where the flow is hardest to
guess, are worth the most steps), then shifted by the model's flow_shift, the shift its sampler
applies to its steps, so training spends its steps at the noise levels sampling visits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soragen.diffusion.draws import as_draws
from soragen.models.vae import pad_frames

# A latent cell counts as part of an object when it stands out from its row's and column's median by
# this much: with the shapes world's VAEs, that finds most of the cells under an object's pixels.
LATENT_DETAIL_THRESHOLD = 0.3


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the DiT should output for x_t made from these latents and noise: the noise, or the velocity."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def diffusion_loss(dit, scheduler, latents: torch.Tensor, text, generator,
                   object_weight: float = 0.0) -> torch.Tensor:
    """The loss of one batch: latents (B, C, T, H, W) clean; text a TextEmbedding; all randomness
    (noise, steps) from `generator`: each clip's own (a soragen.diffusion.draws.ClipDraws), or a
    torch.Generator's for the whole batch. The mean of the clips' losses."""
    device = latents.device
    draws = as_draws(generator, latents.shape[0])
    noise = draws.randn(latents.shape, "noise").to(device)
    t = draws.randint(scheduler.config.num_train_timesteps, "timestep").to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    prediction = dit(noisy, t, text.tokens, text.mask, text.pooled)
    return object_weighted_mse(prediction.float(), diffusion_target(scheduler, latents, noise, t), latents,
                               object_weight)


def flow_levels(count: int, generator, shift: float) -> torch.Tensor:
    """Noise levels s in (0, 1) to train at: logit-normal, shifted toward the noise by `shift`;
    `generator` a torch.Generator or a ClipDraws of `count` clips (one level each)."""
    u = torch.sigmoid(as_draws(generator, count).randn((count,), "level"))
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(dit, schedule: dict, latents: torch.Tensor, text, generator,
              object_weight: float = 0.0, levels: tuple[float, float] = (0.0, 1.0),
              condition: dict | None = None) -> torch.Tensor:
    """The flow-matching loss of one batch (`schedule`: the flow scheduler config, its flow_shift and
    num_train_timesteps); all randomness from `generator` (as diffusion_loss's). `levels`: the span of noise levels
    trained (one expert's of two: the levels drawn, squeezed into it). `condition`: what an
    image-to-video DiT takes besides (soragen.diffusion.image_condition): "still_frames", leading
    latent frames given clean at timestep 0 and left out of the loss (Wan 2.2 TI2V-5B); "channels",
    input channels after the noisy latent; "image", an image encoder's tokens."""
    device = latents.device
    noise = as_draws(generator, latents.shape[0]).randn(latents.shape, "noise").to(device)
    s = flow_levels(latents.shape[0], generator, float(schedule.get("flow_shift", 1.0))).to(device)
    if levels != (0.0, 1.0):
        s = levels[0] + (levels[1] - levels[0]) * s
    level = s.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1 - level) * latents + level * noise
    t = s * schedule.get("num_train_timesteps", 1000)
    if condition:
        return _conditioned_loss(dit, noisy, t, text, noise - latents, latents, object_weight, condition)
    prediction = dit(noisy, t, text.tokens, text.mask, text.pooled)
    return object_weighted_mse(prediction.float(), noise - latents, latents, object_weight)


def _conditioned_loss(dit, noisy, t, text, target, latents, object_weight: float, condition: dict) -> torch.Tensor:
    still = condition.get("still_frames", 0)
    if still:
        noisy = torch.cat([latents[:, :, :still], noisy[:, :, still:]], dim=2)
    if condition.get("channels") is not None:
        noisy = torch.cat([noisy, condition["channels"].to(noisy.dtype)], dim=1)
    prediction = dit(noisy, t, text.tokens, text.mask, text.pooled, image=condition.get("image"), still_frames=still)
    return object_weighted_mse(prediction.float()[:, :, still:], target[:, :, still:], latents[:, :, still:],
                               object_weight)


def detail_mask(video: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(B, C, T, H, W) in [-1, 1] -> (B, 1, T, H, W), 1 where a pixel stands out from both its row's
    and its column's median colour: small objects on a plain or gradient background (a sky is
    constant along its rows). With a plain mean they are a few percent of the loss, and the VAE
    learns to drop them; a frame-wide median would also flag the ends of a gradient."""
    rows = video.median(dim=4, keepdim=True).values
    cols = video.median(dim=3, keepdim=True).values
    off = torch.minimum((video - rows).abs(), (video - cols).abs())
    return (off.amax(dim=1, keepdim=True) > threshold).float()


def object_weighted_mse(pred: torch.Tensor, target: torch.Tensor, latents: torch.Tensor,
                        object_weight: float) -> torch.Tensor:
    """MSE with the latent cells of small objects (`detail_mask` of the clean latents) weighted
    1 + object_weight. An object is a few percent of a video's cells, and what tells a square from a
    circle is a few of those: under a plain mean the DiT can ignore the shape word at almost no cost.
    Each clip's weights are normalised within it and the batch's loss is the mean of its clips', so a
    batch split in parts has the mean of the parts' losses."""
    if not object_weight:
        return F.mse_loss(pred, target)
    weight = 1.0 + object_weight * detail_mask(latents, LATENT_DETAIL_THRESHOLD)
    return weighted_mean(weight, (pred - target) ** 2)


def weighted_mean(weight: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """The mean over clips (dim 0) of each clip's weighted mean of `error` (`weight` broadcast to it)."""
    weight = weight.expand_as(error).flatten(1)
    return ((weight * error.flatten(1)).sum(1) / weight.sum(1)).mean()


class VAEWithLoss(torch.nn.Module):
    """The VAE's training objective as one module, so DDP can wrap it: reconstruction (L1 + MSE,
    small objects weighted up) of the posterior's mean or a sample of it, plus a KL term towards N(0, I)."""

    def __init__(self, model, kl_weight: float, sample_posterior: bool = False, detail_weight: float = 0.0,
                 decoder_only: bool = False):
        super().__init__()
        self.vae, self.kl_weight, self.sample_posterior = model, kl_weight, sample_posterior
        self.detail_weight = detail_weight
        if decoder_only:  # the latents stay exactly what a DiT was trained on; with no trainable input,
            model.encoder.requires_grad_(False)  # encoding builds no autograd graph either
            model.quant_conv.requires_grad_(False)

    def forward(self, video: torch.Tensor, noise_generator) -> torch.Tensor:
        """The mean of the clips' losses; a posterior sample from `noise_generator` (a ClipDraws: each
        clip's own; or a torch.Generator)."""
        posterior = self.vae.encode(pad_frames(video)).latent_dist  # the causal VAE takes 1 + 4k frames
        z = posterior.mean
        if self.sample_posterior:  # at init the posterior std is ~1: so noisy that small objects never come back
            noise = as_draws(noise_generator, z.shape[0]).randn(z.shape, "posterior")
            z = z + posterior.std * noise.to(video.device)
        recon = self.vae.decode(z).sample.float()[:, :, : video.shape[2]]
        weight = 1.0 + self.detail_weight * detail_mask(video)
        error = (recon - video).abs() + (recon - video) ** 2
        reconstruction = weighted_mean(weight, error)
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        return reconstruction + self.kl_weight * kl
