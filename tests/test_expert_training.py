"""Fine-tuning one of Wan 2.2 A14B's two experts (train --expert high|low --lora-rank R): the adapter
goes into that expert alone, is trained at the noise levels of that expert's steps only, resumes,
and loads into diffusers' WanPipeline (`load_into_transformer_2` for the low-noise expert) with the
prediction our merged expert makes. A LoRA trained on Wan 2.2 TI2V-5B loads there too."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, cli, listing
from soragen.tools.tiny_wan import tiny_pipeline

import test_finetune
from test_finetune import train_args

clips = test_finetune.clips  # its fixture, here too

PROMPT = "a red ball moving right in the blue sky"


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22") / "Wan-a14b-tiny"
    tiny_pipeline(experts=2).save_pretrained(folder, max_shard_size="40KB")
    return folder


def prediction(transformer, seed: int = 1):
    """diffusers' transformer on fixed random inputs, at a high and a low timestep."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(2, transformer.config.in_channels, 3, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([950.0, 300.0]), encoder_hidden_states=text,
                           return_dict=False)[0]


def test_an_expert_trains_at_its_own_noise_levels():
    from soragen.diffusion.objectives import flow_loss
    from soragen.models.text import TextEmbedding
    seen = []

    def dit(noisy, t, tokens, mask, pooled):
        seen.append(t.clone())
        return torch.zeros_like(noisy)
    text = TextEmbedding(torch.zeros(64, 3, 8), torch.ones(64, 3, dtype=torch.bool), None)
    latents, schedule = torch.zeros(64, 4, 1, 2, 2), {"num_train_timesteps": 1000, "flow_shift": 3.0}
    for levels, low, high in (((0.875, 1.0), 875, 1000), ((0.0, 0.875), 0, 875)):
        flow_loss(dit, schedule, latents, text, torch.Generator().manual_seed(0), levels=levels)
        assert low <= float(seen[-1].min()) and float(seen[-1].max()) <= high
    flow_loss(dit, schedule, latents, text, torch.Generator().manual_seed(0))
    assert float(seen[-1].min()) < 875 < float(seen[-1].max())  # without an expert: the whole range


@pytest.mark.slow
def test_a_lora_of_the_low_expert_resumes_and_loads_into_diffusers_transformer_2(a14b, clips, tmp_path):
    from safetensors.torch import load_file

    from soragen.io.model_folder import load_model
    cache, straight, resumed = tmp_path / "cache", tmp_path / "straight", tmp_path / "resumed"
    assert cli(*train_args(clips, straight, a14b, cache, 4, "--lora-rank", 4, "--expert", "low")) == 0
    assert cli(*train_args(clips, resumed, a14b, cache, 2, "--lora-rank", 4, "--expert", "low")) == 0
    assert cli(*train_args(clips, resumed, a14b, cache, 4, "--resume")) == 0
    checkpoint = straight / "checkpoint-4"
    assert json.loads((checkpoint / "soragen.json").read_text())["expert"] == "low"
    a, b = load_file(checkpoint / "lora.safetensors"), load_file(resumed / "checkpoint-4" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the same run

    base, tuned = load_model(a14b), load_model(checkpoint)  # --model RUN: the base, the adapter in its low expert
    assert all(torch.equal(x, y) for x, y in zip(base.dit.state_dict().values(), tuned.dit.state_dict().values()))
    assert not torch.equal(base.dit_2.blocks[0].attn.qkv.weight, tuned.dit_2.blocks[0].attn.qkv.weight)

    pipe = tiny_pipeline(experts=2)
    first, before = prediction(pipe.transformer), prediction(pipe.transformer_2)
    pipe.load_lora_weights(str(checkpoint / "lora.safetensors"), load_into_transformer_2=True)
    assert torch.equal(prediction(pipe.transformer), first)  # diffusers put it into transformer_2 alone
    theirs = prediction(pipe.transformer_2)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    with torch.no_grad():
        ours = tuned.dit_2(x, torch.tensor([950.0, 300.0]), text, torch.ones(2, 7, dtype=torch.bool), None)
    assert (theirs - before).abs().max() > 1e-3  # the adapter does something
    assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()


@pytest.mark.slow
def test_a_lora_of_ti2v_loads_into_diffusers(clips, tmp_path):
    from soragen.io.model_folder import load_model
    folder = tmp_path / "Wan-ti2v-tiny"
    tiny_pipeline(ti2v=True).save_pretrained(folder)
    assert cli(*train_args(clips, tmp_path / "run", folder, tmp_path / "cache", 2, "--lora-rank", 4)) == 0
    tuned = load_model(tmp_path / "run" / "checkpoint-2")
    pipe = tiny_pipeline(ti2v=True)
    before = prediction(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "run" / "checkpoint-2" / "lora.safetensors"))
    theirs = prediction(pipe.transformer)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 8, 3, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    with torch.no_grad():
        ours = tuned.dit(x, torch.tensor([950.0, 300.0]), text, torch.ones(2, 7, dtype=torch.bool), None)
    assert (theirs - before).abs().max() > 1e-3
    assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()


def test_expert_options_that_cannot_work_are_one_line_and_write_nothing(a14b, clips, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    wan = tmp_path / "Wan-tiny"
    tiny_pipeline().save_pretrained(wan)
    for init, extra, needles in (
            (a14b, ["--lora-rank", 4], ["two experts", "--expert high or --expert low"]),
            (a14b, ["--expert", "high"], ["--expert high", "--lora-rank"]),
            (wan, ["--expert", "low", "--lora-rank", 4], ["--expert low", "one DiT"]),
            (a14b, ["--expert", "middle", "--lora-rank", 4], ["--expert", "middle"])):
        rc = cli(*train_args(clips, out / "run", init, tmp_path / "cache", 1, *extra))
        assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(out) == []
