"""LoRA files: an adapter saved, found and merged, in the layout its model's family names (for
soragen's DiT and Wan: diffusers' Wan LoRA layout, `transformer.blocks.0.attn1.to_q.lora_A.weight`,
..., which diffusers' `WanPipeline.load_lora_weights` and the ComfyUI-style tools read).

Our q, k and v are one fused linear, diffusers' three: one LoRA on the fused weight is three that
share A, each with its rows of B. The other way, three LoRAs of rank r with their own A are one of
rank 3r on the fused weight, which is how adapters made elsewhere are merged. The scale alpha / r is
multiplied into B when saving, so a file means the same in every tool (a file without alphas is
read at scale 1).

Adapters made elsewhere may also change biases (`lora_B.bias`; the original Wan layout's `diff_b`)
and whole tensors (`diff`: a norm's weight, a modulation table, a linear's weight): each is added to
its rows of our (fused) tensor, the biases times the LoRA's scale as peft merges them. A key that
cannot be placed is refused, naming it, before any weight changes: the adapter merges whole or not
at all. A file may also recommend sampling settings in its metadata (`read_recipe`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from soragen.core.errors import SoragenError, UsageError
from soragen.core.weights import finite
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


RECIPE = "soragen.recipe"  # the safetensors metadata key of an adapter's recommended sampling settings
RECIPE_KEYS = ("sampler", "steps", "guidance", "shift", "timesteps")


def read_recipe(path: Path) -> dict:
    """The sampling settings the adapter in `path` recommends: its metadata's soragen.recipe, a
    JSON object of sampler, steps, guidance, shift and timesteps (a list), checked as a model's own
    settings are; {} where it has none. SoragenError naming the file otherwise (only the header is read)."""
    from safetensors import SafetensorError, safe_open

    from soragen.core.config import ConfigError, SamplingDefaults
    from soragen.core.jsonfile import not_regular, parse_json
    what = f"--lora {path}"
    if not_regular(path):
        raise SoragenError(f"{what} is {not_regular(path)}, not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(RECIPE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SoragenError(f"{what} is not a readable safetensors file: "
                           f"{(str(err).splitlines() or [type(err).__name__])[0]}") from err
    if raw is None:
        return {}
    recipe = parse_json(raw, f"{what}: its {RECIPE} metadata")
    if not isinstance(recipe, dict):
        raise SoragenError(f"{what}: its {RECIPE} metadata must be a JSON object, not {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise SoragenError(f"{what}: its {RECIPE} metadata recommends {unknown[0]!r}, which soragen does not know "
                           f"(it knows {', '.join(RECIPE_KEYS)})")
    try:
        settings = SamplingDefaults(**recipe)
    except ConfigError as err:
        raise SoragenError(f"{what} recommends settings out of range ({RECIPE} metadata): {err}") from None
    if settings.timesteps and "steps" in recipe and len(settings.timesteps) != settings.steps:
        raise SoragenError(f"{what} recommends {settings.steps} steps and {len(settings.timesteps)} timesteps "
                           f"({RECIPE} metadata): they must agree")
    return {k: getattr(settings, k) for k in recipe}


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
    """Merge the adapter in `path` into `dit`'s weights at `weight`, as diffusers'
    `load_lora_weights` and `fuse_lora` merge it into its model: lora_A / lora_B pairs, their
    lora_B biases (the original layout's `diff_b`) and whole-tensor `diff` deltas, in the layout
    `family` names or one it converts (for Wan: the original Wan, LightX2V and kohya / musubi-tuner
    layouts, through diffusers' converter). Returns how many tensors it changed. An adapter with
    a key soragen cannot place, or for another model, is refused before any weight changes."""
    what = what or f"--lora {path}"
    tensors, config = _read(path, what)
    for key, value in tensors.items():  # each one number (kohya's), checked before anything is merged
        if key.endswith(".alpha"):
            _number(value, f"{what}: {key}")
    dora = sorted(k for k in tensors if "dora_scale" in k)
    if dora:  # diffusers warns and drops them, which merges another adapter than the one trained
        raise SoragenError(f"{what} is a DoRA adapter ({_some(dora)}): soragen merges LoRA, not DoRA's magnitudes")
    try:
        converted, deltas = family.lora_tensors(tensors)
    except Exception as err:  # converters (diffusers') raise many kinds on an unknown layout
        raise SoragenError(f"{what}: not a Wan LoRA that diffusers can read ({type(err).__name__}: {err})") from err
    targets = family.lora_targets(dit.config)
    weights = dict(dit.named_parameters())
    updates = _pair_updates(dit, converted, config, targets, weights, weight, what)
    updates += _delta_updates(dit, deltas, family, targets, weights, weight, what)
    if not updates:
        raise SoragenError(f"{what} holds no Wan LoRA; soragen merges lora_A / lora_B pairs of the transformer's "
                           f"linears, their biases and diff deltas")
    with torch.no_grad():
        for target, rows, delta in updates:
            target[rows] = (target[rows].float() + delta.to(target.device)).to(target.dtype)
    return len({id(t) for t, _, _ in updates})


def _some(keys: list[str]) -> str:
    return keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


def _place(targets: dict, weights: dict, name: str, what: str, depth: int, key: str | None = None):
    """(our tensor, its rows, how) that the other tool's parameter `name` is part of; refused where
    there is none (naming the file's `key` where it differs)."""
    if name not in targets:
        named = name if key is None or key.endswith(name) else f"{key} ({name})"
        raise SoragenError(f"{what} adapts {named}, which this model ({depth} blocks) does not have: an adapter for "
                           f"another model, or a key soragen cannot place (refused, not dropped)")
    ours, part, parts, how = targets[name]
    target = weights[ours]
    rows = target.shape[0] // parts
    return target, slice(part * rows, (part + 1) * rows), how


def _finite(delta: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not finite(delta):
        raise SoragenError(f"{what}: {name} holds NaN or infinite values")
    return delta


def _pair_updates(dit, converted: dict, config: dict, targets: dict, weights: dict, weight: float, what: str) -> list:
    """The weight (B @ A) and bias (lora_B.bias) updates of each adapted linear, checked."""
    alphas = {k: v for k, v in converted.items() if k.endswith(".alpha")}  # kohya-style, in diffusers' names
    unknown = sorted(k for k in converted if k not in alphas and not k.endswith(PAIR_KEYS))
    if unknown:
        raise SoragenError(f"{what} holds {_some(unknown)}, which soragen cannot place (it merges lora_A / lora_B "
                           f"pairs, lora_B biases and diff deltas): refused, not dropped")
    updates = []
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in converted if ".lora_" in k}):
        theirs = module.removeprefix("transformer.")
        target, rows, how = _place(targets, weights, f"{theirs}.weight", what, len(dit.blocks))
        a, b = converted.get(f"{module}.lora_A.weight"), converted.get(f"{module}.lora_B.weight")
        if (a is None) != (b is None):
            raise SoragenError(f"{what}: {theirs} has lora_{'A' if a is None else 'B'} but not its pair")
        if how not in ("copy", "cat") or target.dim() != 2:
            raise SoragenError(f"{what} adapts {theirs}, which is not a linear layer soragen can merge into")
        scale = weight * _scale(config, module, 1 if a is None else a.shape[0], alphas, what)
        if a is not None:
            _check_pair(a, b, target, rows, theirs, what)
            updates.append((target, rows, _finite((b.float() @ a.float()) * scale, theirs, what)))
        bias = converted.get(f"{module}.lora_B.bias")
        if bias is not None:
            updates.append(_bias_update(targets, weights, theirs, bias, scale, what, len(dit.blocks)))
    return updates


PAIR_KEYS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


def _check_pair(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, rows: slice, theirs: str, what: str) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise SoragenError(f"{what}: {theirs}'s lora_A and lora_B must be matrices, not of shapes "
                           f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise SoragenError(f"{what}: {theirs}'s lora_A has rank {a.shape[0]} and its lora_B rank {b.shape[1]}: "
                           f"the two must be equal (a damaged adapter)")
    if a.shape[0] == 0:
        raise SoragenError(f"{what}: {theirs} has rank 0 (lora_A of shape {tuple(a.shape)}): an empty adapter")
    out = rows.stop - rows.start
    if a.shape[1] != target.shape[1] or b.shape[0] != out:
        raise SoragenError(f"{what} does not fit this model: its {theirs} maps {a.shape[1]} -> {b.shape[0]} "
                           f"features, the model's {target.shape[1]} -> {out} (an adapter for another model)")


def _bias_update(targets: dict, weights: dict, theirs: str, bias: torch.Tensor, scale: float, what: str, depth: int):
    """lora_B.bias, added to the linear's bias times the LoRA's scale (as peft merges it)."""
    target, rows, _ = _place(targets, weights, f"{theirs}.bias", what, depth)
    if tuple(bias.shape) != (rows.stop - rows.start,):
        raise SoragenError(f"{what} does not fit this model: its {theirs} bias delta has shape {tuple(bias.shape)}, "
                           f"the model's bias ({rows.stop - rows.start},) (an adapter for another model)")
    return target, rows, _finite(bias.float() * scale, f"{theirs}'s lora_B.bias", what)


def _delta_updates(dit, deltas: dict, family, targets: dict, weights: dict, weight: float, what: str) -> list:
    """Whole-tensor deltas (the original layout's `diff` and `diff_b`), each added times `weight`."""
    updates = []
    for name, (key, delta) in sorted(deltas.items()):
        target, rows, how = _place(targets, weights, name, what, len(dit.blocks), key)
        ours = family.lora_delta(how, delta.float())
        want = (rows.stop - rows.start, *target.shape[1:])
        if tuple(ours.shape) != want:
            raise SoragenError(f"{what} does not fit this model: its {key} of shape {tuple(delta.shape)} cannot add to "
                               f"the model's {name} (an adapter for another model)")
        updates.append((target, rows, _finite(ours * weight, key, what)))
    return updates
