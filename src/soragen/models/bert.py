"""A BERT encoder (MiniLM, the built-in model's text encoder) in plain torch, and its tokenizer
through the `tokenizers` library alone.

transformers' BertModel gives the same numbers, but importing its modelling code pulls in the
library's loading machinery (DTensor, dynamo, sympy, scipy): seconds before the first prompt, for
a 22M-parameter encoder whose forward pass is the few lines below. `TextEncoder` uses this module
for the BERT folders it describes (`supports`) and transformers for every other encoder; the
tests hold the two to the same bits.

Reading order: embeddings (word + position + segment 0, LayerNorm), then per layer
self-attention with the padding mask, add & LayerNorm, a GELU MLP, add & LayerNorm.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from soragen.core.errors import SoragenError
from soragen.core.jsonfile import read_json


REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def supports(folder: Path, tokenizer_folder: Path) -> bool:
    """True for an encoder-only BERT with absolute positions and exact GELU, stored as safetensors
    with a `tokenizer.json`: what this module reproduces. Anything else goes to transformers."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), int) for k in REQUIRED):
        return False
    return (config.get("model_type") == "bert" and config["hidden_size"] % config["num_attention_heads"] == 0
            and config.get("position_embedding_type", "absolute") == "absolute"
            and config.get("hidden_act", "gelu") == "gelu"
            and not config.get("is_decoder") and not config.get("add_cross_attention")
            and (folder / "model.safetensors").is_file() and (tokenizer_folder / "tokenizer.json").is_file())


class Table(nn.Embedding):
    """An embedding table, always loaded from the file: no random values first (on the meta
    device, torch's normal_ imports its compiler, a second of a new process)."""

    def reset_parameters(self) -> None:
        pass


class Embeddings(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.word_embeddings = Table(c.vocab_size, c.hidden_size)
        self.position_embeddings = Table(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = Table(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x + self.position_embeddings(positions)[None])


class Dense(nn.Module):
    """A linear layer, then (optionally) a residual add and LayerNorm: BERT's post-norm sublayer ends."""

    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dense(x)
        return x if residual is None else self.LayerNorm(x + residual)


class SelfAttention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        return out.transpose(1, 2).reshape(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Dense(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class Layer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Dense(c.hidden_size, c.intermediate_size)
        self.output = Dense(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, mask), x)
        return self.output(F.gelu(self.intermediate(x)), x)


class Encoder(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


CONFIG_DEFAULTS = dict(type_vocab_size=2, layer_norm_eps=1e-12, max_position_embeddings=512)


class Bert(nn.Module):
    """BertModel's encoder, without the pooler (soragen pools by the mask). Called as transformers'
    model is: `model(input_ids=, attention_mask=).last_hidden_state`."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = SimpleNamespace(**{**CONFIG_DEFAULTS, **config})
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        # transformers leaves the mask out when no token is padding, which picks SDPA's unmasked kernel
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return SimpleNamespace(last_hidden_state=x)


def load_bert(folder: Path, dtype: torch.dtype) -> Bert:
    """The encoder from `folder`'s config.json and model.safetensors (its pooler is not read)."""
    from soragen.core.weights import load_into
    with torch.device("meta"):
        model = Bert(read_json(folder / "config.json"))
    load_into(model, [folder / "model.safetensors"], f"text encoder ({folder})",
              keep=lambda name: not name.startswith("pooler.") and not name.endswith("position_ids"))
    return model.to(dtype).eval().requires_grad_(False)


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library, called as transformers' tokenizer is for
    `TextEncoder.encode`: a batch of prompts, padded to the longest or to max_length, truncated."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as Fast
        try:
            self.fast = Fast.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # the library's own error types are not public
            raise SoragenError(f"{folder / 'tokenizer.json'} is not a tokenizer file: {err}") from err
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        pad = config.get("pad_token", "[PAD]") if isinstance(config, dict) else "[PAD]"
        self.pad_id = self.fast.token_to_id(pad if isinstance(pad, str) else "[PAD]") or 0

    def __call__(self, prompts: list[str], padding: str, truncation: bool, max_length: int,
                 return_tensors: str = "pt") -> "Batch":
        self.fast.no_truncation()
        self.fast.no_padding()
        if truncation:
            self.fast.enable_truncation(max_length)
        self.fast.enable_padding(pad_id=self.pad_id, length=max_length if padding == "max_length" else None)
        encodings = self.fast.encode_batch(prompts)
        return Batch(input_ids=torch.tensor([e.ids for e in encodings]),
                     attention_mask=torch.tensor([e.attention_mask for e in encodings]))


class Batch(dict):
    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.items()})
