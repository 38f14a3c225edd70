"""The deltas of Wan adapters in the original layout (LightX2V, Wan2.2-Lightning, CausVid, as
ComfyUI reads them) that diffusers' converter does not turn into LoRA layers.

Such files carry, besides lora_down / lora_up pairs, whole-tensor deltas: `X.diff_b` is added to
the bias of the linear X, `X.diff` to its weight (or to a norm's weight, or to a modulation
table). diffusers 0.42.1 turns the `diff_b` of its LoRA linears into `lora_B.bias` (which peft adds
to the bias), and `head.head.diff` into a LoRA layer with an identity up matrix; it drops norm
deltas (zeros in the files it was written for) and the other `diff` keys, and fails on some
(`text_embedding.0.diff_b` without its pair). Here each delta keyed by diffusers' name of the
parameter it adds to, so that soragen merges them all, or refuses the ones it cannot place.
"""

from __future__ import annotations

import torch

PREFIX = "diffusion_model."

# the original Wan names of a block's parts -> diffusers' (its conversion script's renames)
BLOCK_PARTS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
               "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
               "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
               "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q",
               "cross_attn.norm_k": "attn2.norm_k", "cross_attn.k_img": "attn2.add_k_proj",
               "cross_attn.v_img": "attn2.add_v_proj", "cross_attn.norm_k_img": "attn2.norm_added_k",
               "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2", "modulation": "scale_shift_table"}
TOP_PARTS = {"patch_embedding": "patch_embedding", "head.head": "proj_out", "head.modulation": "scale_shift_table",
             "text_embedding.0": "condition_embedder.text_embedder.linear_1",
             "text_embedding.2": "condition_embedder.text_embedder.linear_2",
             "time_embedding.0": "condition_embedder.time_embedder.linear_1",
             "time_embedding.2": "condition_embedder.time_embedder.linear_2",
             "time_projection.1": "condition_embedder.time_proj",
             "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
             "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
             "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
             "img_emb.proj.4": "condition_embedder.image_embedder.norm2"}
PAIRS = ("lora_down", "lora_up", "lora_A", "lora_B")


def diffusers_name(module: str) -> str | None:
    """diffusers' name of an original Wan module (`blocks.3.self_attn.q` -> `blocks.3.attn1.to_q`)."""
    if module in TOP_PARTS:
        return TOP_PARTS[module]
    head, _, tail = module.partition(".")
    number, _, part = tail.partition(".")
    if head == "blocks" and number.isdigit() and part in BLOCK_PARTS:
        return f"blocks.{number}.{BLOCK_PARTS[part]}"
    return None


def parameter(key: str) -> str:
    """The parameter (diffusers' name) the delta `key` (original name, no prefix) adds to; the key
    key with its prefix where there is none (soragen then refuses it, naming it)."""
    module, kind = key.rsplit(".", 1)
    theirs = diffusers_name(module)
    if theirs is None:
        return PREFIX + key
    if theirs.endswith("scale_shift_table"):  # a parameter of its own: only a whole-tensor `diff`
        return theirs if kind == "diff" else PREFIX + key
    return f"{theirs}.{'weight' if kind == 'diff' else 'bias'}"


def split_deltas(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """(the tensors for diffusers' converter, the deltas it would drop or fail on: diffusers' name
    of their parameter -> (the file's key, the delta)): every `diff` of the original layout, the `diff_b` of norms
    and of modules without a LoRA pair. The `diff_b` of a module with a pair stays with diffusers,
    which merges it as peft merges `lora_B.bias`."""
    if not any(k.startswith(PREFIX) for k in tensors):
        return tensors, {}
    rest, deltas = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        module, _, kind = name.rpartition(".")
        paired = any(f"{PREFIX}{module}.{p}.weight" in tensors for p in PAIRS)
        if key.startswith(PREFIX) and kind in ("diff", "diff_b") and (kind == "diff" or "norm" in module or not paired):
            deltas[parameter(name)] = (key, value)
        else:
            rest[key] = value
    return rest, deltas
