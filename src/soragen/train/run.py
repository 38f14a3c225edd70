"""The training runs `soragen train` and `soragen train-vae` start: what a run starts from (a new
DiT, an --init model, a LoRA on one, a resumed run), its clips and cached examples, then the loop
(soragen.train.loop). What is minimised is in soragen.diffusion.objectives; the DiT's examples come
from soragen.train.latent_cache.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

from soragen.core.atomic import atomic_path
from soragen.core.config import (DiTObjective, LoRAConfig, TextEncoderSpec, TrainConfig, VAEObjective,
                                 VideoDefaults, dit_preset, to_dict, vae_preset_config)
from soragen.core.errors import UsageError
from soragen.core.progress import MESSAGE, Progress
from soragen.core.options import check_multiple, option_error
from soragen.core.runtime import world_size
from soragen.diffusion.sampling import is_flow
from soragen.io.folders import latest_checkpoint
from soragen.io.model_folder import family, load_model, lora_target, read_manifest
from soragen.pipeline import resolve_device
from soragen.models.lora import add_lora
from soragen.models.vae import VideoVAE, load_vae, new_vae
from soragen.train.checkpoints import prepare_run_dir, resumable, stored_lora, stored_processes, stored_run
from soragen.train.data import require_clips, scan_clips
from soragen.train.image_cache import add_image_conditions
from soragen.train.latent_cache import build_samples
from soragen.train.loop import split_batch, train_loop
from soragen.train import optimizers
from soragen.train.parallel import Dist, init_distributed
from soragen.train.tasks import DiTTask, Start, Task, VAETask


def start_run(out: Path, resume: bool, cfg: TrainConfig, objective, device: str, progress: Progress | None,
              fsdp: bool = False):
    """Join the process group, pick the checkpoint to resume (rank 0 decides, the others follow),
    and on resume check it whole and take the run's stored config and objective (only --max-steps
    may change), and check that its optimizer runs here. Returns (dist, progress, checkpoint or
    None, cfg, objective)."""
    optimizers.check_available(cfg.optimizer, resolve_device(device), fsdp)  # before anything is made
    dist = init_distributed(device)
    progress = progress if dist.main else None
    note = (lambda line: progress(MESSAGE, 0, 0, line)) if progress else None
    resume_from = prepare_run_dir(out, resume, note) if dist.main else (resumable(out) if resume else None)
    dist.barrier()
    if resume_from is not None:
        # a DiT run from before the objective was stored predicted the noise
        older = {"prediction": "epsilon"} if isinstance(objective, DiTObjective) else {}
        stored_cfg, objective = stored_run(resume_from, type(objective), older)
        _check_optimizer(cfg.optimizer, stored_cfg.optimizer, resume_from, note)
        optimizers.check_available(stored_cfg.optimizer, dist.device, fsdp)
        saved_world = stored_processes(resume_from) or dist.world  # runs from before it was stored: as now
        cfg = split_batch(dataclasses.replace(stored_cfg, max_steps=cfg.max_steps), saved_world, dist.world)
        if note and saved_world != dist.world:
            note(f"resuming on {dist.world} process(es) a run saved on {saved_world}: its global batch of "
                 f"{cfg.batch_size * cfg.grad_accum * dist.world} clips as --batch-size {cfg.batch_size} x "
                 f"--grad-accum {cfg.grad_accum} on each")
    return dist, progress, resume_from, cfg, objective


def _check_optimizer(asked: str, stored: str, checkpoint: Path, note) -> None:
    """A run keeps its optimizer: another one asked for (other than the default, which a command line
    may not have named) is a usage error naming both."""
    if asked == stored:
        return
    if asked != "adamw":
        raise UsageError(f"--optimizer {asked}: the run in {checkpoint.parent} trains with --optimizer {stored}, "
                         f"which --resume keeps (its moments are stored that way); start a new run with --init "
                         f"{checkpoint} to change the optimizer")
    if note:
        note(f"resuming with the run's --optimizer {stored}")


def resolve_vae(source: str) -> VideoVAE:
    """--vae: a train-vae run (its latest checkpoint), a checkpoint, a model folder, a VAE folder or a hub id."""
    path = Path(source)
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None:
            path = checkpoint
        return load_vae(path)
    return load_vae(source)


def check_size(cfg: TrainConfig, multiple: int) -> None:
    for name, value in (("height", cfg.height), ("width", cfg.width)):
        check_multiple(name, value, multiple)


def scan(cfg: TrainConfig, progress: Progress | None):
    report = scan_clips(Path(cfg.data), cfg.frames, cfg.fps,
                        progress=(lambda d, n: progress("scan", d, n)) if progress else None)
    require_clips(report, cfg.data)
    if progress:
        progress(MESSAGE, 0, 0, report.summary())
        for line in report.skipped_details():
            progress(MESSAGE, 0, 0, "  skipped " + line)
    return report


def base_reference(init: str, model) -> str:
    """How a LoRA run names its base model: a hub id as given, a folder by its absolute path."""
    return str(Path(model.path).resolve()) if Path(init).exists() else init


def _dit_start(cfg: TrainConfig, text_source: str, vae_source: str | None, init: str | None,
               resume_from: Path | None, lora: LoRAConfig, expert: str = "") -> Start:
    if resume_from is not None:
        manifest = read_manifest(resume_from)
        if manifest.get("kind") == "lora":  # the base model, unmerged; the adapter comes from train_state/
            base = load_model(manifest["base"])
            dit = lora_target(base, expert, resume_from)
            return Start(base.vae, base.text_spec, dit, dit.config, base.sampling, base.scheduler_config,
                         manifest["base"], family(base), base.boundary, expert, base.image_inputs, base.image_encoder)
        model = load_model(resume_from)
        return Start(model.vae, model.text_spec, None, model.dit.config, model.sampling, model.scheduler_config,
                     family=family(model), image_inputs=model.image_inputs, image_encoder=model.image_encoder)
    if lora.lora_rank and not init:
        raise UsageError("--lora-rank adapts a pretrained model: give it --init (a model folder, a diffusers Wan "
                         "folder or a hub id)")
    if init:
        base = load_model(init)
        _check_expert(init, base, expert, lora)
        vae = base.vae
        if vae_source:  # move the DiT onto another VAE's latents, e.g. a fine-tuned one
            if lora.lora_rank:
                raise UsageError("--vae with --lora-rank: a LoRA keeps its base model's VAE")
            vae = resolve_vae(vae_source)
            if vae.latent_channels != base.dit.config.predicted_channels:
                raise UsageError(f"--vae {vae_source} makes {vae.latent_channels}-channel latents; the --init "
                                 f"DiT takes {base.dit.config.predicted_channels}")
        dit = base.dit_2 if expert == "low" else base.dit
        return Start(vae, base.text_spec, dit, dit.config, base.sampling, base.scheduler_config,
                     base_reference(init, base) if lora.lora_rank else None, family(base), base.boundary, expert,
                     base.image_inputs, base.image_encoder)
    if expert:
        raise UsageError(f"--expert {expert} names one of an --init model's two experts (Wan 2.2 A14B); give --init")
    if not vae_source:
        raise UsageError("soragen train needs a VAE: --vae RUN_DIR_OR_MODEL (train one with soragen "
                         "train-vae) or a pretrained Wan 2.1 VAE folder or hub id")
    return Start(resolve_vae(vae_source), TextEncoderSpec(source=text_source))


def check_first_frame(init: str | None, first_frame: float) -> None:
    """--first-frame: only on a model that makes videos from text or from an image (Wan 2.2
    TI2V-5B), checked before any weight is read; an image-to-video model starts from its first
    frames always."""
    if not first_frame:
        return
    from soragen.io.model_folder import image_inputs_at, model_configs
    if init is None or not image_inputs_at(init):
        raise UsageError("--first-frame: the model trained makes videos from text alone" if init is None else
                         f"--first-frame: --init {init} makes videos from text alone")
    if model_configs(init)[0].image_channels:
        raise UsageError(f"--first-frame: --init {init} is an image-to-video model, whose every batch starts from "
                         f"its clips' first frames")


def _check_expert(init: str, base, expert: str, lora: LoRAConfig) -> None:
    if base.dit_2 is None and expert:
        raise UsageError(f"--expert {expert} names one of two experts; --init {init} has one DiT")
    if base.dit_2 is not None and not expert:
        raise UsageError(f"--init {init} has two experts (Wan 2.2 A14B): fine-tune one of them at a time, with "
                         f"--expert high or --expert low and --lora-rank")
    if expert and not lora.lora_rank:
        raise UsageError(f"--expert {expert} fine-tunes a LoRA of one expert (the model folder keeps both): give "
                         f"--lora-rank")


def resolve_objective(objective: DiTObjective, start: Start) -> DiTObjective:
    """"auto" made concrete for the model trained; an objective that cannot train it refused."""
    from soragen.core.config import ConfigError
    flow = is_flow(start.schedule)
    try:
        objective = objective.resolved(flow)
    except ConfigError as err:
        raise option_error(err) from None
    if flow and objective.prediction != "flow":
        raise UsageError(f"--prediction {objective.prediction}: this model was trained by flow matching (its "
                         f"schedule is a flow's); fine-tune it with --prediction flow")
    return objective


def run_train(cfg: TrainConfig, objective: DiTObjective, *, out: Path, preset: str = "tiny",
              text_encoder: str = "default", vae: str | None = None, init: str | None = None, resume: bool = False,
              cache_dir: Path | None = None, windows: int = 4, device: str = "auto",
              sample_prompts: list[str] = (), progress: Progress | None = None,
              lora: LoRAConfig | None = None, fsdp: bool = False) -> dict:
    """Train the DiT of a new run, an --init model's (all of it, or a LoRA on it), or a resumed run's,
    to cfg.max_steps."""
    from soragen.models.dit import VideoDiT
    from soragen.models.text import TextEncoder

    lora = lora or LoRAConfig()
    if fsdp and world_size() < 2:
        raise UsageError("--fsdp shards the model across processes: start them with torchrun "
                         "(torchrun --nproc_per_node=N -m soragen train ... --fsdp)")
    check_first_frame(init, objective.first_frame)
    dist, progress, resume_from, cfg, objective = start_run(out, resume, cfg, objective, device, progress, fsdp)
    if resume_from is not None:
        lora = stored_lora(resume_from)
    start = _dit_start(cfg, text_encoder, vae, init, resume_from, lora, objective.expert)
    objective = resolve_objective(objective, start)
    encoder = TextEncoder(start.text_spec)
    dit_config = start.dit_config or dit_preset(preset, in_channels=start.vae.latent_channels, text_dim=encoder.dim)
    check_size(cfg, start.vae.spatial_factor * dit_config.patch_size[1])
    torch.manual_seed(cfg.seed)  # the initial weights
    dit = VideoDiT(dit_config) if start.dit is None else start.dit
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.train().requires_grad_(True)
    if lora.lora_rank:
        torch.manual_seed(cfg.seed)  # the adapter's initial A
        add_lora(dit, lora)

    report = scan(cfg, progress)
    image_encoder = _image_encoder(start)
    start.vae.use_fast_paths()  # encoding the clips is inference
    examples = functools.partial(_examples, report.clips, start, encoder, image_encoder, cfg, cache_dir, windows)
    if dist.main:
        samples = examples(progress)
    dist.barrier()
    if not dist.main:  # the cache is complete now: read it back
        samples = examples(None)
    start.vae.use_fast_paths(False)
    defaults = VideoDefaults(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=cfg.fps)
    task = DiTTask(dit, start, defaults, samples, cfg.caption_dropout, objective, lora)
    if sample_prompts:
        images = _sample_images(report.clips, cfg, start.image_inputs) if dit_config.image_channels else []
        task.sample_hook = _sample_hook(out, encoder, cfg, sample_prompts, image_encoder, images)
    return _run(task, cfg, objective, out, dist, resume_from, progress, fsdp)


def _examples(clips, start: Start, encoder, image_encoder, cfg: TrainConfig, cache_dir, windows: int, progress):
    """The clips' training examples; of an image-to-video model with each window's condition."""
    samples = build_samples(clips, start.vae, encoder, cfg, cache_dir, windows, progress)
    if start.dit_config is not None and start.dit_config.image_channels:  # the first (and last) frame given
        add_image_conditions(samples, clips, start.vae, image_encoder, start.image_inputs, cfg, cache_dir, windows,
                             progress)
    return samples


def _image_encoder(start: Start):
    if start.image_encoder is None:
        return None
    from soragen.models.image_encoder import ImageEncoder
    return ImageEncoder(start.image_encoder)


def _sample_images(clips, cfg: TrainConfig, images: int) -> list:
    """What an image-to-video model's sample videos start (and end) from: the first clip's frames."""
    from soragen.train.latent_cache import clip_windows
    window = clip_windows(clips[0], cfg, 1)[0]
    return [window[0], window[-1]][:images]


def _run(task: Task, cfg: TrainConfig, objective, out: Path, dist: Dist, resume_from: Path | None,
         progress: Progress | None, fsdp: bool = False) -> dict:
    task.objective = objective
    if dist.main:
        with atomic_path(out / "train_config.json") as tmp:
            tmp.write_text(json.dumps({"config": to_dict(cfg), "objective": dataclasses.asdict(objective)},
                                      indent=2) + "\n")
    result = train_loop(task, cfg, out, dist, resume_from, progress, fsdp)
    if dist.main:
        _finish(out, progress)
    return result


def _sample_hook(out: Path, text_encoder, cfg: TrainConfig, prompts: list[str], image_encoder=None,
                 images: list = ()):
    """Videos of `prompts` from a checkpoint, made as `soragen generate --model CHECKPOINT` makes them
    (its sampling settings, the auto dtype, seeds 0, 1, ...), at the steps cfg.sample_every says;
    an image-to-video model's from `images`."""
    def hook(checkpoint: Path, step: int) -> None:
        if step != cfg.max_steps and (not cfg.sample_every or step % cfg.sample_every):
            return
        from soragen.pipeline import Pipeline, resolve_dtype
        from soragen.io.video import write_video
        device = torch.device("cpu")
        pipe = Pipeline.from_model(load_model(checkpoint), text_encoder, device, resolve_dtype("auto", device),
                                   image_encoder=image_encoder)
        folder = out / "samples" / f"step-{step:06d}"
        given = dict(zip(("image", "last_image"), images))
        for i, prompt in enumerate(prompts):
            write_video(folder / f"{i:02d}.mp4", pipe.generate(prompt, seed=i, **given), pipe.model.video.fps)
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return hook


def _finish(out: Path, progress: Progress | None) -> None:
    from soragen.io.plots import loss_curve_png
    png = loss_curve_png(out / "metrics.jsonl", out / "loss.png")
    if progress and png:
        progress(MESSAGE, 0, 0, f"loss curve: {png}")


def run_train_vae(cfg: TrainConfig, objective: VAEObjective, *, out: Path, preset: str = "tiny",
                  init: str | None = None, resume: bool = False, device: str = "auto",
                  progress: Progress | None = None) -> dict:
    """Train a VAE from scratch (a preset), from --init's weights, or a resumed run's."""
    if objective.decoder_only and not (init or resume):
        raise UsageError("--decoder-only fine-tunes a trained VAE: give it --init")
    dist, progress, resume_from, cfg, objective = start_run(out, resume, cfg, objective, device, progress)
    if resume_from is not None:
        vae = load_vae(resume_from / "vae")
    elif init:  # fine-tune an existing VAE (e.g. on longer clips) with a fresh optimizer
        vae = resolve_vae(init)
    else:
        torch.manual_seed(cfg.seed)
        vae = new_vae(vae_preset_config(preset))
    check_size(cfg, vae.spatial_factor)
    crop = objective.crop
    if crop and (crop % vae.spatial_factor or crop > min(cfg.height, cfg.width)):
        raise UsageError(f"--crop must be a multiple of {vae.spatial_factor} no larger than "
                         f"{min(cfg.height, cfg.width)}, not {crop}")
    report = scan(cfg, progress)
    return _run(VAETask(vae, report.clips, cfg, objective), cfg, objective, out, dist, resume_from, progress)
