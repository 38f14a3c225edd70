"""Section diffusers: our DiT against diffusers' WanTransformer3DModel at the same size and inputs."""

from __future__ import annotations

import torch

from harness import Section, auto_dtype, bench_dtypes, dtype_name, fmt, median_times
from workload import TEXT_LEN, dit_inputs, make_dit, num_tokens

DIFFUSERS_SPEEDUP_TARGET = 1.5


def make_wan(dtype: torch.dtype, keep_fp32: bool = False):
    """Wan at our tiny size. `keep_fp32` keeps the modules diffusers' from_pretrained(torch_dtype=...)
    leaves in float32 (`_keep_in_fp32_modules`); otherwise everything is cast, like our DiT."""
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=8,
                                  out_channels=8, text_dim=384, freq_dim=256, ffn_dim=1024, num_layers=8,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    model.eval().requires_grad_(False)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warning about casting the fp32 modules: we do it on purpose
    try:
        model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if keep_fp32:
        for name, param in model.named_parameters():
            if any(keep in name.split(".") for keep in model._keep_in_fp32_modules or []):
                param.data = param.data.float()
    return model


def run(settings) -> Section:
    s = Section("diffusers", "VideoDiT (tiny) vs diffusers' WanTransformer3DModel, same width/depth/heads/patch/inputs",
                ["dtype", "ours ms / step", "Wan ms / step", "Wan / ours", "target"])
    default = auto_dtype()
    for dtype in bench_dtypes():
        ours = make_dit("tiny", dtype)
        x, t, text, mask, pooled = dit_inputs(dtype=dtype)
        fns = {"ours": lambda: ours(x, t, text, mask, pooled)}
        # In low precision Wan runs two ways: all cast (like ours), or as diffusers loads it (norms etc. fp32).
        for keep in (False, True) if dtype != torch.float32 else (False,):
            wan = make_wan(dtype, keep)
            fns["Wan, fp32 modules kept" if keep else "Wan"] = (
                lambda wan=wan: wan(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False))
        times = median_times(fns, settings.warmup, settings.repeats)
        ours_s = times.pop("ours")
        best = min(times, key=times.get)  # the faster Wan variant is the one to beat
        ratio = times[best] / ours_s
        mark = ""
        if dtype == default:
            mark = s.target(f"faster than diffusers' Wan >= {DIFFUSERS_SPEEDUP_TARGET}x ({dtype_name(dtype)})",
                            f"{ratio:.2f}x", ratio >= DIFFUSERS_SPEEDUP_TARGET)
        for variant, wan_s in times.items():
            label = dtype_name(dtype) + (" (fp32 modules kept)" if "kept" in variant else "")
            s.rows.append([label, fmt(ours_s * 1e3), fmt(wan_s * 1e3), f"{wan_s / ours_s:.2f}x",
                           mark if variant == best else ""])
        s.data[dtype_name(dtype)] = {"ours_ms": ours_s * 1e3, "wan_ms": {k: v * 1e3 for k, v in times.items()},
                                     "ratio": ratio, "ratio_against": best}
    params = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in wan.parameters())
    s.data["params"] = {"ours": params[0], "wan": params[1]}
    s.notes.append("Both sides run a whole forward per step (ours: model(x, t, text, ...), not the pipeline's "
                   "lighter step of section dit). Wan's block is the same shape as ours: self-attention + "
                   "cross-attention to text + MLP, with adaLN-style shift/scale/gate modulation from the timestep; "
                   "width 256, 8 layers, 4 heads, "
                   f"patch (1,2,2), MLP 1024, {num_tokens(ours, x.shape[-3:])} tokens, text length {TEXT_LEN}. "
                   f"Parameters: ours {params[0] / 1e6:.2f} M, Wan {params[1] / 1e6:.2f} M. Timed interleaved; the "
                   f"target compares with the faster Wan variant.")
    return s


