"""Section scaling: DiT step time over frames and resolution; VAE decode memory, each in a fresh
process; our oneDNN route for Conv3d against torch's own kernel choice."""

from __future__ import annotations

import copy
import math

import torch

from harness import Section, Settings, auto_dtype, dtype_name, fmt, median_times, run_fresh
from workload import BATCH, TEXT_LEN, bench_vae, dit_inputs, make_dit, num_tokens, step_inputs

DECODE_MEMORY_RATIO_TARGET = 1.3


def latent_frames(frames: int, temporal_factor: int = 4) -> int:
    return 1 + math.ceil((frames - 1) / temporal_factor)


def decode_kernels_row(s: Section, settings: Settings) -> None:
    """A 16-frame decode with our oneDNN route for Conv3d (soragen.models.fast_paths) against torch's own
    choice, which at batch 1 is its reference slow_conv3d; timed interleaved, same VAE."""
    from soragen.models import fast_paths
    vae = bench_vae(settings.model_dir)
    if vae.dtype != torch.float32 or not fast_paths.onednn_conv3d(torch.float32):
        return
    twin = copy.deepcopy(vae)
    fast_paths.uninstall(twin.model)
    latent = torch.randn(1, *vae.latent_shape(16, 64, 64), generator=torch.Generator().manual_seed(0))
    times = median_times({"ours": lambda: vae.decode_uint8(latent, 16), "torch": lambda: twin.decode_uint8(latent, 16)},
                         1, max(3, settings.repeats // 2))
    s.rows.append(["16 frames decode, torch's conv3d choice", "5,16,16", "", "", "", f"{times['torch']:.2f}", "", ""])
    s.rows.append(["16 frames decode, oneDNN conv3d (ours)", "5,16,16", "", "", "",
                   f"{times['ours']:.2f} ({times['torch'] / times['ours']:.2f}x)", "", ""])
    s.data["decode_16f_onednn_s"], s.data["decode_16f_torch_choice_s"] = times["ours"], times["torch"]


def run(settings: Settings) -> Section:
    s = Section("scaling", "How a DiT step and VAE decode scale with frames and resolution",
                ["case", "latent T,H,W", "tokens", "DiT ms / step", "vs 16f 64px", "decode s", "decode +MB", "target"])
    frame_counts = (8, 16) if settings.quick else (8, 16, 32, 64)
    dtype = auto_dtype()
    model = make_dit("tiny", dtype)
    cases = [(f, 16) for f in frame_counts] + [(16, 32)]  # (frames, latent side): 64x64 and 128x128 pixels
    dit_ms = {}
    for frames, side in cases:
        latent = (model.config.in_channels, latent_frames(frames), side, side)
        prepared = step_inputs(model, dit_inputs(latent, dtype))
        dit_ms[(frames, side)] = median_times({"dit": lambda: model.predict(*prepared)}, settings.warmup,
                                              settings.repeats)["dit"] * 1e3

    model_args = ["--model", str(settings.model_dir)] if settings.model_dir is not None else []
    decode = {frames: run_fresh(["decode", str(frames), *model_args], f"bench/child.py decode {frames}")
              for frames in frame_counts}

    reference = dit_ms[(16, 16)]
    for frames, side in cases:
        d = decode.get(frames) if side == 16 else None
        tokens = num_tokens(model, (latent_frames(frames), side, side))
        s.rows.append([f"{frames} frames, {side * 4}x{side * 4}", f"{latent_frames(frames)},{side},{side}",
                       str(tokens), fmt(dit_ms[(frames, side)]), f"{dit_ms[(frames, side)] / reference:.2f}x",
                       f"{d['seconds']:.2f}" if d else "", fmt(d["added_mb"]) if d else "", ""])
        s.data[f"{frames}f_{side * 4}px"] = {"tokens": tokens, "dit_ms": dit_ms[(frames, side)], "decode": d}
    decode_kernels_row(s, settings)
    if 64 in decode:
        ratio = decode[64]["added_mb"] / max(decode[16]["added_mb"], 1e-9)
        mark = s.target(f"decode memory 64f / 16f <= {DECODE_MEMORY_RATIO_TARGET}", f"{ratio:.2f}x",
                        ratio <= DECODE_MEMORY_RATIO_TARGET)
        s.rows.append(["decode memory 64 / 16 frames", "", "", "", "", "", f"{ratio:.2f}x", mark])
        s.data["decode_memory_ratio_64_16"] = ratio
    else:
        s.notes.append("--quick stops at 16 frames: the decode memory target (64 / 16 frames) needs a full run.")
    vae_from = f"the VAE of {settings.model_dir}" if settings.model_dir else "a fresh new_vae(tiny) (no model)"
    s.notes.append(f"DiT: tiny preset in {dtype_name(dtype)}, batch {BATCH}, text {TEXT_LEN}. Decode: "
                   f"VideoVAE.decode_uint8 with {vae_from}, each in a fresh process; 'added' is its peak RSS "
                   f"minus its RSS right before decoding.")
    return s


