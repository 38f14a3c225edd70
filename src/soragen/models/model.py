"""A loaded model: what generation and training take from a model folder, whatever its family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from soragen.core.config import SamplingDefaults, TextEncoderSpec, VideoDefaults


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
    image_inputs: int = 0  # images a video can start from: 0 (text alone), 1 (a first frame)

    @property
    def experts(self) -> list:
        return [self.dit] if self.dit_2 is None else [self.dit, self.dit_2]
