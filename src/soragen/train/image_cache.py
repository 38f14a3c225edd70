"""An image-to-video model's training examples: for each cached window of a clip (the same windows
as soragen.train.latent_cache's, in the same order), what the DiT takes besides the noisy latent
when the window's first frame (and for first-last-frame its last) is the condition: the mask and
the latent of those frames with black between, and where the model has one, its image encoder's
tokens of them. Cached like the latents, keyed by the clip's content and every setting."""

from __future__ import annotations

from pathlib import Path

import torch

from soragen.core.config import TrainConfig
from soragen.core.progress import Progress
from soragen.models.vae import VideoVAE
from soragen.train.data import Clip, file_hash
from soragen.train.latent_cache import LatentSamples, _atomic_save, _digest, _read_cached, clip_windows, \
    vae_fingerprint


def add_image_conditions(samples: LatentSamples, clips: list[Clip], vae: VideoVAE, image_encoder, images: int,
                         cfg: TrainConfig, cache_dir: Path | None, windows: int, progress: Progress | None) -> None:
    """Fill samples.channels (and samples.image_tokens with an image encoder) for every clip."""
    from safetensors.torch import save_file

    from soragen.diffusion.image_condition import condition_channels
    encoder = image_encoder.spec.source if image_encoder is not None else None
    settings = _digest("image-condition", images, cfg.frames, cfg.fps, cfg.height, cfg.width, windows,
                       vae_fingerprint(vae), encoder)
    if cache_dir:
        (cache_dir / "conditions").mkdir(parents=True, exist_ok=True)
    channels, tokens, bad = [], [], []
    shapes = {"channels": (None, vae.temporal_factor + vae.latent_channels, *samples.latents[0].shape[2:])}
    if image_encoder is not None:
        shapes["tokens"] = (None, None, image_encoder.dim)
    for n, clip in enumerate(clips):
        file = cache_dir / "conditions" / f"{file_hash(clip.path)}-{settings}.safetensors" if cache_dir else None
        cached = _read_cached(file, shapes, bad)
        if cached is None:
            crops = clip_windows(clip, cfg, windows)
            given = [[crop[0], crop[-1]][:images] for crop in crops]
            cached = {"channels": torch.cat([condition_channels(vae, frames, cfg.frames) for frames in given])}
            if image_encoder is not None:
                cached["tokens"] = torch.cat([image_encoder.encode(frames) for frames in given]).contiguous()
            if file:
                _atomic_save(save_file, cached, file)
        channels.append(cached["channels"])
        tokens.append(cached.get("tokens"))
        if progress:
            progress("conditions", n + 1, len(clips))
    samples.channels = channels
    samples.image_tokens = tokens if image_encoder is not None else None
