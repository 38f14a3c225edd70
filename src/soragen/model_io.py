"""The model folder: what `--model` accepts.

    model/
      soragen.json                  format version, the soragen that wrote it, video defaults
      dit/config.json  dit/model.safetensors
      vae/config.json  vae/diffusion_pytorch_model.safetensors     (diffusers layout)
      text_encoder.json             a hub id, a local path or "default"; never copied weights
      scheduler/scheduler_config.json

Safetensors only, strict keys, finite weights. A training run folder (checkpoint-STEP/ inside)
stands for its latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from soragen import __version__
from soragen.config import DiTConfig, SamplingDefaults, TextEncoderSpec, VideoDefaults, from_dict, to_json
from soragen.errors import SoragenError

FORMAT = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Model:
    dit: "VideoDiT"  # noqa: F821
    vae: "VideoVAE"  # noqa: F821
    text_spec: TextEncoderSpec
    video: VideoDefaults
    scheduler_config: dict
    sampling: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)
    path: Path | None = None


def default_model_dir() -> Path | None:
    """The model shipped inside the package, if this install has it."""
    folder = Path(__file__).parent / "weights" / "default"
    return folder if (folder / "soragen.json").is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint-STEP folder (complete = has soragen.json)."""
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "soragen.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resolve_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise SoragenError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise SoragenError(f"model {path} is not a folder")
    if (path / "soragen.json").is_file():
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise SoragenError(f"{path} is not a soragen model folder (no soragen.json) nor a run with a "
                           f"complete checkpoint")
    return checkpoint


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SoragenError(f"model folder is incomplete: {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SoragenError(f"{path} is not valid JSON: {err}") from err


def read_manifest(folder: Path) -> dict:
    manifest = _read_json(folder / "soragen.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format", 0), int):
        raise SoragenError(f"{folder / 'soragen.json'} is not a soragen manifest (needs an integer \"format\")")
    if manifest.get("format", 0) > FORMAT:
        raise SoragenError(f"{folder} was written by soragen {manifest.get('soragen_version')} in model "
                           f"format {manifest['format']}; this soragen {__version__} reads format {FORMAT}: upgrade")
    return manifest


def load_model(path: str | Path, load_vae_weights: bool = True) -> Model:
    import torch

    from soragen.dit import VideoDiT
    from soragen.vae import load_vae
    from soragen.weights import load_into

    folder = resolve_model_dir(path)
    manifest = read_manifest(folder)
    if manifest.get("kind") == "vae":
        raise SoragenError(f"{folder} holds only a VAE (from soragen train-vae); pass it to soragen train --vae")
    try:
        dit_config = from_dict(DiTConfig, _read_json(folder / "dit" / "config.json"))
        text_spec = from_dict(TextEncoderSpec, _read_json(folder / "text_encoder.json"))
        video = from_dict(VideoDefaults, manifest.get("video", {}))
        sampling = from_dict(SamplingDefaults, manifest.get("sampling", {}))
    except (TypeError, ValueError) as err:
        raise SoragenError(f"{folder}: bad config: {err}") from err
    with torch.device("meta"):  # no random init: every weight comes from the file
        dit = VideoDiT(dit_config)
    load_into(dit, [folder / "dit" / "model.safetensors"], "DiT")
    dit.eval().requires_grad_(False)
    vae = load_vae(folder / "vae")
    if vae.latent_channels != dit_config.in_channels:
        raise SoragenError(f"{folder}: the VAE has {vae.latent_channels} latent channels, "
                           f"the DiT expects {dit_config.in_channels}")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    return Model(dit, vae, text_spec, video, scheduler_config, sampling, folder)


def save_model(folder: str | Path, dit, vae, text_spec: TextEncoderSpec, video: VideoDefaults,
               scheduler_config: dict | None = None, sampling: SamplingDefaults | None = None,
               extra: dict | None = None, dit_dtype=None) -> Path:
    """Write a complete model folder under a temporary name, then rename it into place.
    `extra` adds files: {relative name: JSON-able object}; `dit_dtype` stores the DiT weights in
    another precision (they load back into float32)."""
    from soragen.sampling import SCHEDULER_CONFIG
    from soragen.vae import save_vae
    from soragen.weights import save_module

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "dit").mkdir(parents=True)
        (tmp / "dit" / "config.json").write_text(to_json(dit.config))
        save_module(dit, tmp / "dit" / "model.safetensors", "DiT", dit_dtype)
        save_vae(vae, tmp / "vae")
        (tmp / "text_encoder.json").write_text(to_json(text_spec))
        (tmp / "scheduler").mkdir()
        scheduler = {"_class_name": "DDIMScheduler", **SCHEDULER_CONFIG, **(scheduler_config or {})}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        for name, obj in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        # The manifest goes last: a folder with soragen.json is complete.
        manifest = {"format": FORMAT, "soragen_version": __version__, "video": dataclasses.asdict(video),
                    "sampling": dataclasses.asdict(sampling or SamplingDefaults())}
        (tmp / "soragen.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _fsync_tree(root: Path) -> None:
    """Flush every file so a crash after the rename cannot leave a complete-looking, empty folder."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
