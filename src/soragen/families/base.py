"""What a model family is: the questions soragen asks of each (soragen.families.registry says how
they are found)."""

from __future__ import annotations

from pathlib import Path

import torch

from soragen.core.config import DiTConfig, TextEncoderSpec
from soragen.core.errors import SoragenError


class Family:
    """One model family. Subclass it, override what differs, and register an instance."""

    name: str = ""

    def recognises(self, folder: Path) -> bool:
        """Whether `folder`, a folder in another tool's layout (no soragen.json), is one of ours to load."""
        return False

    def image_inputs(self, folder: Path) -> int:
        """How many images a video of a recognised folder's model can start (and end) from: 0 (text
        alone), 1 (a first frame), 2 (a first and a last)."""
        return 0

    def load(self, folder: Path, source: str, dtype: torch.dtype):
        """The Model (soragen.models.model) in a folder this family recognises; `source` is how the
        user named it (a folder or a hub id): the text encoder may be named by it."""
        raise SoragenError(f"{folder}: the {self.name} family reads only soragen model folders")

    def configs(self, folder: Path) -> tuple[DiTConfig, TextEncoderSpec]:
        """The DiT's config and the text encoder of a recognised folder, without reading any weight
        (what `train --dry-run` plans with)."""
        raise SoragenError(f"{folder}: the {self.name} family reads only soragen model folders")

    def lora_names(self, depth: int) -> dict[str, tuple[str, int, int]]:
        """The names other tools give the DiT's linears in a LoRA file: their name -> (our linear,
        which part of its output rows, of how many equal parts)."""
        return {}

    def lora_targets(self, config: DiTConfig) -> dict[str, tuple[str, int, int, str]]:
        """The parameters an adapter file may change, by the names other tools give them: their
        name -> (our tensor, which part of its rows, of how many equal parts, how its layout maps
        onto ours: "copy", "cat" or another the family's `lora_delta` knows)."""
        return {}

    def lora_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """A LoRA file's tensors as (lora_A / lora_B pairs, lora_B biases and kohya-style alphas in
        the layout `lora_names` names; whole-tensor deltas: a parameter name of `lora_targets` ->
        (the file's key, the delta)); other tools' layouts converted. Raises on a layout it cannot read."""
        return tensors, {}

    def lora_delta(self, how: str, delta: torch.Tensor) -> torch.Tensor:
        """A whole-tensor delta in the other tool's layout, as one in ours ("copy" and "cat" parts are as they are)."""
        return delta
