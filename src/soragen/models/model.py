"""A loaded model: what generation and training take from a model folder, whatever its family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from soragen.core.config import DiTConfig, ImageEncoderSpec, SamplingDefaults, TextEncoderSpec, VideoDefaults
from soragen.core.errors import SoragenError


@dataclass
class Model:
    dit: "VideoDiT"  # noqa: F821
    vae: "VideoVAE"  # noqa: F821
    text_spec: TextEncoderSpec
    video: VideoDefaults
    scheduler_config: dict
    sampling: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)
    path: Path | None = None
    family: "Family | None" = None  # noqa: F821  (soragen.families.registry); None: soragen's own
    # A second expert (Wan 2.2 A14B): `dit` denoises the steps at or above the `boundary` timestep,
    # `dit_2` the ones below it.
    dit_2: "VideoDiT | None" = None  # noqa: F821
    boundary: float | None = None
    image_inputs: int = 0  # images a video can start from: 0 (text alone), 1 (a first frame), 2 (and a last)
    image_encoder: ImageEncoderSpec | None = None  # whose tokens the DiT's image cross-attention takes

    @property
    def experts(self) -> list:
        return [self.dit] if self.dit_2 is None else [self.dit, self.dit_2]

    @property
    def image_channels(self) -> bool:
        """Whether the DiT takes its images as input channels (Wan's image-to-video: a mask and the
        images' latent after the noisy latent), not as a first latent frame (Wan 2.2 TI2V-5B)."""
        return self.dit.config.image_channels


def check_latent_channels(config: DiTConfig, vae, where) -> None:
    """The DiT predicts the VAE's latent channels and takes them (or, for image-to-video by channels,
    them, then a mask of a channel per frame of a latent frame's, then the images' latent)."""
    latent = vae.latent_channels
    if config.predicted_channels != latent or config.in_channels not in (latent, 2 * latent + vae.temporal_factor):
        takes = (f"takes {config.in_channels} and predicts {config.predicted_channels}" if config.out_channels
                 else f"expects {config.in_channels}")
        raise SoragenError(f"{where}: the VAE has {latent} latent channels, the DiT {takes}")
