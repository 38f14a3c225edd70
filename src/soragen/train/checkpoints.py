"""A training run's checkpoints: checkpoint-STEP/ is a complete model folder plus train_state/
(raw weights, EMA, optimizer moments, the step, the run's config and objective), all safetensors
and JSON, written under a temporary name and renamed when complete, so a crash at any moment
leaves the previous checkpoint as the latest. Resuming checks a checkpoint whole (every JSON file
and every safetensors header, the adapter and the model folder too) before the run does anything
else, and resumes from the newest checkpoint that is whole, naming each damaged one; the rotation
never removes an intact checkpoint while it keeps a damaged one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from soragen.core.atomic import atomic_path
from soragen.core.config import LoRAConfig, TrainConfig, from_dict
from soragen.core.errors import SoragenError, UsageError
from soragen.io.folders import CHECKPOINT_RE, latest_checkpoint
from soragen.core.weights import assert_finite, read_safetensors


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = sorted(entries)
        for name, value in entries.items():
            tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) \
                else torch.tensor(value)
    return tensors, meta


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The moments from the file; the settings (lr, betas, eps, ...) are this run's, made from its
    stored config as they were when the checkpoint was written: a file cannot set them."""
    state = {int(pid): {name: tensors[f"{pid}.{name}"] for name in names} for pid, names in meta["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entries in state.items():
        if not 0 <= pid < len(params):
            raise ValueError(f"it holds moments of parameter {pid}, the run has {len(params)} parameters")
        for name, tensor in entries.items():
            if name != "step" and tensor.shape != params[pid].shape:
                raise ValueError(f"{pid}.{name} has shape {tuple(tensor.shape)}, its parameter "
                                 f"{tuple(params[pid].shape)}")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{pid}.{name} holds NaN or infinity")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def whole(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def save_checkpoint(run_dir: Path, step: int, write_model: Callable[[Path], None], raw: torch.nn.Module,
                    ema: torch.nn.Module, optimizer, record: dict, keep_last: int,
                    trained: Callable[[torch.nn.Module], dict] = whole) -> Path:
    """checkpoint-STEP/: the model (`write_model` writes the EMA's model folder) + train_state/,
    complete before it gets its name. `record` is what state.json holds besides the step (the
    kind of run, counters, the config and objective); `trained(module)` the tensors that training
    changes (all of them, or a LoRA's)."""
    from safetensors.torch import save_file
    assert_finite(raw, "the model")
    assert_finite(ema, "the EMA model")
    final = run_dir / f"checkpoint-{step}"
    with atomic_path(final) as staging:  # replaces a leftover of the same step from a killed run
        write_model(staging)
        state_dir = staging / "train_state"
        state_dir.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in trained(raw).items()},
                  str(state_dir / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in trained(ema).items()},
                  str(state_dir / "ema.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(state_dir / "optimizer.safetensors"))
        (state_dir / "optimizer.json").write_text(json.dumps(meta) + "\n")
        (state_dir / "state.json").write_text(json.dumps({
            "step": step, **record,
            "rng": "derived: generator of step s on rank r is seeded from (seed, r, s); epoch e's order from (seed, e)",
        }, indent=2) + "\n")
    prune(run_dir, keep_last)  # only now, with the new one complete, may old checkpoints go
    return final


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-STEP folder in a run, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def intact(checkpoint: Path) -> bool:
    try:
        check_checkpoint(checkpoint)
        return True
    except SoragenError:
        return False


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` intact checkpoints (0: keep all) and whatever is newer than the
    oldest of them; remove the older ones. A damaged checkpoint never counts as kept, so the
    rotation never removes the last intact checkpoint while it keeps a damaged one (a damaged
    checkpoint newer than those kept stays, until the run saves its step again)."""
    if keep_last <= 0:
        return
    found, kept = checkpoints(run_dir), []
    for step, folder in reversed(found):
        if len(kept) == keep_last:
            break
        if intact(folder):
            kept.append(step)
    for step, folder in found:
        if kept and step < kept[-1]:
            shutil.rmtree(folder, ignore_errors=True)


def _damaged(checkpoint: Path, what: str) -> SoragenError:
    """Damage found only when the state is read (a tensor's values): the newest intact checkpoint
    before this one, if any, is named."""
    step = int(CHECKPOINT_RE.match(checkpoint.name).group(1)) if CHECKPOINT_RE.match(checkpoint.name) else None
    earlier = [folder for s, folder in checkpoints(checkpoint.parent) if step is not None and s < step]
    intact_one = next((folder for folder in reversed(earlier) if intact(folder)), None)
    hint = f"; move {checkpoint.name} aside to resume from {intact_one.name}" if intact_one else ""
    return SoragenError(f"{what}{hint}")


def _state_json(checkpoint: Path, name: str) -> dict:
    from soragen.core.jsonfile import read_json
    path = checkpoint / "train_state" / name
    try:
        data = read_json(path)
    except SoragenError as err:
        raise _damaged(checkpoint, f"cannot resume: {path} is damaged ({str(err).replace(str(path), 'it')})") from err
    if not isinstance(data, dict):
        raise _damaged(checkpoint, f"cannot resume: {path} is damaged (not a JSON object)")
    return data


# The files each kind of checkpoint holds besides train_state/state.json (soragen.io.model_folder's model
# folder, a LoRA run's adapter, a train-vae run's VAE; an unsharded run's training state).
HOLDS = {"dit": ["soragen.json", "dit/config.json", "dit/model.safetensors", "vae/config.json", "text_encoder.json",
                 "scheduler/scheduler_config.json"],
         "lora": ["soragen.json", "lora.safetensors"], "vae": ["soragen.json", "vae/config.json"]}
UNSHARDED_STATE = ["train_state/model.safetensors", "train_state/ema.safetensors", "train_state/optimizer.safetensors",
                   "train_state/optimizer.json"]


def _object(path: Path) -> dict:
    from soragen.core.jsonfile import read_json
    data = read_json(path)
    if not isinstance(data, dict):
        raise SoragenError(f"{path} is damaged: not a JSON object")
    return data


def _stored_run(state: dict, objective_class: type, older_defaults: dict | None = None) -> tuple:
    config = dict(state["config"])
    objective = state.get("objective", {**(older_defaults or {}), **config.pop("extra", {})})
    config.pop("extra", None)
    return from_dict(TrainConfig, config), from_dict(objective_class, objective)


def check_checkpoint(checkpoint: Path) -> None:
    """Every file the checkpoint holds is whole: each one its kind needs is there, every JSON file
    parses (with soragen.core.jsonfile's limits), every safetensors file's header reads and covers the
    file, and the training state means something (its config and LoRA in range, the optimizer's
    tensors all stored, as many shard files as processes). SoragenError naming the first damaged
    file. Headers only: checking a checkpoint reads no weights."""
    from soragen.core.config import DiTObjective, VAEObjective
    from soragen.core.jsonfile import read_json
    from soragen.core.weights import read_header, weight_files
    state_file = checkpoint / "train_state" / "state.json"
    state = _object(state_file)
    step = CHECKPOINT_RE.match(checkpoint.name)
    for key in ("step", "skipped_nonfinite"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or \
                (key == "step" and step and value != int(step.group(1))):
            raise SoragenError(f"{state_file} is damaged: {key} is {str(value)[:40]!r}, not the "
                               f"{'step of ' + checkpoint.name if key == 'step' else 'count of skipped steps'}")
    kind = state.get("kind", "dit")
    if kind not in ("dit", "vae"):
        raise SoragenError(f"{state_file} is damaged: kind is {str(kind)[:40]!r}, not dit or vae")
    manifest = _object(checkpoint / "soragen.json") if (checkpoint / "soragen.json").exists() else {}
    holds = HOLDS["lora" if manifest.get("kind") == "lora" else kind]
    for name in holds + ([] if state.get("sharded") else UNSHARDED_STATE):
        if not (checkpoint / name).exists():
            raise SoragenError(f"{checkpoint / name} is missing")
    for root, _, files in os.walk(checkpoint):
        for name in sorted(files):
            file = Path(root) / name
            if name.endswith(".json"):
                read_json(file)
            elif name.endswith(".safetensors"):
                read_header([file])
    if (checkpoint / "vae").is_dir():
        weight_files(checkpoint / "vae", "VAE")
    try:
        _stored_run(state, {"vae": VAEObjective}.get(kind, DiTObjective), {"prediction": "epsilon"})
        lora = from_dict(LoRAConfig, state.get("lora", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise SoragenError(f"{state_file} is damaged: {err}") from err
    if (manifest.get("kind") == "lora") != bool(lora.lora_rank):
        raise SoragenError(f"{state_file} is damaged: its LoRA rank {lora.lora_rank} does not fit the checkpoint "
                           f"({'a LoRA' if manifest.get('kind') == 'lora' else 'a whole model'}, by its soragen.json)")
    state_dir = checkpoint / "train_state"
    shards = state.get("sharded")
    if shards:  # an FSDP run's: one safetensors file of shards per process (soragen.train.fsdp)
        files = sorted((state_dir / "dcp").glob("*.safetensors"))
        if not isinstance(shards, int) or len(files) != shards:
            raise SoragenError(f"{state_dir / 'dcp'} holds {len(files)} shard files, its state.json says {shards}")
        return
    meta = _object(state_dir / "optimizer.json")
    stored = read_header([state_dir / "optimizer.safetensors"])
    try:
        wanted = {f"{pid}.{name}" for pid, names in meta["state"].items() for name in names}
    except (KeyError, AttributeError, TypeError) as err:
        raise SoragenError(f"{state_dir / 'optimizer.json'} is damaged ({err!r})") from err
    if wanted - set(stored):
        raise SoragenError(f"{state_dir / 'optimizer.safetensors'} does not hold the optimizer state its "
                           f"optimizer.json names ({len(wanted - set(stored))} tensors missing, e.g. "
                           f"{sorted(wanted - set(stored))[0]})")


def resumable(run_dir: Path, note: Callable[[str], None] | None = None) -> Path:
    """The newest checkpoint of a run that check_checkpoint passes; each newer, damaged one is named
    through `note`. SoragenError when none is intact."""
    problems = []
    for _, checkpoint in reversed(checkpoints(run_dir)):
        try:
            check_checkpoint(checkpoint)
        except SoragenError as err:
            problems.append(str(err))
            continue
        for problem in problems if note else []:
            note(f"{problem}: resuming from {checkpoint.name}, the newest intact checkpoint")
        return checkpoint
    if problems:
        more = f" (and {len(problems) - 1} earlier checkpoint(s) damaged too)" if len(problems) > 1 else ""
        raise SoragenError(f"cannot resume: {problems[0]}{more}; no intact checkpoint in {run_dir}")
    raise UsageError(f"--resume: {run_dir} has no complete checkpoint to resume from")


def _load_trained(module: torch.nn.Module, file: Path, what: str, trained: Callable) -> None:
    """Load the tensors `trained(module)` names (a LoRA's: a few MB) from `file`, strictly."""
    from soragen.core.weights import load_into
    if trained is whole:
        load_into(module, [file], what)
        return
    want, stored = trained(module), read_safetensors([file])
    if set(want) != set(stored) or any(stored[k].shape != want[k].shape for k in want):
        raise _damaged(file.parent.parent, f"cannot resume: {file} does not hold this run's adapter "
                                           f"({len(set(want) ^ set(stored))} names or shapes differ)")
    with torch.no_grad():
        for name, tensor in stored.items():
            if not torch.isfinite(tensor).all():
                raise _damaged(file.parent.parent, f"cannot resume: {what} {name} in {file} holds NaN or infinity")
            want[name].copy_(tensor)


def load_train_state(checkpoint: Path, raw: torch.nn.Module, ema: torch.nn.Module, optimizer,
                     trained: Callable[[torch.nn.Module], dict] = whole) -> dict:
    state_dir = checkpoint / "train_state"
    state = _state_json(checkpoint, "state.json")
    _load_trained(raw, state_dir / "model.safetensors", "checkpoint model", trained)
    _load_trained(ema, state_dir / "ema.safetensors", "checkpoint EMA", trained)
    meta = _state_json(checkpoint, "optimizer.json")
    try:
        _load_optimizer(optimizer, read_safetensors([state_dir / "optimizer.safetensors"]), meta)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _damaged(checkpoint, f"cannot resume: the optimizer state in {state_dir} does not fit this model "
                                   f"({type(err).__name__}: {err})") from err
    return state




def prepare_run_dir(out: Path, resume: bool, note: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from (the newest intact one), or None; refuses to mix a new run
    into an old one."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; a run is a folder: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoragenError(f"--out {out}: cannot make the run folder ({err.strerror or type(err).__name__})") from err
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            raise UsageError(f"--resume: {out} has no complete checkpoint to resume from")
        return resumable(out, note)
    if latest is not None:
        raise UsageError(f"{out} already holds checkpoints (latest {latest.name}); pass --resume to continue "
                         f"it or choose another --out")
    return None


def stored_run(checkpoint: Path, objective_class: type, older_defaults: dict | None = None) -> tuple:
    """(TrainConfig, objective) that a checkpoint's run was started with. Runs written before the
    objective had its own type kept it in the config's "extra"; `older_defaults` fills what those
    did not store."""
    state = _state_json(checkpoint, "state.json")
    path = checkpoint / "train_state" / "state.json"
    try:
        return _stored_run(state, objective_class, older_defaults)
    except (KeyError, TypeError, ValueError) as err:
        raise _damaged(checkpoint, f"cannot resume: {path}: {err}") from err


def stored_lora(checkpoint: Path) -> LoRAConfig:
    """The LoRA a checkpoint's run trains (rank 0: none; runs from before LoRA stored none)."""
    state = _state_json(checkpoint, "state.json")
    try:
        return from_dict(LoRAConfig, state.get("lora", {}))
    except (TypeError, ValueError) as err:
        raise _damaged(checkpoint, f"cannot resume: {checkpoint / 'train_state' / 'state.json'}: {err}") from err
