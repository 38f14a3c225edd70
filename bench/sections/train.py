"""Section train: one fine-tuning step (flow-matching loss, backward, AdamW) of a small Wan
configuration: a full fine-tune, a LoRA, and a LoRA with gradient checkpointing in our DiT, against
the same steps through diffusers' WanTransformer3DModel with peft's LoRA, in the dtype training's
auto mixed precision picks."""

from __future__ import annotations

import torch

from harness import Section, Settings, dtype_name, fmt, median_times

SPEEDUP_TARGET = 1.0  # ours at least as fast as diffusers + peft
# Wan's architecture at 1.3B's head size, four blocks; umT5's 4096-d text, 512 tokens
CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=2048, num_layers=4, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT = (16, 3, 16, 16)  # 192 tokens a clip
BATCH, TEXT_TOKENS, RANK = 2, 512, 32
THEIR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]  # attention and FFN, as ours


def batch():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, *LATENT, generator=g)
    noise = torch.randn(BATCH, *LATENT, generator=g)
    s = torch.rand(BATCH, generator=g)
    text = torch.randn(BATCH, TEXT_TOKENS, 4096, generator=g)
    text[:, 24:] = 0.0
    level = s.view(-1, 1, 1, 1, 1)
    return (1 - level) * latents + level * noise, s * 1000, text, noise - latents


def step_fn(model, forward, amp: torch.dtype | None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    x, t, text, target = batch()

    @torch.inference_mode(False)  # median_times runs under inference mode
    @torch.enable_grad()
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = torch.nn.functional.mse_loss(forward(model, x, t, text).float(), target)
        loss.backward()
        optimizer.step()
    return step, sum(p.numel() for p in params)


def ours(model, x, t, text):
    return model(x, t, text, torch.ones(text.shape[:2], dtype=torch.bool), None)


def theirs(model, x, t, text):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def run(settings: Settings) -> Section:
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from soragen.core.config import LoRAConfig
    from soragen.models.lora import add_lora
    from soragen.train.loop import autocast_dtype
    from soragen.families.wan import from_diffusers

    amp = autocast_dtype("auto", torch.device("cpu"))
    s = Section("train", "Fine-tuning step: our DiT against diffusers' Wan transformer with peft",
                ["case", "trained params", "s/step", "tokens/s", "ours vs theirs / target"])

    def make(kind: str, checkpointing: bool):
        torch.manual_seed(0)
        reference = WanTransformer3DModel(**CONFIG).train()
        if kind.startswith("ours"):
            model = from_diffusers(reference).float().train().requires_grad_(True)
            del reference
            model.gradient_checkpointing = checkpointing
            if "lora" in kind:
                add_lora(model, LoRAConfig(lora_rank=RANK, lora_targets="attn,cross,ffn"))
            return step_fn(model, ours, amp)
        if "lora" in kind:
            reference.requires_grad_(False)
            reference.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=THEIR_TARGETS))
        if checkpointing:
            reference.enable_gradient_checkpointing()
        return step_fn(reference, theirs, amp)

    tokens = BATCH * LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)
    results = {}
    for label, checkpointing in (("full", False), ("lora", False), ("lora + checkpointing", True)):
        fns, counts = {}, {}
        for side in ("ours", "theirs"):
            fns[side], counts[side] = make(f"{side} {label}", checkpointing)
        times = median_times(fns, settings.warmup, max(3, settings.repeats // 2))
        results[label] = {**{f"{k}_s": v for k, v in times.items()}, **{f"{k}_params": v for k, v in counts.items()}}
        ratio = times["theirs"] / times["ours"]
        s.rows.append([f"{label}, ours", f"{counts['ours']:,}", fmt(times["ours"], 3), fmt(tokens / times["ours"], 0),
                       f"{ratio:.2f}x " + s.target(f"{label}: ours >= {SPEEDUP_TARGET}x diffusers + peft",
                                                   f"{ratio:.2f}x", ratio >= SPEEDUP_TARGET)])
        s.rows.append([f"{label}, diffusers + peft", f"{counts['theirs']:,}", fmt(times["theirs"], 3),
                       fmt(tokens / times["theirs"], 0), ""])
    s.data = {"results": results, "tokens_per_step": tokens, "dtype": dtype_name(amp or torch.float32)}
    s.notes.append(f"Wan's architecture with {CONFIG['num_layers']} blocks of {CONFIG['num_attention_heads']} heads of "
                   f"{CONFIG['attention_head_dim']}, FFN {CONFIG['ffn_dim']}, random weights; {BATCH} clips of "
                   f"{tokens // BATCH} tokens and {TEXT_TOKENS} text tokens a step; LoRA rank {RANK} on attention "
                   f"(self and cross) and FFN linears on both sides; autocast {dtype_name(amp) if amp else 'off'} "
                   "(training's --mixed-precision auto); a step is forward, flow-matching MSE, backward, AdamW.")
    return s
