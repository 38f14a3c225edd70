"""The 3D causal VAE: diffusers' `AutoencoderKLWan` behind a small adapter, with soragen's own
decoder (soragen.models.wan_decoder, the same bits) where a video is only decoded.

Layout: videos are (B, 3, T, H, W) in [-1, 1]; latents are (B, C, T', H', W'), normalised per
channel with the mean and std stored in the VAE config. Causality means 1 + k*s frames map to
1 + k latent frames (s = temporal factor); the adapter pads and trims around that rule so any
frame count works. Decoding runs one latent frame at a time through Wan's causal cache and turns
each chunk into uint8 at once, so working memory does not grow with the frame count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from soragen.core.errors import SoragenError
from soragen.core.weights import load_into, weight_files
from soragen.models.wan_decoder import DECODER_DEFAULTS, WanDecoder, unpatchify
from soragen.models.wan_decoder import supports as decoder_supports

# The Wan encoder reads the first frame alone, then chunks of 4 frames.
ENCODER_CHUNK = 4


def pad_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, 1 + 4k, H, W): repeat the last frame up to the encoder's chunking."""
    T = video.shape[2]
    target = 1 + ENCODER_CHUNK * math.ceil((T - 1) / ENCODER_CHUNK)
    if target == T:
        return video
    return torch.cat([video, video[:, :, -1:].expand(-1, -1, target - T, -1, -1)], dim=2)


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu().numpy()


def uint8_to_frames(frames: np.ndarray) -> torch.Tensor:
    """(B, T, H, W, 3) or (T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    if x.ndim == 4:
        x = x[None]
    return x.permute(0, 4, 1, 2, 3).contiguous()


class VideoVAE:
    """The VAE as soragen uses it: normalised latents in, uint8 frames out, and back.

    Made from diffusers' `model`, or, for decoding alone (what generating a video needs), from
    soragen's `decoder` (soragen.models.wan_decoder: the same bits, no diffusers import) with
    `load` making diffusers' model the first time something else is asked of it (encoding an
    image or clips, a tiled decode, training, saving)."""

    def __init__(self, model=None, decoder=None, config: dict | None = None, load=None, files: list[Path] = ()):
        self._model, self.decoder, self._load, self.files = model, decoder, load, list(files)
        # a config.json that names every setting (as saved ones do) is what diffusers' model holds
        self.complete = model is None and set(WAN_VAE_KEYS) <= set(config)
        config = dict(model.config) if model is not None else {**DECODER_DEFAULTS, **config}
        self.config = config
        if model is not None:
            model.eval().requires_grad_(False)
        # Wan 2.2's VAE first folds each patch x patch square of RGB pixels into 12 channels
        self.patch = config.get("patch_size") or 1
        self.temporal_factor = 2 ** sum(bool(d) for d in config["temperal_downsample"])
        self.spatial_factor = 2 ** (len(config["dim_mult"]) - 1) * self.patch
        self.latent_channels = config["z_dim"]
        self.mean = torch.tensor(config["latents_mean"], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config["latents_std"], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.placed: tuple = (None, None)  # the device and dtype a model loaded later is given
        self.fast = False

    @property
    def model(self):
        """diffusers' AutoencoderKLWan, made now if the VAE was loaded for decoding alone (it then
        decodes too, with the same bits: one copy of the decoder's weights)."""
        if self._model is None:
            self._model = self._load().eval().requires_grad_(False)
            self._place(self._model)
            self.decoder = None
        return self._model

    def parts(self) -> list[torch.nn.Module]:
        """The modules made so far (the decoder, diffusers' model, or both)."""
        return [m for m in (self.decoder, self._model) if m is not None]

    def use_fast_paths(self, on: bool = True) -> None:
        """soragen.models.fast_paths on every part, now and when one is made later (or off: the plain modules)."""
        from soragen.models import fast_paths
        self.fast = on
        for part in self.parts():
            if on:
                fast_paths.install(part)
            else:
                fast_paths.uninstall(part)

    @property
    def described_by_files(self) -> bool:
        """Whether diffusers' model is not made and the files say all it would hold: every weight, and
        a config naming every setting."""
        return self._model is None and self.complete and bool(self.files)

    def weights_and_config(self) -> tuple[list[tuple[str, torch.Tensor]], dict]:
        """Every weight by name (sorted) and the config as diffusers' model holds it: what identifies
        the VAE (the latent cache's key). Read from the files where diffusers' model is not made."""
        if self.described_by_files:
            from importlib.metadata import version

            from soragen.core.weights import read_safetensors
            config = {**{k: self.config[k] for k in WAN_VAE_KEYS}, "_class_name": "AutoencoderKLWan",
                      "_diffusers_version": version("diffusers")}
            return sorted(read_safetensors(self.files).items()), config
        return sorted(self.model.state_dict().items()), dict(self.model.config)

    def _place(self, part: torch.nn.Module) -> None:
        torch.nn.Module.to(part, *self.placed)
        if self.fast:
            from soragen.models import fast_paths
            fast_paths.install(part)

    # ---- the frame-count rule --------------------------------------------------------------------
    def latent_frames(self, frames: int) -> int:
        """Latent frames that decode to at least `frames` frames: 1 + ceil((frames - 1) / s)."""
        return 1 + math.ceil((frames - 1) / self.temporal_factor)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') for a video of the given size (H and W multiples of the spatial factor)."""
        f = self.spatial_factor
        return (self.latent_channels, self.latent_frames(frames), height // f, width // f)

    def to(self, device=None, dtype=None) -> "VideoVAE":
        """Move or cast the VAE. torch's own Module.to: diffusers' override warns about modules to
        keep in float32, and the Wan VAE has none."""
        self.placed = (device or self.placed[0], dtype or self.placed[1])
        for part in self.parts():
            torch.nn.Module.to(part, device, dtype)
        return self

    @property
    def device(self):
        return next(self.parts()[0].parameters()).device

    @property
    def dtype(self):
        return next(self.parts()[0].parameters()).dtype

    # ---- encode ----------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               grad: bool = False) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latent (B, C, 1 + ceil((T-1)/s), H/f, W/f).
        Frames are padded at the end by repeating the last one up to the next 1 + 4k."""
        T = video.shape[2]
        with torch.set_grad_enabled(grad):
            dist = self.model.encode(pad_frames(video).to(self.device, self.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
        z = z[:, :, : self.latent_frames(T)]
        return (z.float() - self.mean.to(z.device)) / self.std.to(z.device)

    # ---- decode ----------------------------------------------------------------------------------
    def denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.float() * self.std.to(latent.device) + self.mean.to(latent.device)

    # Above this many pixels a side (Wan's 480p and more) decoding goes tile by tile (diffusers' tiled
    # decode, overlapping tiles blended): the memory of a decode then grows with the video, not its area.
    TILE_ABOVE = 256

    @torch.no_grad()
    def decode_uint8(self, latent: torch.Tensor, frames: int | None = None) -> np.ndarray:
        """Normalised latent (B, C, T', H', W') -> (B, frames, H, W, 3) uint8, one latent frame at
        a time through the causal cache; `frames` trims the 1 + (T'-1)*s decoded frames."""
        side = max(latent.shape[-2:]) * self.spatial_factor
        if side <= self.TILE_ABOVE and self.decoder is not None:
            z = self.denormalise(latent).to(self.device, self.dtype)
            video = np.concatenate([frames_to_uint8(chunk) for chunk in self.decoder.decode_frame_by_frame(z)], axis=1)
            return video[:, :frames] if frames is not None else video
        model = self.model
        if side > self.TILE_ABOVE:
            tile, stride = self.TILE_ABOVE, self.TILE_ABOVE * 3 // 4  # a quarter of each tile overlaps the next
            model.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                tile_sample_stride_height=stride, tile_sample_stride_width=stride)
            video = frames_to_uint8(model.decode(self.denormalise(latent).to(self.device, self.dtype)).sample)
            return video[:, :frames] if frames is not None else video
        z = model.post_quant_conv(self.denormalise(latent).to(self.device, self.dtype))
        chunks = []
        model.clear_cache()
        for i in range(z.shape[2]):
            model._conv_idx = [0]
            out = model.decoder(z[:, :, i:i + 1], feat_cache=model._feat_map, feat_idx=model._conv_idx,
                                first_chunk=(i == 0))
            chunks.append(frames_to_uint8(self.unpatchify(out)))
        model.clear_cache()
        video = np.concatenate(chunks, axis=1)
        return video[:, :frames] if frames is not None else video

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's output as RGB pixels: a patchified VAE's channels unfolded into its patches."""
        return unpatchify(out, self.patch)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> (B, 3, T, H, W) in [-1, 1], in one pass (for training and tests)."""
        return self.model.decode(self.denormalise(latent).to(self.device, self.dtype)).sample


# AutoencoderKLWan's settings, as its __init__ names them
WAN_VAE_KEYS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual", "in_channels",
                "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial")


def new_vae(config: dict) -> VideoVAE:
    from diffusers import AutoencoderKLWan
    return VideoVAE(AutoencoderKLWan(**config))


# What a VAE config.json may say, checked before AutoencoderKLWan is built from it.
VAE_LIMITS = {
    "base_dim": (int, dict(low=1, high=1024)),
    "decoder_base_dim": (int, dict(low=1, high=1024)),
    "z_dim": (int, dict(low=1, high=256)),
    "dim_mult": (tuple[int, ...], dict(low=1, high=16)),
    "num_res_blocks": (int, dict(low=1, high=16)),
    "attn_scales": (tuple[float, ...], {}),
    "temperal_downsample": (tuple[bool, ...], {}),
    "dropout": (float, dict(low=0, high=1)),
    "latents_mean": (tuple[float, ...], {}),
    "latents_std": (tuple[float, ...], dict(above=0)),
    "is_residual": (bool, {}),
    "in_channels": (int, dict(low=1, high=256)),
    "out_channels": (int, dict(low=1, high=256)),
    "patch_size": (int, dict(low=1, high=8)),
}


def check_vae_config(config) -> None:
    """ValueError naming the field if AutoencoderKLWan should not be built from `config`."""
    from soragen.core.config import check_keys
    if not isinstance(config, dict):
        raise ValueError(f"must be a JSON object, got {type(config).__name__}")
    check_keys(config, VAE_LIMITS)
    dims = config.get("dim_mult", [1, 2, 4, 4])
    if not 1 <= len(dims) <= 8:
        raise ValueError(f"dim_mult must have 1 to 8 entries, got {len(dims)}")
    downsample = config.get("temperal_downsample", [False, True, True])
    if len(downsample) != len(dims) - 1:
        raise ValueError(f"temperal_downsample must have len(dim_mult) - 1 = {len(dims) - 1} entries, "
                         f"got {len(downsample)}")
    patch = config.get("patch_size") or 1
    for key in ("in_channels", "out_channels"):
        if config.get(key, 3) != 3 * patch * patch:
            raise ValueError(f"{key} must be 3 x patch_size^2 = {3 * patch * patch} (RGB in patches of {patch}), "
                             f"got {config.get(key, 3)}")
    z_dim = config.get("z_dim", 16)
    for key in ("latents_mean", "latents_std"):
        if key in config and len(config[key]) != z_dim:
            raise ValueError(f"{key} must have z_dim = {z_dim} entries, got {len(config[key])}")


def load_vae(source: str | Path) -> VideoVAE:
    """A VAE folder in diffusers layout (config.json + safetensors), a folder holding one under
    `vae/` (a Wan pipeline repo), or a hub id of either. The config is checked, the VAE built on
    the meta device and its weights checked against it by the files' headers before any is read."""
    folder = Path(source)
    if not folder.exists():
        if str(source).count("/") != 1:
            raise SoragenError(f"VAE {source} not found (neither a folder nor a hub id)")
        from soragen.core.hub import fetch
        folder = fetch(str(source), ["config.json", "*.safetensors", "*.safetensors.index.json", "vae/*"], "VAE")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not config_file.exists():
        raise SoragenError(f"VAE folder {folder} has no config.json")
    from soragen.core.jsonfile import read_json
    config = read_json(config_file)
    if isinstance(config, dict) and config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise SoragenError(f"{folder} holds a {config['_class_name']}; soragen reads AutoencoderKLWan VAEs")
    try:
        check_vae_config(config)
    except (TypeError, ValueError) as err:
        raise SoragenError(f"{config_file} is not a valid AutoencoderKLWan config: {err}") from err
    files = weight_files(folder, "VAE")
    if decoder_supports(config) and {"latents_mean", "latents_std"} <= set(config):
        decoder = WanDecoder.from_files(config, files, f"VAE ({config_file})")
        return VideoVAE(decoder=decoder, config=config, load=lambda: _diffusers_vae(config, files, config_file),
                        files=files)
    return VideoVAE(_diffusers_vae(config, files, config_file))


def _diffusers_vae(config: dict, files: list[Path], config_file: Path):
    """diffusers' AutoencoderKLWan from a checked config, built on the meta device and its weights
    checked against it by the files' headers before any is read."""
    from diffusers import AutoencoderKLWan
    try:
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(config)
    except (TypeError, ValueError) as err:
        raise SoragenError(f"{config_file} is not a valid AutoencoderKLWan config: {err}") from err
    load_into(model, files, f"VAE ({config_file})")
    return model


def save_vae(vae: VideoVAE, folder: Path) -> None:
    """diffusers layout, so `AutoencoderKLWan.from_pretrained(folder)` reads it too."""
    from soragen.core.weights import save_module, save_tensors
    folder.mkdir(parents=True, exist_ok=True)
    if vae.described_by_files:  # what diffusers would write, from the files
        weights, config = vae.weights_and_config()
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_tensors(dict(weights), folder / "diffusion_pytorch_model.safetensors", "VAE",
                     vae.placed[1] or torch.float32)  # the dtype diffusers' model would have
        return
    vae.model.save_config(folder)
    save_module(vae.model, folder / "diffusion_pytorch_model.safetensors", "VAE")
