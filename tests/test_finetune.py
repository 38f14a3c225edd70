"""Fine-tuning a pretrained flow model (a tiny random Wan pipeline saved by diffusers): flow matching,
LoRA trained with peft, adapters that move between soragen and diffusers' WanPipeline both ways."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES, STATE_FILE, assert_one_line_error, cli, make_tiny_model, torchrun_each
from soragen.models import lora as lora_io
from soragen.core.config import LoRAConfig
from soragen.io.model_folder import load_model
from soragen.diffusion.objectives import flow_loss
from soragen.models.text import TextEmbedding
from soragen.families.wan import FAMILY as WAN
from soragen.families.wan import from_diffusers
from soragen.io import lora_file
from soragen.tools.tiny_wan import tiny_pipeline

PROMPT = "a red ball moving right"


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "Wan-tiny"
    tiny_pipeline().save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from soragen.tools.shapes import make_dataset
    folder = tmp_path_factory.mktemp("data") / "clips"
    make_dataset(folder, n=4, seed=0, frames=9, size=32)
    return folder


def train_args(clips, out, init, cache, steps, *extra):
    """A short run; its end samples one prompt (the default is the shapes world's four)."""
    return ["train", "--init", init, "--data", clips, "--out", out, "--frames", 9, "--height", 32, "--width", 32,
            "--batch-size", 2, "--max-steps", steps, "--save-every", 2, "--warmup", 1, "--lr", "1e-2",
            "--cache-dir", cache, "--samples", SAMPLES, *extra]


def inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 3, 8, 8, generator=g), torch.tensor([900.0, 300.0][:batch]),
            torch.randn(batch, 7, 16, generator=g))


def ours_forward(dit, x, t, text):
    return dit(x, t, text, torch.ones(text.shape[:2], dtype=torch.bool), None)


def randomise_adapter(dit, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_io.trainable_state(dit).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode() + t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_lora_lowers_the_flow_loss_on_a_fixed_batch_and_changes_only_the_adapter():
    dit = from_diffusers(tiny_pipeline().transformer).float()
    torch.manual_seed(0)
    lora_io.add_lora(dit, LoRAConfig(lora_rank=4))
    base = {n: p for n, p in dit.named_parameters() if not p.requires_grad}
    trained = [p for p in dit.parameters() if p.requires_grad]
    assert sorted(n for n, p in dit.named_parameters() if p.requires_grad) == sorted(lora_io.trainable_state(dit))
    before = digest(base)
    g = torch.Generator().manual_seed(0)
    latents, tokens = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    text = TextEmbedding(tokens, torch.ones(2, 7, dtype=torch.bool), None)
    schedule = {"num_train_timesteps": 1000, "flow_shift": 3.0}
    optimizer = torch.optim.AdamW(trained, lr=1e-2)

    def loss():  # the same noise and levels every time: only the adapter changes
        return flow_loss(dit, schedule, latents, text, torch.Generator().manual_seed(5))
    first = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first
    assert digest(base) == before  # the base weights are bit for bit what they were


def test_our_adapter_in_diffusers_and_merged_give_the_same_prediction(tmp_path):
    pipe = tiny_pipeline()
    dit = from_diffusers(pipe.transformer).float()
    merged = from_diffusers(pipe.transformer).float()  # the plain model --lora merges the file into
    torch.manual_seed(0)
    lora_io.add_lora(dit, LoRAConfig(lora_rank=4, lora_alpha=8, lora_targets="attn,cross,ffn"))
    randomise_adapter(dit)
    x, t, text = inputs()
    with torch.no_grad():
        plain = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        ours = ours_forward(dit, x, t, text)
        lora_file.save(dit, tmp_path / "a.safetensors", WAN)
        pipe.load_lora_weights(str(tmp_path / "a.safetensors"))
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert (ours - plain).abs().max() > 0.1  # the adapter does something
        assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()
        lora_file.apply(merged, tmp_path / "a.safetensors", WAN)
        assert not lora_io.lora_layers(merged)
        assert (ours_forward(merged, x, t, text) - ours).abs().max() <= 1e-5


def test_an_adapter_made_by_diffusers_merges_into_ours(tmp_path):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = tiny_pipeline()
    base = from_diffusers(pipe.transformer).float()
    # q, k and v with their own A, an alpha that is not the rank: what diffusers' Wan trainers save
    pipe.transformer.add_adapter(LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                                "net.0.proj", "net.2", "proj_out"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                  transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert lora_file.apply(base, file, WAN) == 2 * 7 + 1  # per block: qkv, proj, q, kv, proj, two FFN; and the output
    x, t, text = inputs()
    with torch.no_grad():
        want = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert (ours_forward(base, x, t, text) - want).abs().max() <= 1e-4


@pytest.mark.slow
def test_a_lora_run_resumes_bit_for_bit_and_generates_as_base_plus_adapter(wan, clips, tmp_path):
    cache = tmp_path / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(*train_args(clips, straight, wan, cache, 4, "--lora-rank", 4)) == 0
    assert cli(*train_args(clips, resumed, wan, cache, 2, "--lora-rank", 4)) == 0
    assert cli(*train_args(clips, resumed, wan, cache, 4, "--lora-rank", 4, "--resume")) == 0
    checkpoint = straight / "checkpoint-4"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["lora.safetensors", "soragen.json", "train_state"]
    for name in ("lora.safetensors", f"train_state/dcp/{STATE_FILE}"):  # the weights, EMA and optimizer
        a, b = load_file(checkpoint / name), load_file(resumed / "checkpoint-4" / name)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(".lora_" in k for k in load_file(checkpoint / "train_state" / "dcp" / STATE_FILE))  # the adapter only
    losses = [line for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4
    # The run knows its base: --model RUN is --model BASE --lora RUN, frame for frame.
    args = ["--frames", 5, "--height", 32, "--width", 32, "--steps", 3, "--dtype", "float32"]
    assert cli("generate", PROMPT, "--model", straight, *args, "--out", tmp_path / "a") == 0
    assert cli("generate", PROMPT, "--model", wan, "--lora", checkpoint / "lora.safetensors", *args,
               "--out", tmp_path / "b") == 0
    assert cli("generate", PROMPT, "--model", wan, *args, "--out", tmp_path / "c") == 0
    from PIL import Image

    def frames(folder):
        return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])
    assert np.array_equal(frames(tmp_path / "a"), frames(tmp_path / "b"))
    assert not np.array_equal(frames(tmp_path / "a"), frames(tmp_path / "c"))  # the adapter changed the video
    # ... and the adapter file is diffusers': WanPipeline predicts what our merged DiT predicts.
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(checkpoint / "lora.safetensors"))
    merged = load_model(straight).dit
    x, t, text = inputs()
    with torch.no_grad():
        want = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        assert (ours_forward(merged, x, t, text) - want).abs().max() <= 1e-4


def test_wrong_adapters_and_objectives_are_one_line(wan, clips, tmp_path, capfd):
    other = from_diffusers(tiny_pipeline(head_dim=16).transformer).float()  # another model: 32-d, not 40-d
    torch.manual_seed(0)
    lora_io.add_lora(other, LoRAConfig(lora_rank=2))
    lora_file.save(other, tmp_path / "other.safetensors", WAN)
    args = ["--frames", 1, "--height", 32, "--width", 32, "--steps", 1, "--out", tmp_path / "v.mp4"]
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", wan, "--lora", tmp_path / "other.safetensors", *args)
    assert_one_line_error(capfd.readouterr(), 1, rc, "other.safetensors", "another model")
    (tmp_path / "adapter.pt").write_bytes(b"not read")
    rc = cli("generate", PROMPT, "--model", wan, "--lora", tmp_path / "adapter.pt", *args)
    assert_one_line_error(capfd.readouterr(), 1, rc, "adapter.pt", "safetensors")
    rc = cli("generate", PROMPT, "--model", wan, "--lora", tmp_path / "missing.safetensors", *args)
    assert_one_line_error(capfd.readouterr(), 1, rc, "missing.safetensors")
    assert not (tmp_path / "v.mp4").exists()
    rc = cli(*train_args(clips, tmp_path / "run", wan, tmp_path / "cache", 2, "--prediction", "v_prediction"))
    assert_one_line_error(capfd.readouterr(), 2, rc, "--prediction", "flow")
    rc = cli("train", "--data", clips, "--out", tmp_path / "run2", "--lora-rank", 4, "--preset", "test")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--init")
    rc = cli(*train_args(clips, tmp_path / "run3", wan, tmp_path / "cache", 2, "--lora-rank", 4,
                         "--lora-targets", "attn,mlp"))
    assert_one_line_error(capfd.readouterr(), 2, rc, "--lora-targets")


@pytest.mark.slow
def test_our_own_model_trains_by_flow_matching_and_samples_its_flow(clips, tmp_path):
    base = make_tiny_model(tmp_path / "base")
    out = tmp_path / "flow"
    assert cli("train", "--data", clips, "--out", out, "--vae", base, "--preset", "test", "--frames", 9, "--height",
               32, "--width", 32, "--batch-size", 2, "--max-steps", 2, "--save-every", 2, "--warmup", 1,
               "--cache-dir", tmp_path / "cache", "--objective", "flow", "--flow-shift", 2) == 0
    schedule = load_model(out).scheduler_config
    assert schedule["prediction_type"] == "flow_prediction" and schedule["flow_shift"] == 2.0
    for sampler in ("dpm++", "unipc", "euler"):
        assert cli("generate", PROMPT, "--model", out, "--steps", 2, "--sampler", sampler,
                   "--out", tmp_path / f"{sampler}.mp4") == 0
    assert cli("generate", PROMPT, "--model", out, "--steps", 2, "--sampler", "ddim",
               "--out", tmp_path / "ddim.mp4") == 2


def _allocated_peak(run) -> int:
    """Peak bytes in use by malloc (the heap's and mmapped blocks: every CPU tensor) while `run` runs,
    above what was in use before, sampled by a thread."""
    import ctypes
    import threading
    import time

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info

    def used():
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    start, top, done = used(), [0], threading.Event()

    def watch():
        while not done.is_set():
            top[0] = max(top[0], used())
            time.sleep(0.0002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return top[0] - start


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
@pytest.mark.parametrize("rank, checkpointing", [(0, False), (16, True)])
def test_the_dry_run_plan_is_within_a_quarter_of_what_a_training_step_allocates(rank, checkpointing):
    from soragen.core.config import DiTConfig
    from soragen.models.dit import VideoDiT
    from soragen.train.plan import training_plan
    from soragen.families.wan import WAN_SWITCHES
    config = DiTConfig(in_channels=4, patch_size=(1, 2, 2), hidden_size=384, depth=3, num_heads=4, ffn_dim=1536,
                       text_dim=64, **WAN_SWITCHES)
    batch, latent, text_tokens = 2, (4, 3, 32, 32), 32
    lora = LoRAConfig(lora_rank=rank)
    plan = training_plan(config, latent, batch, text_tokens, 64, lora, checkpointing)
    g = torch.Generator().manual_seed(0)
    latents, tokens = torch.randn(batch, *latent, generator=g), torch.randn(batch, text_tokens, 64, generator=g)
    text = TextEmbedding(tokens, torch.ones(batch, text_tokens, dtype=torch.bool), None)

    def train():  # what soragen.train.loop holds: the DiT, its adapter, the EMA, AdamW; two steps
        dit = VideoDiT(config).train()
        dit.gradient_checkpointing = checkpointing
        if rank:
            lora_io.add_lora(dit, lora)
        trained = [p for p in dit.parameters() if p.requires_grad]
        ema = copy.deepcopy(dit, memo={id(p): p for p in dit.parameters() if not p.requires_grad})
        optimizer = torch.optim.AdamW(trained, lr=1e-4)
        for step in range(2):
            optimizer.zero_grad(set_to_none=True)
            flow_loss(dit, {"flow_shift": 3.0}, latents, text, torch.Generator().manual_seed(step)).backward()
            optimizer.step()
        del ema
    measured = _allocated_peak(train)
    assert plan.parameters == sum(p.numel() for p in VideoDiT(config).parameters()) + plan.trainable * bool(rank)
    assert plan.trainable == plan.parameters if not rank else plan.trainable < plan.parameters / 10
    print(f"plan {plan.total / 2**20:.1f} MiB, allocated {measured / 2**20:.1f} MiB: {plan.total / measured:.2f}")
    assert 0.75 <= plan.total / measured <= 1.25, (plan.total, measured, plan.bytes)


@pytest.mark.slow
def test_fsdp_over_two_gloo_processes_matches_ddp_resumes_bit_for_bit_and_survives_a_cut_save(wan, clips, tmp_path):
    cache = tmp_path / "cache"
    sharded, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    # two processes, one clip each: a global batch of two; float32 on every CPU (with bf16 autocast FSDP
    # would gather bf16 weights where DDP keeps float32 ones, so the two would differ by more than rounding);
    # at --lr 1e-2 AdamW blows the two reductions' rounding up to more than 1e-5 within four steps
    one_each = ["--batch-size", 1, "--mixed-precision", "no", "--lr", "1e-3"]
    # one process group, in turn: FSDP; DDP; FSDP stopped at step 2, a save of it cut short by SIGKILL (its
    # temporary, rank 0's name, and no checkpoint-4), and its resume to step 4
    cut = resumed / ".checkpoint-4.tmp-999999999"
    plant = (f"from pathlib import Path\nfrom soragen.io.folders import latest_checkpoint\ncut = Path({str(cut)!r})\n"
             f"(cut / 'train_state' / 'dcp').mkdir(parents=True)\n"
             f"(cut / 'train_state' / 'dcp' / {STATE_FILE!r}).write_bytes(bytes(64))\n"
             f"assert latest_checkpoint(cut.parent).name == 'checkpoint-2', latest_checkpoint(cut.parent)\n")
    _, outputs = torchrun_each(2, train_args(clips, sharded, wan, cache, 4, *one_each, "--fsdp"),
                               train_args(clips, ddp, wan, cache, 4, *one_each),
                               train_args(clips, resumed, wan, cache, 2, *one_each, "--fsdp"), plant,
                               train_args(clips, resumed, wan, cache, 4, *one_each, "--fsdp", "--resume"),
                               tmp_path=tmp_path)
    assert outputs[0].count("trained to step 4") == 1
    state = json.loads((sharded / "checkpoint-4" / "train_state" / "state.json").read_text())
    assert state["sharded"] == 2 and len(list((sharded / "checkpoint-4" / "train_state" / "dcp").glob("*.safetensors"))) == 2
    a, b = load_file(sharded / "checkpoint-4" / "dit" / "model.safetensors"), load_file(ddp / "checkpoint-4" / "dit" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max() for k in a) <= 1e-5  # rank 0's full model folder
    assert [json.loads(x)["loss"] for x in (sharded / "metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([json.loads(x)["loss"] for x in (ddp / "metrics.jsonl").read_text().splitlines()], rel=1e-5)
    # stopped at 2 and resumed to 4: the straight run's weights, bit for bit
    assert not cut.exists()  # swept by the next save
    for name in ("dit/model.safetensors",):
        a, b = load_file(sharded / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # and a sharded checkpoint generates like any other
    assert cli("generate", PROMPT, "--model", resumed, "--frames", 1, "--height", 32, "--width", 32, "--steps", 1,
               "--out", tmp_path / "frames") == 0
