"""What a training run will hold in memory, worked out without training: `soragen train --dry-run`.

The DiT is built on the meta device (shapes, no memory) and one training forward runs on meta
inputs of the run's shape, with autograd's saved-tensor hooks counting what backward would keep:
that is the activation memory, from the model's own code rather than a formula. Attention is
counted as the fused kernels keep it (q, k, v, the output and a row statistic), not as the
score matrix the meta device's fallback would build. Around it: the weights, for what trains its
gradients, AdamW's two moments (float32, or 8-bit with --optimizer adamw8bit) and the EMA copy
(float32), and backward's working set (the gradients of part of one block's activations). tests/test_finetune.py holds the figure against the bytes a real
CPU step allocates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from soragen.train.optimizers import state_bytes


@dataclass
class Plan:
    parameters: int
    trainable: int
    tokens_per_clip: int
    latent_shape: tuple[int, ...]
    bytes: dict[str, int]  # weights, gradients, optimizer, ema, activations, backward: per device
    optimizer: str = "adamw"

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def lines(self) -> list[str]:
        named = {"optimizer": "optimizer (8-bit)"} if self.optimizer == "adamw8bit" else {}
        parts = ", ".join(f"{named.get(name, name)} {_size(size)}" for name, size in self.bytes.items())
        return [f"parameters: {self.parameters:,} ({self.trainable:,} trained, "
                f"{100 * self.trainable / max(self.parameters, 1):.2f}%)",
                f"tokens per clip: {self.tokens_per_clip:,} (latent {' x '.join(map(str, self.latent_shape))})",
                f"memory per device: {_size(self.total)} ({parts}; float32 activations, the frozen VAE and "
                f"text encoder aside)"]


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


class _FusedAttention(torch.autograd.Function):
    """Attention that keeps for backward what the fused (flash) kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=1.0)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: planning makes no backward pass
        raise NotImplementedError


def _fused(q, k, v, bias=None):
    return _FusedAttention.apply(q, k, v, bias)


def activation_bytes(dit, batch: int, latent_shape: tuple[int, ...], text_tokens: int, text_dim: int) -> int:
    """Bytes autograd keeps for backward in one training forward of `dit` (on the meta device)."""
    from soragen.layers.attention import Attention
    params = {id(p) for p in dit.parameters()}
    kept: dict[int, int] = {}
    trained = any(p.requires_grad for p in dit.parameters())

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in params and id(tensor) not in params:
            kept[id(base)] = base.numel() * base.element_size()
        return tensor

    config = dit.config
    with torch.device("meta"):  # an image-to-video DiT's input: the latent, then the mask and image latent
        x = torch.zeros(batch, config.in_channels, *latent_shape[1:], requires_grad=not trained)
        t = torch.zeros(batch)
        text = torch.zeros(batch, text_tokens, text_dim)
        mask = torch.ones(batch, text_tokens, dtype=torch.bool)
        pooled = torch.zeros(batch, text_dim)
        image = torch.zeros(batch, config.image_tokens or 257, config.image_dim) if config.image_dim else None
    before = Attention.__dict__["attend"]  # the staticmethod itself
    Attention.attend = staticmethod(_fused)
    try:
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dit(x, t, text, mask, pooled, image=image)
    finally:
        Attention.attend = before
    return sum(kept.values())


def _meta_dit(config, lora):
    from soragen.models.dit import VideoDiT
    from soragen.models.lora import add_lora
    with torch.device("meta"):
        dit = VideoDiT(config).train()
    dit.requires_grad_(True)
    if lora is not None and lora.lora_rank:
        add_lora(dit, lora)
        dit.to("meta")
    return dit


def training_plan(dit_config, latent_shape: tuple[int, ...], batch: int, text_tokens: int, text_dim: int,
                  lora=None, gradient_checkpointing: bool = False, optimizer: str = "adamw") -> Plan:
    """The memory one device holds to train a DiT of `dit_config` on latents of `latent_shape`
    (C, T, H, W) in micro-batches of `batch` (a LoRA on it if `lora` has a rank), activations in
    float32. Backward works on one block at a time; the gradients of about half a block's
    activations are alive at once (what tests/test_finetune.py finds a CPU step allocates). The
    optimizer's moments float32, or 8-bit with `optimizer` adamw8bit."""
    dit = _meta_dit(dit_config, lora)
    parameters = sum(p.numel() for p in dit.parameters())
    trained = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    moments = state_bytes(optimizer, [p.numel() for p in dit.parameters() if p.requires_grad])
    weights = sum(p.numel() * p.element_size() for p in dit.parameters())
    full = activation_bytes(dit, batch, latent_shape, text_tokens, text_dim)
    single = _meta_dit(dataclasses.replace(dit_config, depth=1), lora)
    per_block = (full - activation_bytes(single, batch, latent_shape, text_tokens, text_dim)) / max(dit_config.depth - 1, 1)
    tokens = _tokens(dit_config, latent_shape)
    activations = full
    if gradient_checkpointing:  # each block keeps its input; the one being recomputed keeps the rest
        kept = dit_config.depth * batch * tokens * dit_config.hidden_size * 4
        activations = full - dit_config.depth * per_block + kept + per_block
    return Plan(parameters, trained, tokens, tuple(latent_shape),
                {"weights": weights, "gradients": 4 * trained, "optimizer": moments, "ema": 4 * trained,
                 "activations": int(activations), "backward": int(per_block / 2)}, optimizer)


def plan_run(cfg, lora, init: str | None, vae_source: str | None, preset: str, text_source: str) -> Plan:
    """The plan of `soragen train` with these options, from the configs (no DiT weights are read)."""
    from soragen.core.config import TextEncoderSpec, dit_preset
    from soragen.io.model_folder import model_configs
    from soragen.models.vae import load_vae

    if init:
        config, text_spec, vae_folder = model_configs(init)
        text_tokens = text_spec.max_length  # what the text is padded to, or at most
        vae = load_vae(vae_folder)
    else:
        from soragen.models.text import TextEncoder
        from soragen.train.run import resolve_vae
        if not vae_source:
            from soragen.core.errors import UsageError
            raise UsageError("--dry-run needs what the run needs: --init, or --vae")
        vae, spec = resolve_vae(vae_source), TextEncoderSpec(source=text_source)
        config = dit_preset(preset, in_channels=vae.latent_channels, text_dim=TextEncoder(spec).dim)
        text_tokens = spec.max_length
    latent = vae.latent_shape(cfg.frames, cfg.height, cfg.width)
    return training_plan(config, latent, cfg.batch_size, text_tokens, config.text_dim, lora, cfg.gradient_checkpointing,
                         cfg.optimizer)


def _tokens(config, latent_shape) -> int:
    _, t, h, w = latent_shape
    pt, ph, pw = config.patch_size
    return math.ceil(t / pt) * (h // ph) * (w // pw)
