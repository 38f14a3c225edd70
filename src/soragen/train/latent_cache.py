"""The DiT's training examples: per clip, the VAE latents of a few windows and its caption's text
embedding, computed once and kept in a cache of safetensors files, keyed by each clip's content
hash and the settings (frames, fps, size, windows, the VAE's weights; the encoder and length). A
cache entry that does not read back whole is a miss: it is recomputed and replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from soragen.core.progress import MESSAGE, Progress

import numpy as np
import torch
import torch.nn.functional as F

from soragen.core.atomic import atomic_path
from soragen.core.config import TrainConfig
from soragen.train.data import Clip, file_hash
from soragen.models.vae import VideoVAE, uint8_to_frames



class LatentSamples:
    """Training examples for the DiT: per clip, one or more VAE latents of random windows plus its
    caption's text embedding, held in memory; computed once and kept in a safetensors cache."""

    def __init__(self, latents: list[torch.Tensor], tokens: list[torch.Tensor], pooled: list[torch.Tensor],
                 empty_tokens: torch.Tensor, empty_pooled: torch.Tensor):
        self.latents, self.tokens, self.pooled = latents, tokens, pooled  # latents[i]: (K, C, T, H, W)
        self.empty_tokens, self.empty_pooled = empty_tokens, empty_pooled
        # an image-to-video model's, per clip and window (soragen.train.image_cache): its input channels
        # after the noisy latent (K, tf + C, T, H, W), and its image encoder's tokens (K, M, D)
        self.channels: list[torch.Tensor] | None = None
        self.image_tokens: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, items: list[int], draws, caption_dropout: float):
        """(latents, text, condition): a window of each clip, its caption's embedding (or the empty
        one's), and of an image-to-video model the window's condition (soragen.diffusion.objectives);
        the window and the dropout drawn from the clip's own generators (`draws`, a
        soragen.diffusion.draws.ClipDraws of the items)."""
        from soragen.models.text import TextEmbedding
        latents, tokens, pooled, condition = [], [], [], {}
        for n, i in enumerate(items):
            k = int(torch.randint(0, self.latents[i].shape[0], (1,), generator=draws.generator(n, "window")))
            latents.append(self.latents[i][k])
            for key, per_clip in (("channels", self.channels), ("image", self.image_tokens)):
                if per_clip is not None:
                    condition.setdefault(key, []).append(per_clip[i][k])
            drop = float(torch.rand((), generator=draws.generator(n, "caption"))) < caption_dropout
            tokens.append(self.empty_tokens if drop else self.tokens[i])
            pooled.append(self.empty_pooled if drop else self.pooled[i])
        length = max(t.shape[0] for t in tokens)
        mask = torch.stack([torch.arange(length) < t.shape[0] for t in tokens])
        tokens = torch.stack([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in tokens])
        return (torch.stack(latents), TextEmbedding(tokens, mask, torch.stack(pooled)),
                {key: torch.stack(parts) for key, parts in condition.items()})


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def vae_fingerprint(vae: VideoVAE) -> str:
    h = hashlib.sha256()
    weights, config = vae.weights_and_config()
    for name, tensor in weights:
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def window_starts(clip: Clip, frames: int, fps: float, windows: int) -> list[int]:
    """Up to `windows` evenly spread start frames of the clip's possible crops."""
    from soragen.train.data import frames_needed
    last = max(0, clip.info.frames - frames_needed(frames, fps, clip.info.fps))
    count = min(windows, last + 1)
    return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})


def clip_windows(clip: Clip, cfg: TrainConfig, windows: int) -> np.ndarray:
    """(windows, frames, height, width, 3) uint8: the clip's evenly spread windows at cfg's fps and size."""
    from soragen.train.data import resize_and_crop
    from soragen.io.video import read_video
    frames, _ = read_video(clip.path)
    step = clip.info.fps / cfg.fps
    crops = []
    for start in window_starts(clip, cfg.frames, cfg.fps, windows):
        idx = [min(len(frames) - 1, int(math.floor(start + k * step + 0.5))) for k in range(cfg.frames)]
        crops.append(resize_and_crop(frames[idx], cfg.height, cfg.width))
    return np.stack(crops)


class _Encoder:
    """Clips' windows through the VAE in batches of about BATCH windows (much faster than clip by
    clip), each result stored in `latents` and in its cache file."""

    BATCH = 16

    def __init__(self, vae: VideoVAE, latents: list):
        self.vae, self.latents, self.pending = vae, latents, []

    def add(self, index: int, crops: np.ndarray, cache_file: Path | None) -> None:
        self.pending.append((index, crops, cache_file))
        if sum(len(c) for _, c, _ in self.pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file
        if not self.pending:
            return
        sizes = [len(crops) for _, crops, _ in self.pending]
        lat = self.vae.encode(uint8_to_frames(np.concatenate([crops for _, crops, _ in self.pending]))).cpu()
        for (i, _, cache_file), part in zip(self.pending, lat.split(sizes)):
            self.latents[i] = part.contiguous()
            if cache_file:
                _atomic_save(save_file, {"latents": self.latents[i]}, cache_file)
        self.pending.clear()


def build_samples(clips: list[Clip], vae: VideoVAE, text_encoder, cfg: TrainConfig, cache_dir: Path | None,
                  windows: int, progress: Progress | None) -> LatentSamples:
    """Every clip's latents and caption embedding, from the cache where it holds them whole."""
    from safetensors.torch import save_file
    settings = _digest(cfg.frames, cfg.fps, cfg.height, cfg.width, windows, vae_fingerprint(vae))
    text_settings = _digest(text_encoder.spec.source, text_encoder.spec.max_length)
    if cache_dir:
        (cache_dir / "latents").mkdir(parents=True, exist_ok=True)
        (cache_dir / "text").mkdir(parents=True, exist_ok=True)
    latents: list[torch.Tensor | None] = [None] * len(clips)
    tokens, pooled, hits, bad = [], [], 0, []
    encoder = _Encoder(vae, latents)
    latent_shape = (None, vae.latent_channels, vae.latent_frames(cfg.frames),  # any number of windows
                    cfg.height // vae.spatial_factor, cfg.width // vae.spatial_factor)
    text_shapes = {"tokens": (None, text_encoder.dim), "pooled": (text_encoder.dim,)}
    for n, clip in enumerate(clips):
        lat_file = cache_dir / "latents" / f"{file_hash(clip.path)}-{settings}.safetensors" if cache_dir else None
        text_file = cache_dir / "text" / f"{_digest(clip.caption, text_settings)}.safetensors" if cache_dir else None
        cached = _read_cached(lat_file, {"latents": latent_shape}, bad)
        if cached is not None:
            latents[n], hits = cached["latents"], hits + 1
        else:
            encoder.add(n, clip_windows(clip, cfg, windows), lat_file)
        emb = _read_cached(text_file, text_shapes, bad)
        if emb is None:
            e = text_encoder.encode([clip.caption])
            emb = {"tokens": e.tokens[0].cpu().contiguous(), "pooled": e.pooled[0].cpu().contiguous()}
            if text_file:
                _atomic_save(save_file, emb, text_file)
        tokens.append(emb["tokens"])
        pooled.append(emb["pooled"])
        if progress:
            progress("cache", n + 1, len(clips))
    encoder.flush()
    if progress:
        progress(MESSAGE, 0, 0, f"latent cache: {hits} of {len(clips)} clips reused" + ("" if cache_dir else " (cache off)"))
        if bad:
            progress(MESSAGE, 0, 0, f"latent cache: {len(bad)} unreadable entr{'y' if len(bad) == 1 else 'ies'} "
                                f"recomputed and replaced (e.g. {bad[0]})")
    empty = text_encoder.encode([""])
    return LatentSamples(latents, tokens, pooled, empty.tokens[0].cpu(), empty.pooled[0].cpu())


def _read_cached(path: Path | None, shapes: dict[str, tuple], bad: list[Path]) -> dict | None:
    """A cache entry's tensors if the file holds them whole, with these shapes (None: any size) and
    finite; else None, and the file goes on `bad`. A cache entry cut short (a crash, a full disk)
    or damaged is a miss to recompute, never a reason to stop training."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if path is None or not path.is_file():
        return None
    try:  # copies, not maps of the file: a file cut short under a map would kill the process (SIGBUS)
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        tensors = {}
    for key, shape in shapes.items():
        t = tensors.get(key)
        if (t is None or not t.is_floating_point() or t.ndim != len(shape) or not torch.isfinite(t).all()
                or any(want is not None and got != want for got, want in zip(t.shape, shape))):
            bad.append(path)
            return None
    return tensors


def _atomic_save(save_file, tensors, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
