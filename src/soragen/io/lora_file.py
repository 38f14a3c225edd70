"""LoRA files: an adapter saved, found and merged, in the layout its model's family names (for
soragen's DiT and Wan: diffusers' Wan LoRA layout, `transformer.blocks.0.attn1.to_q.lora_A.weight`,
..., which diffusers' `WanPipeline.load_lora_weights` and the ComfyUI-style tools read).

Our q, k and v are one fused linear, diffusers' three: one LoRA on the fused weight is three that
share A, each with its rows of B. The other way, three LoRAs of rank r with their own A are one of
rank 3r on the fused weight, which is how adapters made elsewhere are merged. The scale alpha / r is
multiplied into B when saving, so a file means the same in every tool (a file without alphas is
read at scale 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from soragen.core.errors import SoragenError, UsageError
from soragen.models.lora import ADAPTER, lora_layers

FILE = "lora.safetensors"


def to_layout(dit, names: dict[str, tuple[str, int, int]]) -> dict[str, torch.Tensor]:
    """The adapter of `dit` under other tools' `names` (a family's lora_names), its scale multiplied into B."""
    grouped: dict[str, list] = {}  # our linear -> [(part, parts, their name)]
    for theirs, (name, part, parts) in names.items():
        grouped.setdefault(name, []).append((part, parts, theirs))
    state = {}
    for name, layer in lora_layers(dit).items():
        a = layer.lora_A[ADAPTER].weight.detach().float()
        b = layer.lora_B[ADAPTER].weight.detach().float() * layer.scaling[ADAPTER]
        for part, parts, theirs in grouped[name]:
            rows = b.shape[0] // parts
            state[f"transformer.{theirs}.lora_A.weight"] = a.clone().contiguous()
            state[f"transformer.{theirs}.lora_B.weight"] = b[part * rows:(part + 1) * rows].clone().contiguous()
    return state


def save(dit, path: Path, family) -> None:
    from safetensors.torch import save_file
    save_file(to_layout(dit, family.lora_names(len(dit.blocks))), str(path), metadata={"format": "pt"})


def resolve_file(source: str | Path) -> Path:
    """--lora's path: an adapter file, a LoRA checkpoint folder, or a LoRA run (its latest checkpoint's)."""
    from soragen.core.jsonfile import not_regular
    from soragen.io.folders import latest_checkpoint
    path = Path(source)
    if path.is_dir():
        checkpoint = latest_checkpoint(path) or path
        path = checkpoint / FILE
        if not path.exists():
            raise SoragenError(f"--lora {source}: no {FILE} there (a LoRA run or checkpoint has one)")
    elif not path.exists():
        raise SoragenError(f"--lora {source}: no such file or folder")
    if not_regular(path):
        raise SoragenError(f"--lora {path} is {not_regular(path)}, not a regular file")
    if path.suffix != ".safetensors":
        raise SoragenError(f"--lora {source}: soragen reads adapters from .safetensors files only")
    return path


EXPERTS = {"both": (0, 1), "high": (0,), "low": (1,)}  # @... : which of two experts (Wan 2.2 A14B) it goes into


def parse_expert(spec: str) -> tuple[str, str]:
    """'adapter.safetensors:0.8@high' -> ('adapter.safetensors:0.8', 'high'); no @...: both."""
    head, sep, expert = spec.rpartition("@")
    return (head, expert) if sep and head and expert in EXPERTS else (spec, "both")


def parse(spec: str) -> tuple[str, float]:
    """'adapter.safetensors:0.8' -> (path, 0.8); a bare path weighs 1."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not -100 <= value <= 100:
            raise UsageError(f"--lora {spec}: the weight after ':' must be a number between -100 and 100")
        return path, value
    return spec, 1.0


def _read(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    from soragen.core.jsonfile import not_regular, parse_json
    if not_regular(path):  # a FIFO would be waited on forever
        raise SoragenError(f"{what} is {not_regular(path)}, not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SoragenError(f"{what} is not a readable safetensors file: "
                           f"{(str(err).splitlines() or [type(err).__name__])[0]}") from err
    raw = metadata.get("lora_adapter_metadata")
    config = parse_json(raw, f"{what}: its lora_adapter_metadata") if raw else {}
    if not isinstance(config, dict):
        raise SoragenError(f"{what}: its lora_adapter_metadata must be a JSON object, not {type(config).__name__}")
    return tensors, config


def _number(value, where: str, positive: bool = False) -> float:
    """A finite number from an adapter's metadata or alpha tensor (a positive one for a rank)."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise SoragenError(f"{where} must be one number, not a tensor of shape {tuple(value.shape)}")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise SoragenError(f"{where} is {repr(value)[:40]}: it must be a {'positive' if positive else 'finite'} "
                           f"number")
    return float(value)


def _scale(config: dict, module: str, rank: int, alphas: dict, what: str) -> float:
    """alpha / r of one module: from the file's LoRA config (diffusers writes its peft config), from
    kohya-style `.alpha` tensors, else 1 (diffusers' and peft's reading of a file without alphas)."""
    if f"{module}.alpha" in alphas:
        return _number(alphas[f"{module}.alpha"], f"{what}: {module}.alpha") / rank
    if not config:
        return 1.0
    short = module.removeprefix("transformer.")

    def pick(pattern_key: str, key: str, default):  # (value, its name in the metadata)
        pattern = config.get(pattern_key) or {}
        if not isinstance(pattern, dict):
            raise SoragenError(f"{what}: lora_adapter_metadata's {pattern_key} must be an object of "
                               f"module: number, not {type(pattern).__name__}")
        found = next((k for k in pattern if short.endswith(k)), None)
        return (pattern[found], f"{pattern_key}.{found}") if found is not None else (config.get(key, default), key)
    r, r_key = pick("transformer.rank_pattern", "transformer.r", rank)
    alpha, alpha_key = pick("transformer.alpha_pattern", "transformer.lora_alpha", r)
    where = f"{what}: lora_adapter_metadata's"
    return _number(alpha, f"{where} {alpha_key}") / _number(r, f"{where} {r_key}", positive=True)


def apply(dit, path: Path, family, weight: float = 1.0, what: str | None = None) -> int:
    """Merge the adapter in `path` (the layout `family` names, or one it converts: for Wan, the
    original Wan and musubi-tuner layouts diffusers converts) into `dit`'s weights at `weight`;
    returns how many linears it changed. An adapter for another model is refused before any weight
    changes."""
    what = what or f"--lora {path}"
    tensors, config = _read(path, what)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    for key, value in alphas.items():  # each one number (kohya's), checked before anything is merged
        _number(value, f"{what}: {key}")
    try:
        converted = family.lora_tensors({k: v for k, v in tensors.items() if k not in alphas})
    except Exception as err:  # converters (diffusers') raise many kinds on an unknown layout
        raise SoragenError(f"{what}: not a Wan LoRA that diffusers can read ({type(err).__name__}: {err})") from err
    names = family.lora_names(len(dit.blocks))
    weights = dict(dit.named_parameters())
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in converted if ".lora_" in k})
    unknown = [k for k in converted if ".lora_A.weight" not in k and ".lora_B.weight" not in k]
    if unknown or not modules:
        raise SoragenError(f"{what} holds no Wan LoRA (e.g. {unknown[:1] or list(converted)[:1]}); soragen merges "
                           f"lora_A / lora_B pairs of the transformer's linears")
    updates = []
    for module in modules:
        theirs = module.removeprefix("transformer.")
        if theirs not in names:
            raise SoragenError(f"{what} adapts {theirs}, which this model ({len(dit.blocks)} blocks) does not have: "
                               f"an adapter for another model")
        a, b = converted.get(f"{module}.lora_A.weight"), converted.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise SoragenError(f"{what}: {theirs} has lora_{'A' if a is None else 'B'} but not its pair")
        ours, part, parts = names[theirs]
        target = weights[f"{ours}.weight"]
        rows = target.shape[0] // parts
        if a.dim() != 2 or b.dim() != 2:
            raise SoragenError(f"{what}: {theirs}'s lora_A and lora_B must be matrices, not of shapes "
                               f"{tuple(a.shape)} and {tuple(b.shape)}")
        if a.shape[0] != b.shape[1]:
            raise SoragenError(f"{what}: {theirs}'s lora_A has rank {a.shape[0]} and its lora_B rank {b.shape[1]}: "
                               f"the two must be equal (a damaged adapter)")
        if a.shape[0] == 0:
            raise SoragenError(f"{what}: {theirs} has rank 0 (lora_A of shape {tuple(a.shape)}): an empty adapter")
        if a.shape[1] != target.shape[1] or b.shape[0] != rows:
            raise SoragenError(f"{what} does not fit this model: its {theirs} maps {a.shape[1]} -> {b.shape[0]} "
                               f"features, the model's {target.shape[1]} -> {rows} (an adapter for another model)")
        delta = (b.float() @ a.float()) * (weight * _scale(config, module, a.shape[0], alphas, what))
        if not torch.isfinite(delta).all():
            raise SoragenError(f"{what}: {theirs} holds NaN or infinite values")
        updates.append((target, slice(part * rows, (part + 1) * rows), delta))
    with torch.no_grad():
        for target, rows, delta in updates:
            target[rows] = (target[rows].float() + delta.to(target.device)).to(target.dtype)
    return len({id(t) for t, _, _ in updates})
