"""The model folder: what `--model` accepts, for every model family.

    model/
      soragen.json                  format version, the soragen that wrote it, its family, video defaults
      dit/config.json  dit/model.safetensors
      vae/config.json  vae/diffusion_pytorch_model.safetensors     (diffusers layout)
      text_encoder.json             a hub id, a local path or "default"; never copied weights
      scheduler/scheduler_config.json

Safetensors only, strict keys, finite weights. A training run folder (checkpoint-STEP/ inside)
stands for its latest complete checkpoint; a folder in another tool's layout is read by the family
that recognises it (soragen.families.registry).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from soragen import __version__
from soragen.core.atomic import atomic_path
from soragen.core.config import (DEFAULT_TEXT_ENCODER, DiTConfig, ImageEncoderSpec, SamplingDefaults, TextEncoderSpec,
                                 VideoDefaults, from_dict, to_dict, to_json)
from soragen.core.errors import SoragenError
from soragen.core.jsonfile import INCOMPLETE, read_json
from soragen.families.base import Family
from soragen.families.registry import DEFAULT, family_of, named
from soragen.io.folders import HUB_ID_RE, resolve_model_dir
from soragen.models.model import Model

FORMAT = 1
MAX_LORA_CHAIN = 8  # a LoRA run's base may be a LoRA run: this many, no cycle


def read_manifest(folder: Path) -> dict:
    manifest = read_json(folder / "soragen.json", INCOMPLETE)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format", 0), int):
        raise SoragenError(f"{folder / 'soragen.json'} is not a soragen manifest (needs an integer \"format\")")
    if manifest.get("format", 0) > FORMAT:
        raise SoragenError(f"{folder} was written by soragen {manifest.get('soragen_version')} in model "
                           f"format {manifest['format']}; this soragen {__version__} reads format {FORMAT}: upgrade")
    return manifest


def read_config(cls, path: Path, data=None, prefix: str = ""):
    """A config dataclass from a JSON file (or from `data`, a part of one): SoragenError naming
    the file and the field when a value is of the wrong type or out of range."""
    data = read_json(path, INCOMPLETE) if data is None else data
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as err:
        raise SoragenError(f"{path}: {prefix}{err}") from err


def _check_text_source(spec: TextEncoderSpec, path: Path) -> None:
    """A text encoder named by a path must exist: said here, not as transformers' 'bad repo id'."""
    source = spec.source
    if source == DEFAULT_TEXT_ENCODER:
        return
    if Path(source).exists():  # checked now, before any weight is read: data, never code
        from soragen.models.text import check_encoder_folder
        check_encoder_folder(source, spec.subfolder, spec.tokenizer_subfolder)
        return
    looks_like_path = source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1
    if looks_like_path:
        raise SoragenError(f"{path}: text encoder folder {source!r} does not exist")
    if not HUB_ID_RE.match(source):
        raise SoragenError(f"{path}: text encoder {source!r} is neither a folder nor a hub id (name or org/name)")


def _defaults(folder: Path, manifest: dict) -> tuple[VideoDefaults, SamplingDefaults]:
    video = read_config(VideoDefaults, folder / "soragen.json", manifest.get("video", {}), "video.")
    sampling = read_config(SamplingDefaults, folder / "soragen.json", manifest.get("sampling", {}), "sampling.")
    return video, sampling


def _load_lora_model(folder: Path, manifest: dict, dtype, depth: int) -> Model:
    """A LoRA run's checkpoint: its base model with the adapter merged into the DiT's weights."""
    from soragen.io.lora_file import FILE, apply
    base = manifest.get("base")
    if not isinstance(base, str) or not base:
        raise SoragenError(f"{folder / 'soragen.json'}: a LoRA checkpoint must name its base model (\"base\")")
    if depth >= MAX_LORA_CHAIN:
        raise SoragenError(f"{folder}: more than {MAX_LORA_CHAIN} LoRA runs built on one another (a cycle?)")
    video, sampling = _defaults(folder, manifest)
    if not (folder / FILE).is_file():
        raise SoragenError(f"model folder is incomplete: {folder / FILE} is missing")
    model = load_model(base, dtype, _depth=depth + 1)
    apply(lora_target(model, manifest.get("expert", ""), folder), folder / FILE, family(model), 1.0,
          what=f"{folder / FILE}")
    return dataclasses.replace(model, video=video, sampling=sampling, path=folder)


def lora_target(model: Model, expert: str, folder: Path):
    """The DiT a LoRA run's adapter belongs to: the model's, or of two experts the one it names."""
    if expert not in ("", "high", "low") or bool(expert) != (model.dit_2 is not None):
        raise SoragenError(f"{folder / 'soragen.json'}: expert {expert!r} does not fit its base model "
                           f"({'two experts: high or low' if model.dit_2 is not None else 'one DiT'})")
    return model.dit_2 if expert == "low" else model.dit


def family(model: Model) -> Family:
    """The family a loaded model belongs to."""
    return model.family or named(DEFAULT, model.path or "model")


def save_lora_model(folder: str | Path, dit, base: str, lora, video: VideoDefaults,
                    sampling: SamplingDefaults | None = None, base_family: Family | None = None,
                    expert: str = "") -> Path:
    """A LoRA run's model folder: the adapter (in the layout its base's family names) and a manifest
    naming the base model (and of two experts, the one it adapts), written under a temporary name and
    renamed into place."""
    from soragen.io.lora_file import FILE, save
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save(dit, tmp / FILE, base_family or named(DEFAULT, folder))
        manifest = {"format": FORMAT, "soragen_version": __version__, "kind": "lora", "base": base,
                    **({"expert": expert} if expert else {}),
                    "lora": dataclasses.asdict(lora), "video": dataclasses.asdict(video),
                    "sampling": to_dict(sampling or SamplingDefaults())}
        (tmp / "soragen.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _open(path: str | Path) -> tuple[Path, dict | None]:
    """The folder `path` names and its manifest (None for a folder in another tool's layout)."""
    folder = resolve_model_dir(path)
    if not (folder / "soragen.json").is_file():
        return folder, None
    manifest = read_manifest(folder)
    if manifest.get("kind") == "vae":
        raise SoragenError(f"{folder} holds only a VAE (from soragen train-vae); pass it to soragen train --vae")
    return folder, manifest


def load_model(path: str | Path, dtype=None, _depth: int = 0) -> Model:
    """The model in a folder (or a run's latest checkpoint, a folder a family recognises, a hub id).
    Everything a file says is checked before it is used: configs for types and ranges, weights
    against the configs by their headers, and only then is anything built or read. The DiT's
    weights are read into `dtype` (default float32), so a large one is held once, not twice."""
    import torch

    folder, manifest = _open(path)
    if manifest is None:
        source = str(folder.resolve()) if Path(path).exists() else str(path)  # a hub id names the text encoder
        return family_of(folder, None).load(folder, source, dtype or torch.float32)
    if manifest.get("kind") == "lora":
        return _load_lora_model(folder, manifest, dtype, _depth)
    return _load_soragen_folder(folder, manifest, dtype or torch.float32)


def _load_soragen_folder(folder: Path, manifest: dict, dtype) -> Model:
    import torch

    from soragen.core.weights import check_header, load_into, read_header
    from soragen.diffusion.sampling import check_sampler, read_schedule
    from soragen.models.dit import VideoDiT
    from soragen.models.model import check_latent_channels
    from soragen.models.vae import load_vae

    kin = family_of(folder, manifest)
    dit_config, text_spec = _soragen_configs(folder)
    video, sampling = _defaults(folder, manifest)
    scheduler_config = read_schedule(folder)
    check_sampler(sampling.sampler, scheduler_config, folder / "soragen.json")
    boundary = _boundary(folder, manifest)
    experts = []
    for name in ("dit", "dit_2") if boundary is not None else ("dit",):  # checked by their headers first
        config = dit_config if name == "dit" else read_config(DiTConfig, folder / name / "config.json")
        stored = read_header([folder / name / "model.safetensors"])
        with torch.device("meta"):  # no memory and no random init: every weight comes from the file
            experts.append(VideoDiT(config).cast("meta", dtype))
        check_header(experts[-1], stored, f"DiT ({folder / name / 'config.json'})")
    vae = load_vae(folder / "vae")
    check_latent_channels(dit_config, vae, folder)
    for name, dit in zip(("dit", "dit_2"), experts):
        load_into(dit, [folder / name / "model.safetensors"], "DiT")
        dit.eval().requires_grad_(False)
    image_encoder = read_config(ImageEncoderSpec, folder / "image_encoder.json") \
        if (folder / "image_encoder.json").exists() else None
    if bool(image_encoder) != bool(dit_config.image_dim):
        raise SoragenError(f"{folder}: its DiT {'takes' if dit_config.image_dim else 'takes no'} an image encoder's "
                           f"tokens, and image_encoder.json {'is missing' if dit_config.image_dim else 'names one'}")
    return Model(experts[0], vae, text_spec, video, scheduler_config, sampling, folder, kin,
                 experts[1] if boundary is not None else None, boundary, _image_inputs(manifest), image_encoder)


def _boundary(folder: Path, manifest: dict) -> float | None:
    """A two-expert model's boundary timestep (soragen.json "boundary"; the second expert in dit_2/)."""
    boundary = manifest.get("boundary")
    if boundary is None:
        return None
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 < boundary < 100_000:
        raise SoragenError(f"{folder / 'soragen.json'}: boundary must be a timestep above 0, got {boundary!r}")
    return float(boundary)


def _soragen_configs(folder: Path, check_text: bool = True) -> tuple[DiTConfig, TextEncoderSpec]:
    dit_config = read_config(DiTConfig, folder / "dit" / "config.json")
    text_spec = read_config(TextEncoderSpec, folder / "text_encoder.json")
    if check_text:
        _check_text_source(text_spec, folder / "text_encoder.json")
    return dit_config, text_spec


def _open_base(path: str | Path) -> tuple[Path, dict | None]:
    """`_open` of the model `path` names, or for a LoRA run of the base model below it."""
    folder, manifest = _open(path)
    for _ in range(MAX_LORA_CHAIN):
        if manifest is None or manifest.get("kind") != "lora":
            break
        folder, manifest = _open(manifest["base"])
    return folder, manifest


def family_at(path: str | Path) -> Family:
    """The family of the model `path` names (a LoRA run: its base's), from its manifest or layout
    alone: what a command checks before it loads any weight."""
    folder, manifest = _open_base(path)
    found = family_of(folder, manifest)
    if found is None:
        raise SoragenError(f"{folder}: no model family soragen knows reads this folder")
    return found


def image_inputs_at(path: str | Path) -> int:
    """How many images the model `path` names can start (and end) a video from, by its manifest or
    its family, before any weight is loaded."""
    folder, manifest = _open_base(path)
    return _image_inputs(manifest) if manifest is not None else family_of(folder, None).image_inputs(folder)


def _image_inputs(manifest: dict) -> int:
    inputs = manifest.get("image_inputs", 0)
    return inputs if isinstance(inputs, int) and not isinstance(inputs, bool) and 0 <= inputs <= 2 else 0


def model_configs(path: str | Path) -> tuple[DiTConfig, TextEncoderSpec, Path]:
    """The DiT config, the text encoder and the VAE folder of a model (a LoRA run: of its base),
    without reading any DiT weight: what `train --dry-run` plans with."""
    folder, manifest = _open_base(path)
    if manifest is None:
        return (*family_of(folder, None).configs(folder), folder / "vae")
    return (*_soragen_configs(folder, check_text=False), folder / "vae")


# What save_model writes (export passes no extra files): the only entries a folder that export
# replaces may hold, so that replacing it removes nothing export did not write.
MODEL_FILES = frozenset({"soragen.json", "text_encoder.json", "image_encoder.json", "dit", "dit/config.json", "dit/model.safetensors",
                         "dit_2", "dit_2/config.json", "dit_2/model.safetensors",
                         "vae", "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler",
                         "scheduler/scheduler_config.json"})


def model_sources(path: str | Path) -> list[Path]:
    """Every folder loading `path` reads: the one it names, the one it resolves to (a run's latest
    checkpoint, a hub id's snapshot), and for a LoRA run each base model below it."""
    sources = []
    for _ in range(MAX_LORA_CHAIN + 1):
        if Path(path).exists():
            sources.append(Path(path).resolve())
        folder = resolve_model_dir(path)
        sources.append(folder.resolve())
        manifest = read_manifest(folder) if (folder / "soragen.json").is_file() else {}
        if manifest.get("kind") != "lora" or not isinstance(manifest.get("base"), str):
            break
        path = manifest["base"]
    return sources


def check_export_target(out: Path, force: bool, sources: list[Path] = ()) -> None:
    """Refuse an export destination whose replacing would remove what export did not write: a file,
    a link, a folder holding anything but an earlier export (and that only with --force), a folder
    that is, holds or lies inside a model it reads; and one that cannot be written."""
    out = Path(out)
    target = out.absolute().resolve()
    for source in sources:
        how = ("is" if target == source else "holds" if source.is_relative_to(target)
               else "is inside" if target.is_relative_to(source) else None)
        if how:
            raise SoragenError(f"refusing to export into {out}: it {how} the model it exports from ({source}); "
                               f"choose a folder outside it")
    if out.is_symlink():
        raise SoragenError(f"refusing to export into {out}: it is a symbolic link; name a folder of its own")
    if out.exists() and not out.is_dir():
        from soragen.core.jsonfile import not_regular
        raise SoragenError(f"refusing to export into {out}: it is {not_regular(out) or 'a file'}, and export writes "
                           f"a folder; choose another path")
    if out.is_dir():
        entries = [(Path(root) / name).relative_to(out).as_posix() for root, folders, files in os.walk(out)
                   for name in folders + files]  # links to folders are entries, never followed
        foreign = sorted(e for e in entries if e not in MODEL_FILES)
        if foreign:
            raise SoragenError(f"refusing to export into {out}: it holds {foreign[0]}"
                               f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which soragen "
                               f"export did not write; choose an empty or new folder")
        if entries and not force:
            raise SoragenError(f"refusing to replace {out}: it holds an earlier export; pass --force to replace it "
                               f"(as a whole)")
    parent = out.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SoragenError(f"cannot write {out}: {parent} is a file, not a folder")
    import tempfile
    try:  # the one sure test that a folder can be made there: make one (and remove it)
        os.rmdir(tempfile.mkdtemp(prefix=".soragen-probe-", dir=parent))
    except OSError as err:
        raise SoragenError(f"cannot write {out}: no folder can be made in {parent} "
                           f"({err.strerror or type(err).__name__})") from err


def save_model(folder: str | Path, dit, vae, text_spec: TextEncoderSpec, video: VideoDefaults,
               scheduler_config: dict | None = None, sampling: SamplingDefaults | None = None,
               extra: dict | None = None, dit_dtype=None, family_name: str = DEFAULT, image_inputs: int = 0,
               dit_2=None, boundary: float | None = None, image_encoder: ImageEncoderSpec | None = None) -> Path:
    """Write a complete model folder under a temporary name, then rename it into place.
    `extra` adds files: {relative name: JSON-able object}; `dit_dtype` stores the DiT weights in
    another precision (they load back into float32); `family_name` is written to the manifest
    unless it is soragen's own (a folder that names none is soragen's)."""
    from soragen.core.weights import save_module
    from soragen.diffusion.sampling import SCHEDULER_CONFIG, is_flow
    from soragen.models.vae import save_vae

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder) as tmp:
        for name, module in (("dit", dit), ("dit_2", dit_2)) if dit_2 is not None else (("dit", dit),):
            (tmp / name).mkdir(parents=True)
            (tmp / name / "config.json").write_text(to_json(module.config))
            save_module(module, tmp / name / "model.safetensors", "DiT", dit_dtype)
        save_vae(vae, tmp / "vae")
        (tmp / "text_encoder.json").write_text(to_json(text_spec))
        if image_encoder is not None:  # by reference, as the text encoder
            (tmp / "image_encoder.json").write_text(to_json(image_encoder))
        (tmp / "scheduler").mkdir()
        if is_flow(scheduler_config):  # a flow model's schedule is its own (Wan's UniPC with flow sigmas)
            scheduler = {"_class_name": "UniPCMultistepScheduler", **scheduler_config}
        else:
            scheduler = {"_class_name": "DDIMScheduler", **SCHEDULER_CONFIG, **(scheduler_config or {})}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        for name, obj in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        # The manifest goes last: a folder with soragen.json is complete.
        manifest = {"format": FORMAT, "soragen_version": __version__,
                    **({"family": family_name} if family_name != DEFAULT else {}),
                    **({"image_inputs": image_inputs} if image_inputs else {}),
                    **({"boundary": boundary} if dit_2 is not None else {}),
                    "video": dataclasses.asdict(video), "sampling": to_dict(sampling or SamplingDefaults())}
        (tmp / "soragen.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
