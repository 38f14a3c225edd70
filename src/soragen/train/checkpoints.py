"""A training run's checkpoints: checkpoint-STEP/ is a complete model folder plus train_state/:
dcp/ (raw weights, EMA, optimizer moments, by torch.distributed.checkpoint as safetensors: one
file in one process and under DDP, one per process under FSDP; soragen.train.train_state) and
state.json (the step, the run's config and objective, what each file of dcp/ holds). Written under
a temporary name and renamed when complete, so a crash at any moment leaves the previous
checkpoint as the latest. Resuming checks a checkpoint whole (every JSON file and every
safetensors header, the adapter and the model folder too) before the run does anything else, and
resumes from the newest checkpoint that is whole, naming each damaged one; the rotation never
removes an intact checkpoint while it keeps a damaged one. Checkpoints written before dcp/ are
read by soragen.train.legacy_state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from soragen.core.atomic import publish, remove, staging, sweep
from soragen.core.config import LoRAConfig, TrainConfig, from_dict
from soragen.core.errors import SoragenError, UsageError
from soragen.io.folders import CHECKPOINT_RE, latest_checkpoint
from soragen.train import legacy_state, train_state


def save_checkpoint(run_dir: Path, step: int, write_model: Callable[[Path], None], tensors: Callable[[], dict],
                    record: dict, keep_last: int, dist, every_process: bool = False) -> Path | None:
    """checkpoint-STEP/: the model folder (`write_model(folder)`; rank 0 writes it, every process of
    a sharded run takes part) + train_state/: dcp/, the tensors `tensors()` gives (the trained
    weights, their EMA, the optimizer's moments), written by every process (`every_process`: FSDP)
    or by rank 0 alone (one process, DDP), and state.json, the one record of the run: `record` (the
    kind of run, counters, the config and objective), the step and what dcp/ holds. Complete before
    it gets its name; returns it on rank 0, None on the others."""
    if not (every_process or dist.main):
        return None
    sync = dist.barrier if every_process else (lambda: None)
    final = run_dir / f"checkpoint-{step}"
    folder = _staging(final, dist, every_process)
    if dist.main:
        sweep(run_dir)
        remove(folder)  # a leftover of the same step from a killed run
    try:
        write_model(folder)
        state_dir = folder / "train_state"
        if dist.main:
            state_dir.mkdir()
        sync()
        train_state.write(state_dir / train_state.DIR, tensors(), alone=not every_process)
        sync()
        if dist.main:
            listed = train_state.listing(state_dir / train_state.DIR)
            sharded = {"sharded": dist.world} if every_process else {}
            (state_dir / "state.json").write_text(train_state.record_json({
                "step": step, **record, **sharded,
                "rng": "derived: each clip's draws from (seed, step, its index in the global batch); epoch e's order "
                       "from (seed, e)",
                }, listed))
            publish(folder, final)
    except BaseException:
        if dist.main:
            remove(folder)
        raise
    if dist.main:
        prune(run_dir, keep_last)  # only now, with the new one complete, may old checkpoints go
    sync()
    return final if dist.main else None


def _staging(final: Path, dist, every_process: bool) -> Path:
    """The temporary name rank 0 writes `final` under, known to every process that writes."""
    if not every_process or dist.world == 1:
        return staging(final)
    names = [str(staging(final))] if dist.main else [None]
    torch.distributed.broadcast_object_list(names, src=0)
    return Path(names[0])


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
# folder, a LoRA run's adapter, a train-vae run's VAE).
HOLDS = {"dit": ["soragen.json", "dit/config.json", "dit/model.safetensors", "vae/config.json", "text_encoder.json",
                 "scheduler/scheduler_config.json"],
         "lora": ["soragen.json", "lora.safetensors"], "vae": ["soragen.json", "vae/config.json"]}


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
    file, and the training state means something (its config and LoRA in range, each file of dcp/
    holding the tensors state.json lists, in their shapes; no file missing or unlisted). SoragenError naming the first damaged
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
    for name in holds:
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
    _check_train_state(checkpoint / "train_state", state)


def _check_train_state(state_dir: Path, state: dict) -> None:
    listed, shards = state.get(train_state.DIR), state.get("sharded")
    if listed is not None:
        train_state.check(state_dir / train_state.DIR, listed, state_dir / "state.json")
    elif shards:  # an FSDP run's from before state.json listed dcp/: one file per process
        files = sorted((state_dir / train_state.DIR).glob("*.safetensors"))
        if not isinstance(shards, int) or len(files) != shards:
            raise SoragenError(f"{state_dir / train_state.DIR} holds {len(files)} shard files, its state.json says "
                               f"{shards}")
    elif (state_dir / train_state.DIR).exists():
        raise SoragenError(f"{state_dir / 'state.json'} is damaged: it does not list the files of "
                           f"{train_state.DIR}/")
    else:
        legacy_state.check(state_dir)


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


def load_train_state(checkpoint: Path, tensors: Callable[[], dict], dist, sharded: bool = False,
                     legacy: Callable[[Path], None] | None = None) -> tuple[dict, dict | None]:
    """state.json's record, and the tensors `tensors()` gives (this run's, as save_checkpoint took
    them) filled from train_state/dcp/; a checkpoint of an unsharded run from before dcp/ is read
    by `legacy(train_state)` instead (then None for the tensors). Every process of a sharded run
    (`sharded`) reads its part; anything that does not fit this run names the checkpoint."""
    state = _state_json(checkpoint, "state.json")
    state_dir = checkpoint / "train_state"
    if bool(state.get("sharded")) != sharded:
        how = "with --fsdp: it was saved by an unsharded run" if sharded else \
            "without --fsdp: it was saved by a sharded run (--fsdp under torchrun resumes it)"
        raise _damaged(checkpoint, f"cannot resume {checkpoint} {how}; train it on with --init {checkpoint} instead")
    saved, bad = None, None
    try:
        if train_state.DIR not in state and not sharded and legacy is not None:
            legacy(state_dir)
        else:
            saved = tensors()
            bad = train_state.load(state_dir / train_state.DIR, saved, alone=not sharded)
    except SoragenError:
        raise
    except Exception as err:  # ValueError of ours; torch.distributed.checkpoint raises CheckpointException and others
        raise _damaged(checkpoint, f"cannot resume: the training state in {state_dir} does not fit this model "
                                   f"({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]})") from err
    if not (dist.all_agree(bad is None) if sharded else bad is None):
        raise _damaged(checkpoint, f"cannot resume: {bad or 'a tensor of another process'} in "
                                   f"{state_dir / train_state.DIR} holds NaN or infinity")
    return state, saved


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


def stored_processes(checkpoint: Path) -> int | None:
    """How many processes trained a checkpoint's run (None: a run from before this was stored)."""
    value = _state_json(checkpoint, "state.json").get("processes")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def stored_lora(checkpoint: Path) -> LoRAConfig:
    """The LoRA a checkpoint's run trains (rank 0: none; runs from before LoRA stored none)."""
    state = _state_json(checkpoint, "state.json")
    try:
        return from_dict(LoRAConfig, state.get("lora", {}))
    except (TypeError, ValueError) as err:
        raise _damaged(checkpoint, f"cannot resume: {checkpoint / 'train_state' / 'state.json'}: {err}") from err
