"""Wan 2.2 TI2V-5B's architecture, from text: a residual VAE on 2x2 patches of pixels and a DiT whose
pipeline gives every token its own timestep (expand_timesteps). A tiny random WanPipeline of that
architecture, saved by diffusers, against soragen: same latent within 1e-4, same frames within 2
levels, an export that makes the same frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLES, cli
from soragen.tools.tiny_wan import tiny_pipeline

PROMPT, NEGATIVE = "a red ball moving right in the blue sky", "green box"
RUN = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=4.0)


@pytest.fixture(scope="module")
def ti2v_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22") / "Wan-ti2v-tiny"
    pipe = tiny_pipeline(ti2v=True)
    pipe.save_pretrained(folder, max_shard_size="40KB")
    return folder, pipe


def frames_in(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("frame_*.png"))])


def generate(model, out, *extra):
    return cli("generate", PROMPT, "--model", model, "--frames", 5, "--height", 32, "--width", 48, "--steps", 4,
               "--guidance", 4, "--negative-prompt", NEGATIVE, "--seed", 7, "--dtype", "float32", "--out", out, *extra)


def test_the_patchified_vae_decodes_as_diffusers_does():
    from soragen.models.vae import VideoVAE, frames_to_uint8
    vae = VideoVAE(tiny_pipeline(ti2v=True).vae)
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (8, 4, 8)
    assert vae.latent_shape(9, 32, 48) == (8, 3, 4, 6)
    latent = torch.randn(1, 8, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = frames_to_uint8(vae.model.decode(vae.denormalise(latent)).sample)
    assert whole.shape == (1, 9, 32, 48, 3)
    assert np.array_equal(vae.decode_uint8(latent), whole)  # one latent frame at a time, unpatchified each
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    assert vae.encode(video).shape == (1, 8, 3, 4, 6)


@pytest.mark.slow
def test_ti2v_from_text_gives_wanpipelines_latent_and_frames_and_exports(ti2v_folder, tmp_path):
    from soragen.core.config import VideoDefaults
    from soragen.pipeline import Pipeline
    folder, pipe = ti2v_folder
    want_latent = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7),
                       output_type="latent", **RUN).frames
    want = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                **RUN).frames[0]
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    assert ours.model.video == VideoDefaults(frames=121, height=704, width=1280, fps=24.0)  # TI2V-5B's
    assert ours.size_multiple == 16
    latent = ours.sample_latent(PROMPT, 5, 32, 48, ours.sampling(steps=4, guidance=4.0, negative_prompt=NEGATIVE),
                                seed=7)
    assert latent.shape == want_latent.shape == (1, 8, 2, 4, 6)
    assert (latent - want_latent).abs().max() <= 1e-4, (latent - want_latent).abs().max()

    assert generate(folder, tmp_path / "frames") == 0
    frames, reference = frames_in(tmp_path / "frames"), (want * 255).round().astype(np.int16)
    assert frames.shape == reference.shape == (5, 32, 48, 3)
    assert np.abs(frames.astype(np.int16) - reference).max() <= 2

    assert cli("export", folder, tmp_path / "exported") == 0
    assert generate(tmp_path / "exported", tmp_path / "exported-frames") == 0
    assert np.array_equal(frames_in(tmp_path / "exported-frames"), frames)


def test_a_size_off_the_ti2v_multiple_is_a_usage_error(ti2v_folder, tmp_path, capfd):
    from conftest import assert_one_line_error
    folder, _ = ti2v_folder
    rc = cli("generate", PROMPT, "--model", folder, "--frames", 5, "--height", 40, "--width", 48, "--steps", 1,
             "--out", tmp_path / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--height", "multiple of 16")


# ---- Wan 2.2 A14B: two experts, switched at a boundary timestep --------------------------------------

@pytest.fixture(scope="module")
def a14b_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22") / "Wan-a14b-tiny"
    pipe = tiny_pipeline(experts=2)
    pipe.save_pretrained(folder, max_shard_size="40KB")
    return folder, pipe


@pytest.mark.slow
def test_two_experts_give_wanpipelines_latent_each_with_its_own_guidance(a14b_folder, tmp_path):
    from soragen.pipeline import Pipeline
    folder, pipe = a14b_folder
    run = dict(RUN, guidance_scale_2=2.0)
    want_latent = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7),
                       output_type="latent", **run).frames
    want = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                **run).frames[0]
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    assert ours.model.dit_2 is not None and ours.model.boundary == 875.0
    settings = ours.sampling(steps=4, guidance=4.0, negative_prompt=NEGATIVE)
    latent = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7, guidance_2=2.0)
    assert (latent - want_latent).abs().max() <= 1e-4, (latent - want_latent).abs().max()
    # the switch matters: the same guidance for both, or the experts swapped, is another video
    same = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7)
    ours.model.dit, ours.model.dit_2 = ours.model.dit_2, ours.model.dit
    ours.predicts.reverse()
    swapped = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7, guidance_2=2.0)
    assert (same - want_latent).abs().max() > 1e-3 and (swapped - want_latent).abs().max() > 1e-3

    assert generate(folder, tmp_path / "frames", "--guidance-2", 2) == 0
    frames, reference = frames_in(tmp_path / "frames"), (want * 255).round().astype(np.int16)
    assert frames.shape == reference.shape == (5, 32, 48, 3)
    assert np.abs(frames.astype(np.int16) - reference).max() <= 2
    # an export holds both experts and the boundary, and makes the same frames
    import json
    assert cli("export", folder, tmp_path / "exported") == 0
    assert json.loads((tmp_path / "exported" / "soragen.json").read_text())["boundary"] == 875.0
    assert (tmp_path / "exported" / "dit_2" / "model.safetensors").is_file()
    assert generate(tmp_path / "exported", tmp_path / "exported-frames", "--guidance-2", 2) == 0
    assert np.array_equal(frames_in(tmp_path / "exported-frames"), frames)


def test_two_expert_bad_input_is_one_line_and_writes_nothing(a14b_folder, ti2v_folder, tmp_path, capfd):
    import json
    import shutil

    from conftest import assert_one_line_error, listing
    folder, _ = a14b_folder
    out = tmp_path / "out"
    out.mkdir()
    rc = cli("generate", PROMPT, "--model", ti2v_folder[0], "--guidance-2", 2, "--frames", 5, "--height", 32,
             "--width", 32, "--steps", 1, "--out", out / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--guidance-2", "one expert")
    rc = cli("train", "--init", folder, "--data", tmp_path, "--out", out / "run", "--frames", 5, "--height", 32,
             "--width", 32)
    assert_one_line_error(capfd.readouterr(), 2, rc, "--init", "two experts")
    for ratio, needles in ((1.5, ["boundary_ratio", "between 0 and 1"]), (None, ["go together"]),
                           ("high", ["boundary_ratio", "'high'"])):
        broken = tmp_path / f"broken-{ratio}"
        shutil.copytree(folder, broken)
        index = json.loads((broken / "model_index.json").read_text())
        index["boundary_ratio"] = ratio
        (broken / "model_index.json").write_text(json.dumps(index))
        rc = cli("generate", PROMPT, "--model", broken, "--frames", 5, "--height", 32, "--width", 32, "--steps", 1,
                 "--out", out / "x.mp4")
        assert_one_line_error(capfd.readouterr(), 1, rc, "model_index.json", *needles)
    assert listing(out) == []


# ---- Wan 2.2 TI2V-5B from an image: its latent frame in place of the first, at timestep 0 ----------------

def test_ti2v_from_an_image_gives_wan_image_to_video_pipelines_latent_and_frames(ti2v_folder, tmp_path):
    from diffusers import WanImageToVideoPipeline

    from soragen.pipeline import Pipeline
    folder, pipe = ti2v_folder
    reference = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                        scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))  # at the video's size: no resizing
    path = tmp_path / "first.png"
    image.save(path)
    with torch.no_grad():  # the text pipeline's embeddings (its image pipeline would clean prompts with ftfy only)
        embeds, negative = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                              max_sequence_length=512, device=torch.device("cpu"))
    call = dict(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative, **RUN)
    want_latent = reference(generator=torch.Generator("cpu").manual_seed(7), output_type="latent", **call).frames
    want = reference(generator=torch.Generator("cpu").manual_seed(7), output_type="np", **call).frames[0]
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    assert ours.model.image_inputs == 1
    settings = ours.sampling(steps=4, guidance=4.0, negative_prompt=NEGATIVE)
    latent = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7, image=np.asarray(image))
    assert (latent - want_latent).abs().max() <= 1e-4, (latent - want_latent).abs().max()
    text_only = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7)
    assert (text_only - want_latent).abs().max() > 1e-2  # the image is what made the difference

    assert generate(folder, tmp_path / "frames", "--image", path) == 0
    frames, expected = frames_in(tmp_path / "frames"), (want * 255).round().astype(np.int16)
    assert frames.shape == expected.shape == (5, 32, 48, 3)
    assert np.abs(frames.astype(np.int16) - expected).max() <= 2
    # the first frame is the image, as closely as the VAE's round trip allows
    first = np.abs(frames[0].astype(np.int16) - np.asarray(image).astype(np.int16)).mean()
    assert first < 100, first


def test_a_lora_goes_into_both_experts_or_the_one_named(a14b_folder, ti2v_folder, tmp_path, capfd):
    from conftest import assert_one_line_error
    from soragen.core.config import LoRAConfig
    from soragen.families.wan import FAMILY as WAN
    from soragen.families.wan import from_diffusers
    from soragen.io import lora_file
    from soragen.io.lora_file import parse_expert
    from soragen.models.lora import add_lora, trainable_state
    from soragen.pipeline import Pipeline
    assert parse_expert("a.safetensors:0.8@high") == ("a.safetensors:0.8", "high")
    assert parse_expert("runs/x@2") == ("runs/x@2", "both") and parse_expert("a.safetensors@low") == ("a.safetensors", "low")
    folder, pipe = a14b_folder
    dit = from_diffusers(pipe.transformer).float()
    torch.manual_seed(0)
    add_lora(dit, LoRAConfig(lora_rank=2))
    with torch.no_grad():
        for p in trainable_state(dit).values():
            p.add_(torch.randn(p.shape) * 0.1)
    adapter = tmp_path / "a.safetensors"
    lora_file.save(dit, adapter, WAN)

    def weights(expert):
        loaded = Pipeline.load(folder, device="cpu", dtype="float32", loras=[(str(adapter), 1.0, expert)])
        return [d.blocks[0].attn.qkv.weight.clone() for d in loaded.model.experts]

    base = [d.blocks[0].attn.qkv.weight.clone() for d in Pipeline.load(folder, device="cpu", dtype="float32").model.experts]
    changed = {expert: [not torch.equal(w, b) for w, b in zip(weights(expert), base)] for expert in ("both", "high", "low")}
    assert changed == {"both": [True, True], "high": [True, False], "low": [False, True]}
    rc = cli("generate", PROMPT, "--model", ti2v_folder[0], "--lora", f"{adapter}@high", "--frames", 5, "--height", 32,
             "--width", 32, "--steps", 1, "--out", tmp_path / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, "@high", "names an expert", "has one")


# ---- fine-tuning TI2V-5B from first frames (train --first-frame P) ---------------------------------------

def test_the_dit_with_a_still_first_frame_is_diffusers_with_timestep_0_there():
    """Training's forward (still_frames=1) against diffusers' transformer given a timestep per token,
    0 for the first latent frame's, as WanImageToVideoPipeline with expand_timesteps gives it."""
    from soragen.families.wan import from_diffusers
    transformer = tiny_pipeline(ti2v=True).transformer
    dit = from_diffusers(transformer).float()
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 8, 3, 4, 6, generator=g), torch.randn(2, 7, 16, generator=g)
    t = torch.tensor([800.0, 250.0])
    per_token = t[:, None].repeat(1, 3 * 2 * 3)
    per_token[:, :2 * 3] = 0.0  # the first latent frame's tokens (2 x 3 patches of 2 x 2)
    with torch.no_grad():
        theirs = transformer(hidden_states=x, timestep=per_token, encoder_hidden_states=text, return_dict=False)[0]
        ours = dit(x, t, text, torch.ones(2, 7, dtype=torch.bool), None, still_frames=1)
        plain = dit(x, t, text, torch.ones(2, 7, dtype=torch.bool), None)
    assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()
    assert (plain - theirs).abs().max() > 1e-3  # the first frame's timestep matters


def test_a_first_frame_batch_keeps_it_clean_and_out_of_the_loss():
    from soragen.diffusion.objectives import flow_loss
    from soragen.models.text import TextEmbedding
    seen = {}

    def dit(noisy, t, tokens, mask, pooled, image=None, still_frames=0):
        seen.update(noisy=noisy.clone(), still=still_frames)
        out = torch.zeros_like(noisy)
        out[:, :, :1] = 1e6  # a prediction there would dominate any loss it took part in
        return out
    latents = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    text = TextEmbedding(torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), None)
    loss = flow_loss(dit, {"flow_shift": 3.0}, latents, text, torch.Generator().manual_seed(1),
                     condition={"still_frames": 1})
    assert seen["still"] == 1 and torch.equal(seen["noisy"][:, :, :1], latents[:, :, :1])
    assert not torch.equal(seen["noisy"][:, :, 1:], latents[:, :, 1:]) and float(loss) < 1e3


@pytest.mark.slow
def test_train_first_frame_runs_on_ti2v_and_is_refused_where_it_means_nothing(ti2v_folder, tmp_path, capfd):
    from conftest import assert_one_line_error, listing
    from soragen.tools.shapes import make_dataset
    make_dataset(tmp_path / "clips", n=2, seed=0, frames=9, size=32)
    args = ["--data", tmp_path / "clips", "--frames", 5, "--height", 32, "--width", 32, "--max-steps", 2,
            "--batch-size", 2, "--lora-rank", 4, "--cache-dir", tmp_path / "cache", "--samples", SAMPLES]
    assert cli("train", "--init", ti2v_folder[0], "--out", tmp_path / "run", "--first-frame", 1, *args) == 0
    assert (tmp_path / "run" / "checkpoint-2" / "lora.safetensors").is_file()
    capfd.readouterr()
    (tmp_path / "out").mkdir()
    wan = tmp_path / "Wan-tiny"
    tiny_pipeline().save_pretrained(wan)
    rc = cli("train", "--init", wan, "--out", tmp_path / "out" / "run", "--first-frame", 0.5, *args)
    assert_one_line_error(capfd.readouterr(), 2, rc, "--first-frame", "text alone")
    assert listing(tmp_path / "out") == []
