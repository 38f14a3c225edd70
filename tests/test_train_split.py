"""Training that any split of the global batch reproduces: each clip's draws come from (seed, step,
its index in the global batch), so one process with a batch of 4, two with 2 each (DDP and FSDP),
four with 1, and 2 x 2 accumulation steps (one process; two with FSDP) train the same run, and a
run resumes on another process count. The torchrun runs are real gloo process groups."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun, torchrun_each
from soragen.cli import run
from soragen.core.config import DiTObjective, LoRAConfig, TextEncoderSpec, VAEObjective, VideoDefaults, dit_preset
from soragen.diffusion.draws import ClipDraws

import test_train
from test_train import train_args

clips, model_for_vae = test_train.clips, test_train.model_for_vae  # its fixtures, here too


def dit_task(object_weight: float = 0.0, prediction: str = "v_prediction"):
    """A DiTTask over a test-size DiT and random cached latents: 5 clips of 3 windows each."""
    from soragen.models.dit import VideoDiT
    from soragen.train.latent_cache import LatentSamples
    from soragen.train.tasks import DiTTask, Start
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dit = VideoDiT(dit_preset("test", in_channels=4, text_dim=16)).train()
    samples = LatentSamples([torch.randn(3, 4, 3, 4, 4, generator=g) for _ in range(5)],
                            [torch.randn(2 + i, 16, generator=g) for i in range(5)],
                            [torch.randn(16, generator=g) for _ in range(5)], torch.zeros(1, 16), torch.zeros(16))
    objective = DiTObjective(prediction=prediction, object_weight=object_weight)
    task = DiTTask(dit, Start(vae=None, text_spec=TextEncoderSpec()), VideoDefaults(), samples, 0.5, objective,
                   LoRAConfig())
    return task, dit


def loss_and_grads(task, module, parts: list[tuple[list[int], list[int]]]):
    """The loss and gradients of a global batch given as parts (items, their global indices), each
    part's loss weighted by its share of the batch, as the loop's micro-batches and processes are."""
    module.zero_grad(set_to_none=True)
    total, count = 0.0, sum(len(items) for items, _ in parts)
    for items, indices in parts:
        loss = task.loss(module, items, ClipDraws(7, 3, indices)) * (len(items) / count)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prediction,object_weight", [("v_prediction", 0.0), ("flow", 2.0)])
def test_a_global_batch_has_the_same_loss_and_gradient_however_it_is_split(prediction, object_weight):
    task, dit = dit_task(object_weight, prediction)
    items = [4, 1, 3, 1]  # a clip may come twice in a batch (an epoch ends inside it): its draws differ
    whole = loss_and_grads(task, dit, [(items, [0, 1, 2, 3])])
    for split in ([(items[:2], [0, 1]), (items[2:], [2, 3])], [([i], [n]) for n, i in enumerate(items)]):
        part = loss_and_grads(task, dit, split)
        assert part[0] == pytest.approx(whole[0], rel=1e-6)
        assert all(torch.allclose(part[1][n], g, atol=1e-7, rtol=1e-5) for n, g in whole[1].items())
    # the draws follow the clip's place in the global batch, not its place in the micro-batch
    moved = loss_and_grads(task, dit, [(items, [1, 0, 2, 3])])
    assert moved[0] != pytest.approx(whole[0], rel=1e-4)


def test_a_clip_draws_its_window_caption_noise_and_level_from_its_own_generators():
    task, _ = dit_task()
    a = ClipDraws(0, 5, [0, 1, 2, 3])
    latents, text, _ = task.samples.batch([2, 2, 2, 2], a, 1.0)  # dropout 1: every caption empty
    assert not text.mask[:, 1:].any()
    windows = {int(torch.nonzero((task.samples.latents[2] == w).flatten(1).all(1))[0]) for w in latents}
    assert len(windows) > 1  # the same clip, other windows at other places
    b = ClipDraws(0, 5, [2, 9])
    assert torch.equal(a.randn((4, 3, 2), "noise")[2], b.randn((2, 3, 2), "noise")[0])
    assert not torch.equal(a.randn((4, 3, 2), "noise")[2], ClipDraws(0, 6, [2]).randn((1, 3, 2), "noise")[0])
    assert not torch.equal(a.randn((4, 3, 2), "noise")[2], ClipDraws(1, 5, [2]).randn((1, 3, 2), "noise")[0])


def test_the_vae_loss_of_a_batch_is_the_mean_of_its_clips():
    from soragen.core.config import vae_preset_config
    from soragen.diffusion.objectives import VAEWithLoss
    from soragen.models.vae import new_vae
    torch.manual_seed(0)
    objective = VAEObjective(kl_weight=1e-3, sample_posterior=True, detail_weight=3.0)
    module = VAEWithLoss(new_vae(vae_preset_config("test")).model.train(), objective.kl_weight, True, 3.0)
    video = torch.rand(3, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    video[1, :, :, 4:8, 4:8] = 1.0  # a small object in one clip: its detail weights differ from the others'
    whole = module(video, ClipDraws(0, 0, [0, 1, 2]))
    parts = [module(video[n:n + 1], ClipDraws(0, 0, [n])) for n in range(3)]
    assert float(whole) == pytest.approx(float(sum(parts) / 3), rel=1e-5)


def test_resuming_on_another_process_count_keeps_the_global_batch():
    from soragen.core.config import TrainConfig
    from soragen.core.errors import UsageError
    from soragen.train.loop import split_batch
    cfg = TrainConfig(batch_size=2, grad_accum=1)
    one = split_batch(cfg, 2, 1)
    assert (one.batch_size, one.grad_accum) == (2, 2)  # the micro-batch kept: it is what fits in memory
    four = split_batch(TrainConfig(batch_size=4, grad_accum=1), 1, 2)
    assert (four.batch_size, four.grad_accum) == (2, 1)
    odd = split_batch(TrainConfig(batch_size=3, grad_accum=2), 1, 2)
    assert (odd.batch_size, odd.grad_accum) == (3, 1)
    with pytest.raises(UsageError, match="global batch of 6 clips .* does not split into 4 equal parts"):
        split_batch(TrainConfig(batch_size=3, grad_accum=2), 1, 4)


def trained(checkpoint) -> dict[str, torch.Tensor]:
    """The raw weights and their EMA in a checkpoint's train_state/dcp/, whole (an FSDP run's shards
    put together by torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    folder = str(checkpoint / "train_state" / "dcp")
    stored = HuggingFaceStorageReader(folder).read_metadata().state_dict_metadata
    tensors = {k: torch.zeros(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()
               if k.startswith(("model.", "ema."))}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(folder), no_dist=True)
    return tensors


def furthest(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_by_four_two_by_two_four_by_one_ddp_fsdp_and_accumulation_train_the_same_run(clips, model_for_vae, tmp_path):
    cache, f32 = tmp_path / "cache", ["--mixed-precision", "no", "--lr", "1e-3"]

    def args(out, steps, batch, *extra):
        line = train_args(clips, tmp_path / out, model_for_vae, cache, steps, *f32, *extra)
        line[line.index("--batch-size") + 1] = str(batch)
        return line
    assert run(args("one", 4, 4)) == 0  # 1 x 4: checkpoint-2 and checkpoint-4
    assert run(args("accum", 2, 2, "--grad-accum", "2")) == 0
    # one process group, in turn: 2 x 2 with DDP and with FSDP, 2 x 1 x 2 accumulation steps with FSDP, and
    # a DDP run with the default mixed precision
    result, outputs = torchrun_each(2, args("ddp", 2, 2), args("fsdp", 2, 2, "--fsdp"),
                                    args("fsdp-accum", 2, 1, "--fsdp", "--grad-accum", "2"),
                                    train_args(clips, tmp_path / "amp", model_for_vae, cache, 2), tmp_path=tmp_path)
    for name in ("ddp", "amp"):  # only rank 0 reports and writes
        assert (tmp_path / name / "checkpoint-2" / "soragen.json").is_file()
        state = json.loads((tmp_path / name / "checkpoint-2" / "train_state" / "state.json").read_text())
        assert state["step"] == 2
    assert outputs[0].count("trained to step 2") == outputs[3].count("trained to step 2") == 1
    assert result.stdout.count("trained to step 2") == 4
    torchrun(4, *args("four", 2, 1))  # 4 x 1
    reference = trained(tmp_path / "one" / "checkpoint-2")
    model = load_file(tmp_path / "one" / "checkpoint-2" / "dit" / "model.safetensors")
    assert furthest(reference, trained(tmp_path / "one" / "checkpoint-4")) > 1e-3  # training moves the weights
    for other in ("ddp", "fsdp", "accum", "four", "fsdp-accum"):
        print(other, furthest(reference, trained(tmp_path / other / "checkpoint-2")))
        assert furthest(reference, trained(tmp_path / other / "checkpoint-2")) <= 1e-5, other
        assert furthest(model, load_file(tmp_path / other / "checkpoint-2" / "dit" / "model.safetensors")) <= 1e-5
        assert losses(tmp_path / other) == pytest.approx(losses(tmp_path / "one")[:2], rel=1e-5), other


@pytest.mark.slow
def test_a_run_stopped_on_two_processes_resumes_on_one_and_back(clips, model_for_vae, tmp_path, capfd):
    cache, f32 = tmp_path / "cache", ["--mixed-precision", "no", "--lr", "1e-3"]

    def args(out, steps, batch, *extra):
        line = train_args(clips, tmp_path / out, model_for_vae, cache, steps, *f32, *extra)
        line[line.index("--batch-size") + 1] = str(batch)
        return line
    assert run(args("straight", 4, 4)) == 0
    assert run(args("back", 2, 4)) == 0  # to be resumed on two processes
    assert run(args("three", 2, 3)) == 0  # a global batch of 3, to be resumed on two processes
    # on two processes, in turn: a run stopped at 2; the straight run's checkpoint-2 resumed by DDP to 4;
    # and a global batch that does not split over the processes: one line, before anything trains
    result, _ = torchrun_each(2, args("moved", 2, 2), args("back", 4, 4, "--resume"), args("three", 4, 3, "--resume"),
                              check=False, tmp_path=tmp_path)
    assert result.returncode != 0  # the third command's error (the first two succeeded, or it would not have run)
    assert "global batch of 3 clips (1 processes x --batch-size 3 x --grad-accum 1) does not split into 2" in \
        result.stderr
    capfd.readouterr()
    assert run(args("moved", 4, 2, "--resume")) == 0  # on one process: 2 micro-batches of 2
    assert "its global batch of 4 clips as --batch-size 2 x --grad-accum 2" in capfd.readouterr().err
    state = json.loads((tmp_path / "moved" / "checkpoint-4" / "train_state" / "state.json").read_text())
    assert (state["processes"], state["config"]["batch_size"], state["config"]["grad_accum"]) == (1, 2, 2)
    straight = trained(tmp_path / "straight" / "checkpoint-4")
    assert furthest(straight, trained(tmp_path / "moved" / "checkpoint-4")) <= 1e-5
    assert losses(tmp_path / "moved") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    assert furthest(straight, trained(tmp_path / "back" / "checkpoint-4")) <= 1e-5
    assert np.array_equal(sorted(p.name for p in (tmp_path / "three").glob("checkpoint-*")), ["checkpoint-2"])

