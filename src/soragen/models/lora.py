"""LoRA: low-rank adapters on the DiT's linears, trained with peft.

A LoRA leaves a linear's weight W frozen and learns a low-rank change to it:

    y = W x + (alpha / r) B A x         A: (r, in), random at start;  B: (out, r), zero at start

so training starts from the base model exactly and moves only r (in + out) numbers per linear.

This module puts adapters on a DiT (peft's LoRA layers); soragen.io.lora_file stores and merges them.
"""

from __future__ import annotations

import torch

from soragen.core.config import LoRAConfig

ADAPTER = "default"
# Our linears in each block that a target adapts (soragen.config.LORA_TARGETS)
TARGETS = {"attn": ("attn.qkv", "attn.proj"), "cross": ("cross.q", "cross.kv", "cross.proj"), "ffn": ("mlp.0", "mlp.2")}


def target_names(dit, lora: LoRAConfig) -> list[str]:
    return [f"blocks.{i}.{name}" for i in range(len(dit.blocks)) for t in lora.targets() for name in TARGETS[t]]


def add_lora(dit, lora: LoRAConfig):
    """Freeze `dit` and give the target linears a trainable LoRA (peft's LoRA layers, in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    dit.requires_grad_(False)
    config = LoraConfig(r=lora.lora_rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                        target_modules=target_names(dit, lora))
    inject_adapter_in_model(config, dit, adapter_name=ADAPTER)
    return dit


def lora_layers(dit) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in dit.named_modules() if isinstance(m, LoraLayer)}


def trainable_state(dit) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their names in `dit` (what a LoRA run's checkpoints keep; also of
    its EMA copy, whose tensors do not require grad)."""
    return {name: p for name, p in dit.named_parameters() if ".lora_A." in name or ".lora_B." in name}
