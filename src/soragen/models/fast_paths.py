"""CPU fast paths, installed onto the plain modules of `soragen.models.dit` and the VAE from outside.

What is installed, each only where this CPU runs it (checked once per dtype by trying it on a
tiny input: oneDNN refuses bf16 on AVX2-only CPUs) and each falling back to the plain module:

- every nn.Linear runs oneDNN's linear at inference, with its weight prepacked in oneDNN's blocked
  layout; an MLP (Linear, GELU, Linear) applies its GELU inside the first linear's kernel, while
  the tile is in cache;
- attention on a CPU materialises the scores (matmul, softmax, matmul) below a size where SDPA's
  flash kernel, which works through one query block at a time, is the faster;
- the VAE's Conv3d layers take oneDNN's convolution where torch would pick its reference kernel;
- `compile_for_sampling`: torch.compile of the DiT's forward, its linears kept as oneDNN calls.

`install(dit)` / `uninstall(dit)` put them on and take them off; with them off every module is the
plain one, and so are its outputs. `SORAGEN_FAST_PATHS=off` keeps them off everywhere. bench/ says
what each buys.
"""

from __future__ import annotations

import functools
import os
import platform
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from soragen.layers import attention as attention_module
from soragen.models.dit import VideoDiT


# ---- what this CPU can run -----------------------------------------------------------------------

def enabled() -> bool:
    return os.environ.get("SORAGEN_FAST_PATHS", "on").lower() not in ("off", "0", "no", "false")


@functools.cache
def has_fast_bf16() -> bool:
    """True when the CPU does bf16 matmuls in hardware (AVX512-BF16 or AMX): there bf16 runs several
    times faster than float32; elsewhere it is emulated and far slower."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _onednn_linear_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        x, w = torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "gelu", [], "none")
        return True
    except (RuntimeError, AttributeError, NotImplementedError):  # e.g. "bf16 path needs the cpu support ..."
        return False


@functools.cache
def _onednn_conv3d_runs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.ones(1, 2, 2, 4, 4, dtype=dtype), torch.ones(2, 2, 1, 3, 3, dtype=dtype)
        torch.mkldnn_convolution(x, w, None, (0, 1, 1), (1, 1, 1), (1, 1, 1), 1)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def onednn_linear(dtype: torch.dtype) -> bool:
    """oneDNN's linear (with its fused GELU and prepacked weights) runs in `dtype` here."""
    return enabled() and _onednn_linear_runs(dtype)


def onednn_conv3d(dtype: torch.dtype) -> bool:
    """oneDNN's 3D convolution runs in `dtype` here."""
    return enabled() and _onednn_conv3d_runs(dtype)


# ---- linears -------------------------------------------------------------------------------------

def _onednn_call(x, weight, bias, activation: str):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "none" if activation == "gelu" else "")


@torch.library.custom_op("soragen::linear", mutates_args=())
def _compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """A linear inside a torch.compile graph, opaque to inductor so that it stays oneDNN's call:
    inductor's own matmul and separate GELU kernel ran these layers slower (bench/, section dit)."""
    if x.dtype == weight.dtype and onednn_linear(x.dtype):
        return _onednn_call(x, weight, bias, activation)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


@_compiled_linear.register_fake
def _(x, weight, bias, activation):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _weight_key(weight: torch.Tensor) -> tuple:
    """Changes when the weight does (inference tensors have no version counter, and cannot change)."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version, weight.dtype


def _inference_weight(layer: nn.Linear) -> torch.Tensor:
    """The prepacked copy of layer.weight while it is still the weight's, else layer.weight. Compiled
    graphs trust it (the checks would break the graph): the pipeline packs right before compiling."""
    packed = getattr(layer, "onednn_weight", None)
    if packed is not None and (torch.compiler.is_compiling() or layer.onednn_key == _weight_key(layer.weight)):
        return packed
    return layer.weight


def _at_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's kernel may run: no autograd (it has no backward), no autocast (it would not cast),
    a CPU tensor in the weight's dtype, which oneDNN runs here."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu") and onednn_linear(x.dtype))


def linear(layer: nn.Linear, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """layer(x), then exact GELU if `activation` is "gelu", through oneDNN at inference on a CPU."""
    if torch.compiler.is_compiling():  # first: torch.compile cannot trace the checks of _at_inference
        if not torch.is_grad_enabled() and x.device.type == "cpu":
            return _compiled_linear(x, _inference_weight(layer), layer.bias, activation)
    elif _at_inference(x, layer.weight):
        return _onednn_call(x, _inference_weight(layer), layer.bias, activation)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if activation == "gelu" else y


def _linear_forward(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(layer, x)


def _mlp_forward(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """An MLP (Linear, GELU, Linear) with its GELU inside the first linear's kernel."""
    return mlp[2](linear(mlp[0], x, "gelu"))


def pack(layer: nn.Linear) -> None:
    """Keep a copy of the layer's weight in oneDNN's blocked layout, where oneDNN runs its dtype here
    (elsewhere drop a packing of another dtype: torch's kernel needs the weight as it is)."""
    w = layer.weight
    if w.device.type == "cpu" and onednn_linear(w.dtype):
        with torch.no_grad():
            layer.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        layer.onednn_key = _weight_key(w)
    else:
        vars(layer).pop("onednn_weight", None)
        vars(layer).pop("onednn_key", None)


def _is_gelu_mlp(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[0], nn.Linear)
            and isinstance(module[1], nn.GELU) and module[1].approximate == "none" and isinstance(module[2], nn.Linear))


# ---- attention -----------------------------------------------------------------------------------

# Above this many attention scores (batch x heads x queries x keys) SDPA's flash kernel, which never
# holds them all, is used; below it, on a CPU, two batched matmuls and a softmax.
MAX_MATERIALISED_SCORES = 1 << 24


def materialised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """`soragen.layers.attention.attention`, with the scores held whole where that is the faster on a CPU."""
    B, H, N, _ = q.shape
    if q.device.type != "cpu" or B * H * N * k.shape[2] > MAX_MATERIALISED_SCORES:
        return attention_module.attention(q, k, v, bias)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, L)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(scores.softmax(-1), v)


# ---- the VAE's Conv3d ----------------------------------------------------------------------------

def _onednn_conv3d(self: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias):
    """Conv3d._conv_forward through oneDNN at float32 CPU inference: for batch-1 causal chunks torch
    picks its reference `slow_conv3d` instead."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and self.padding_mode == "zeros" and not isinstance(self.padding, str) and onednn_conv3d(x.dtype)):
        return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
    return nn.Conv3d._conv_forward(self, x, weight, bias)


# ---- putting them on and off ---------------------------------------------------------------------

_INSTALLED = ("forward", "_conv_forward", "attend")


def _per_step_linears(model: nn.Module) -> set[int]:
    """The linears a sampling step runs, where a step's time goes: of a DiT, those on the tokens
    (patch embedding, attention, MLP, output). Its conditioning linears run once per video, on
    (B, D) vectors, and keep torch's kernel. Of any other module tree, every linear."""
    if not isinstance(model, VideoDiT):
        return {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    parts = [model.patch_embed, model.final.linear]
    for block in model.blocks:
        parts += [block.attn, block.mlp] + ([block.cross] if hasattr(block, "cross") else [])
    return {id(m) for part in parts for m in part.modules() if isinstance(m, nn.Linear)}


# In float32 on CPUs without AVX-512 (an AVX2 AMD EPYC here) torch's own matmul ran the large linears
# of Wan 1.3B faster than oneDNN's, and oneDNN's the small ones of soragen's own DiT: above this many
# weights (in x out) such a CPU keeps torch's kernel. bench/ (sections wan and dit) times both.
LARGE_FP32_WEIGHT = 1 << 21


def onednn_suits(layer: nn.Linear) -> bool:
    """Whether oneDNN's kernel is the one to install for this linear on this CPU (where it runs)."""
    w = layer.weight
    if w.dtype != torch.float32 or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return True
    return w.numel() < LARGE_FP32_WEIGHT


def install(model: nn.Module) -> None:
    """Put every fast path this CPU runs onto `model`'s modules (a DiT, a VAE or any module tree).
    Linears are packed for their current dtype: install again after changing it."""
    uninstall(model)
    if not enabled():
        return
    linears = _per_step_linears(model)
    chosen = {id(m) for m in model.modules() if id(m) in linears and onednn_suits(m)}
    for module in model.modules():
        if id(module) in chosen:
            pack(module)
            module.forward = types.MethodType(_linear_forward, module)
        elif _is_gelu_mlp(module) and id(module[0]) in chosen:
            module.forward = types.MethodType(_mlp_forward, module)
        elif isinstance(module, attention_module.Attention):
            module.attend = materialised_attention
        elif isinstance(module, nn.Conv3d) and type(module)._conv_forward is nn.Conv3d._conv_forward:
            if onednn_conv3d(torch.float32):
                module._conv_forward = types.MethodType(_onednn_conv3d, module)


def uninstall(model: nn.Module) -> None:
    """Give every module of `model` back its plain methods and drop packed weights."""
    for module in model.modules():
        for name in _INSTALLED + ("onednn_weight", "onednn_key"):
            vars(module).pop(name, None)


def installed(model: nn.Module) -> bool:
    return any(name in vars(m) for m in model.modules() for name in _INSTALLED)


def compile_for_sampling(model: nn.Module):
    """torch.compile of `model.predict`, the forward given its conditioning: inductor fuses the norms,
    modulation, gates and softmax into a few kernels while the linears stay oneDNN calls. Shapes are
    static, which compiles faster than dynamic ones: a new video size compiles again, and the
    pipeline pads text to one length."""
    return torch.compile(model.predict, dynamic=False)
