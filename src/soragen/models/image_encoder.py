"""The frozen image encoder of an image-to-video model: Wan 2.1 I2V's CLIP ViT-H.

An image (the video's first frame, and for first-last-frame its last) becomes the CLIP vision
tower's penultimate hidden states, 257 tokens of each (the class token and 16 x 16 patches): what
the DiT's image cross-attention attends to. The resizing, cropping and normalisation are the
model folder's own image processor (transformers' CLIPImageProcessor), as diffusers' pipeline runs
them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from soragen.core.config import ImageEncoderSpec
from soragen.core.errors import SoragenError


class ImageEncoder:
    def __init__(self, spec: ImageEncoderSpec, device: str | torch.device = "cpu"):
        import transformers
        from transformers.utils import logging as hf_logging

        from soragen.models.text import check_encoder_folder
        hf_logging.set_verbosity_error()  # our progress display is the CLI's
        hf_logging.disable_progress_bar()
        self.spec, root = spec, Path(spec.source)
        if root.exists():
            if not (root / spec.subfolder / "config.json").exists():
                raise SoragenError(f"image encoder folder {root / spec.subfolder} has no config.json")
            check_encoder_folder(root, spec.subfolder, spec.processor_subfolder)
        # transformers' default CLIP processor needs torchvision; without it, the PIL one (what
        # transformers itself falls back to, saying so on the terminal)
        processor = "CLIPImageProcessor" if importlib.util.find_spec("torchvision") else "CLIPImageProcessorPil"
        try:
            self.processor = getattr(transformers, processor).from_pretrained(
                spec.source, subfolder=spec.processor_subfolder, trust_remote_code=False)
            self.model, info = transformers.CLIPVisionModel.from_pretrained(
                spec.source, subfolder=spec.subfolder, use_safetensors=True, output_loading_info=True,
                trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SoragenError(f"cannot load image encoder {spec.source!r}: {str(err).splitlines()[0]}") from err
        absent = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        if absent:
            raise SoragenError(f"image encoder {spec.source!r}: its weights do not fit its config: {len(absent)} "
                               f"tensors missing or of another shape (e.g. {absent[0]})")
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def to(self, device) -> "ImageEncoder":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images (H, W, 3) uint8 -> (1, images x 257, D) float32: each one's tokens, in order."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        hidden = self.model(pixel_values=pixels.to(self.model.dtype), output_hidden_states=True).hidden_states[-2]
        return hidden.float().reshape(1, -1, hidden.shape[-1])
