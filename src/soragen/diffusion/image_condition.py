"""What an image-to-video DiT of Wan's takes besides the noisy latent, in generation and training
alike: the given frames (the first, and for first-last-frame the last) in a video of black between
them, whose VAE latent follows the noisy latent as input channels, after a mask that says which
latent cells are given (a channel per frame of a latent frame's; the first frame counts as a whole
latent frame's, as the causal VAE encodes it alone)."""

from __future__ import annotations

import numpy as np
import torch


def known_frames(images: int, frames: int) -> list[int]:
    """The frames `images` given images are: the first, then the last."""
    return [0, frames - 1][:images]


def condition_video(images: list[np.ndarray], frames: int, length: int | None = None) -> np.ndarray:
    """(length, H, W, 3) float32 pixel values (length: at least frames, default frames): the images at
    their frames of a `frames`-frame video, 127.5 (0 in the VAE's -1..1, as diffusers' zeros)
    everywhere else."""
    height, width = images[0].shape[:2]
    video = np.full((length or frames, height, width, 3), 127.5, dtype=np.float32)
    for index, picture in zip(known_frames(len(images), frames), images):
        video[index] = picture
    return video


def frame_mask(images: int, frames: int, factor: int, latent_size: tuple[int, int],
               length: int | None = None) -> torch.Tensor:
    """(factor, T', H', W'): 1 for the cells of given frames of a `frames`-frame video, 0 elsewhere;
    `length` (1 + k x factor, at least frames): the frames the latent covers."""
    mask = torch.zeros((length or frames) + factor - 1, *latent_size)
    for index in known_frames(images, frames):
        mask[index if index == 0 else index + factor - 1] = 1
    mask[:factor] = mask[0]
    return mask.view(-1, factor, *latent_size).transpose(0, 1)


def condition_channels(vae, images: list[np.ndarray], frames: int) -> torch.Tensor:
    """(1, factor + C, T', H', W'): the mask, then the VAE's normalised latent of condition_video, over
    the frames the VAE encodes (any count made 1 + k x its temporal factor, as the sampled latent is)."""
    from soragen.models.vae import uint8_to_frames
    length = 1 + (vae.latent_frames(frames) - 1) * vae.temporal_factor
    latent = vae.encode(uint8_to_frames(condition_video(images, frames, length)[None])).float().cpu()
    mask = frame_mask(len(images), frames, vae.temporal_factor, tuple(latent.shape[-2:]), length)
    return torch.cat([mask[None], latent], dim=1)
