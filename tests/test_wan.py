"""Wan 2.1 in our DiT: diffusers' own classes, tiny random configs, every parameter randomised
(default inits leave ones and zeros that hide mapping bugs), saved as diffusers saves them."""

from __future__ import annotations

import pytest
import torch

from soragen.models import fast_paths
from soragen.families.wan import WAN_2_1_T2V_1_3B, dit_config, key_map, load_transformer, mapped_shape
from soragen.tools.tiny_wan import tiny_pipeline


def tiny_transformer_config(heads=2, head_dim=20, layers=2, text_dim=24, ffn=48, in_channels=4, patch=(1, 2, 2)):
    """A WanTransformer3DModel config at a toy size (soragen.tools.tiny_wan's, text_dim apart)."""
    return dict(patch_size=list(patch), num_attention_heads=heads, attention_head_dim=head_dim,
                in_channels=in_channels, out_channels=in_channels, text_dim=text_dim, freq_dim=256, ffn_dim=ffn,
                num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def diffusers_transformer(tmp_path, **config):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = randomised(WanTransformer3DModel(**tiny_transformer_config(**config))).eval()
    model.save_pretrained(tmp_path / "transformer", max_shard_size="20KB", safe_serialization=True)
    return model


@pytest.mark.parametrize("head_dim, shape, batch", [
    (20, (3, 4, 6), 2),   # head split 8 / 6 / 6, H != W, two videos at different timesteps
    (22, (1, 6, 4), 1),   # split 10 / 6 / 6, a single frame
    (16, (2, 2, 2), 2),   # split 8 / 4 / 4
])
def test_our_dit_with_wans_weights_gives_diffusers_forward(tmp_path, head_dim, shape, batch):
    ref = diffusers_transformer(tmp_path, head_dim=head_dim)
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1  # sharded: read shard by shard
    ours = load_transformer(tmp_path / "transformer")
    g = torch.Generator().manual_seed(1)
    T, H, W = shape
    x = torch.randn(batch, 4, T, H * 2, W * 2, generator=g)
    t = torch.tensor([981.0, 337.5][:batch])
    text = torch.randn(batch, 7, 24, generator=g)
    text[:, 5:] = 0.0  # zero padding, as Wan's text encoder leaves it: attended to, not masked
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        got = ours(x, t, text, torch.ones(batch, 7, dtype=torch.bool), torch.zeros(batch, 24))
        assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
        fast_paths.install(ours)  # and through the CPU fast paths
        assert (ours(x, t, text, torch.ones(batch, 7, dtype=torch.bool), None) - want).abs().max() <= 1e-5


def test_the_real_1_3b_config_maps_onto_ours_key_for_key(tmp_path):
    """Both models built on the meta device at Wan2.1-T2V-1.3B's size: diffusers' keys and shapes,
    through our key map, are exactly our DiT's."""
    from diffusers import WanTransformer3DModel

    from soragen.models.dit import VideoDiT
    with torch.device("meta"):
        theirs = WanTransformer3DModel(**WAN_2_1_T2V_1_3B).state_dict()
        ours = VideoDiT(dit_config(WAN_2_1_T2V_1_3B)).state_dict()
    rules = key_map(30)
    assert sorted(s for r in rules for s in r.sources) == sorted(theirs)  # every key used, once
    assert {r.key for r in rules} == set(ours)
    for rule in rules:
        assert mapped_shape(rule, [tuple(theirs[s].shape) for s in rule.sources]) == tuple(ours[rule.key].shape)
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())


def test_a_transformer_folder_whose_weights_miss_a_key_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from soragen.core.errors import SoragenError
    diffusers_transformer(tmp_path)
    victim = sorted((tmp_path / "transformer").glob("*.safetensors"))[0]
    state = load_file(str(victim))
    name = sorted(state)[0]
    del state[name]
    save_file(state, str(victim), metadata={"format": "pt"})
    with pytest.raises(SoragenError, match="missing"):
        load_transformer(tmp_path / "transformer")


# ---- the whole pipeline: a tiny WanPipeline folder, as diffusers saves one ---------------------------

PROMPT, NEGATIVE = "a red ball moving right in the sky", "the sky"


def tiny_wan_vae():
    return tiny_pipeline().vae


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A tiny WanPipeline (umT5 encoder, Wan VAE, UniPC with flow sigmas, transformer; every weight
    random) saved by diffusers, shards small, and the pipeline object itself as the reference."""
    folder = tmp_path_factory.mktemp("wan") / "Wan-tiny"
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder, max_shard_size="40KB")
    return folder, pipe


def test_the_text_encoder_gives_wanpipelines_prompt_embeddings(wan_folder):
    from soragen.io.model_folder import load_model
    from soragen.models.text import TextEncoder
    folder, pipe = wan_folder
    encoder = TextEncoder(load_model(folder).text_spec)
    assert type(encoder.model).__name__ == "UMT5EncoderModel"
    with torch.no_grad():  # as WanPipeline.__call__ runs it
        want, want_negative = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                                 max_sequence_length=512, device=torch.device("cpu"))
    for prompt, reference in ((PROMPT, want), (NEGATIVE, want_negative), ("", None)):
        got = encoder.encode([prompt])
        assert got.tokens.shape == (1, 512, 16)
        if reference is not None:
            assert torch.equal(got.tokens, reference.float())
        assert not got.tokens[0, int(got.mask.sum()):].any()  # zeros past the prompt, as Wan was trained


def test_umt5_runs_as_umt5_not_as_t5(wan_folder):
    """T5EncoderModel loads umT5's weights without complaint and drops the relative attention bias
    of every layer but the first: umT5 must run as UMT5EncoderModel."""
    from transformers import T5EncoderModel, UMT5EncoderModel

    from soragen.core.config import TextEncoderSpec
    from soragen.models.text import TextEncoder
    folder, _ = wan_folder
    spec = TextEncoderSpec(source=str(folder), subfolder="text_encoder", tokenizer_subfolder="tokenizer",
                           max_length=16, padding="zeros")
    ids = torch.tensor([[3, 4, 5, 2]])
    with torch.no_grad():
        ours = TextEncoder(spec).model(input_ids=ids).last_hidden_state
        umt5 = UMT5EncoderModel.from_pretrained(folder / "text_encoder")(input_ids=ids).last_hidden_state
        t5 = T5EncoderModel.from_pretrained(folder / "text_encoder")(input_ids=ids).last_hidden_state
    assert torch.equal(ours, umt5)
    assert (t5 - umt5).abs().max() > 1e-3


@pytest.mark.slow
def test_generate_on_a_wan_folder_gives_wanpipelines_video(wan_folder, tmp_path):
    import numpy as np

    from conftest import cli
    from soragen.pipeline import Pipeline
    folder, pipe = wan_folder
    run = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=4.0)
    want_latent = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7),
                       output_type="latent", **run).frames
    want = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
                **run).frames[0]
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    assert ours.model.sampling.sampler == "unipc" and ours.model.video.fps == 16.0
    settings = ours.sampling(steps=4, guidance=4.0, negative_prompt=NEGATIVE)
    latent = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7)
    assert (latent - want_latent).abs().max() <= 1e-4, (latent - want_latent).abs().max()
    out = tmp_path / "frames"
    assert cli("generate", PROMPT, "--model", folder, "--frames", 5, "--height", 32, "--width", 48, "--steps", 4,
               "--guidance", 4, "--negative-prompt", NEGATIVE, "--seed", 7, "--dtype", "float32", "--out", out) == 0
    from PIL import Image
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("frame_*.png"))])
    reference = (want * 255).round().astype(np.int16)
    assert frames.shape == reference.shape == (5, 32, 48, 3)
    assert np.abs(frames.astype(np.int16) - reference).max() <= 2


def test_ddim_is_refused_for_a_flow_model(wan_folder, tmp_path, capfd):
    from conftest import assert_one_line_error, cli
    folder, _ = wan_folder
    rc = cli("generate", PROMPT, "--model", folder, "--sampler", "ddim", "--frames", 1, "--height", 32, "--width",
             32, "--steps", 1, "--out", tmp_path / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--sampler ddim", "flow")
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_decoding_a_large_video_goes_tile_by_tile_and_gives_the_same_frames(monkeypatch):
    import numpy as np

    from soragen.models.vae import VideoVAE
    vae = VideoVAE(tiny_wan_vae())
    latent = torch.randn(1, 4, 2, 24, 20, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(VideoVAE, "TILE_ABOVE", 64)  # 96 x 80 pixels: above it, tiled
    tiled = vae.decode_uint8(latent, 5)
    assert vae.model.use_tiling
    monkeypatch.setattr(VideoVAE, "TILE_ABOVE", 10_000)
    whole = vae.decode_uint8(latent, 5)
    assert tiled.shape == whole.shape == (1, 5, 96, 80, 3)
    assert np.abs(tiled.astype(np.int16) - whole).max() <= 2  # tiles overlap and are blended


@pytest.mark.slow
def test_export_writes_a_soragen_folder_that_makes_the_same_latent(wan_folder, tmp_path):
    import json

    from conftest import cli
    from soragen.pipeline import Pipeline
    folder, _ = wan_folder
    out = tmp_path / "wan-tiny"
    assert cli("export", folder, out) == 0
    assert (out / "soragen.json").is_file() and json.loads((out / "dit" / "config.json").read_text())["positions"] == "rope"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["use_flow_sigmas"] is True
    spec = json.loads((out / "text_encoder.json").read_text())
    assert spec["source"] == str(folder.resolve()) and spec["subfolder"] == "text_encoder"  # referenced, not copied
    latents = []
    for model in (folder, out):
        pipe = Pipeline.load(model, device="cpu", dtype="float32")
        latents.append(pipe.sample_latent(PROMPT, 5, 32, 48, pipe.sampling(steps=2), seed=3))
    assert torch.equal(*latents)


@pytest.mark.slow
def test_any_frame_count_and_inspect_patches_on_a_wan_folder(wan_folder, tmp_path, capfd):
    import json

    from conftest import cli, moving_square
    from soragen.io.video import probe_video, write_video
    folder, _ = wan_folder
    video = tmp_path / "three.mp4"
    assert cli("generate", PROMPT, "--model", folder, "--frames", 3, "--height", 32, "--width", 32, "--steps", 2,
               "--out", video) == 0
    assert probe_video(video).frames == 3  # decoded as 5 (4k + 1), trimmed
    clip = write_video(tmp_path / "clip.mp4", moving_square(9, 32, 48), 8.0).path
    capfd.readouterr()
    assert cli("inspect-patches", clip, "--model", folder, "--frames", 5, "--out", tmp_path / "p.png", "--json") == 0
    report = json.loads(capfd.readouterr().out)
    assert report["latent_shape"][:2] == [4, 2] and report["patch_size"] == [1, 2, 2]


def test_a_hub_id_that_cannot_be_fetched_is_one_line(tmp_path, capfd, monkeypatch):
    from conftest import assert_one_line_error, cli
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli("generate", PROMPT, "--model", "Wan-AI/No-Such-Model-Diffusers", "--out", tmp_path / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, "cannot fetch model Wan-AI/No-Such-Model-Diffusers", "offline")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "dpm++"])
def test_the_other_flow_samplers_match_wanpipeline_with_diffusers_same_scheduler(wan_folder, sampler):
    """--sampler euler is diffusers' FlowMatchEulerDiscreteScheduler at the folder's shift, dpm++
    its DPMSolverMultistepScheduler on the folder's flow config: WanPipeline with that scheduler
    lands on the same latent."""
    import copy

    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from soragen.pipeline import Pipeline
    folder, pipe = wan_folder
    pipe = copy.copy(pipe)
    config = pipe.scheduler.config
    pipe.scheduler = (FlowMatchEulerDiscreteScheduler(shift=config.flow_shift) if sampler == "euler" else
                      DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2))
    want = pipe(PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_frames=5, num_inference_steps=3,
                guidance_scale=3.0, generator=torch.Generator("cpu").manual_seed(2), output_type="latent").frames
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    latent = ours.sample_latent(PROMPT, 5, 32, 32, ours.sampling(sampler=sampler, steps=3, guidance=3.0,
                                                                 negative_prompt=NEGATIVE), seed=2)
    assert (latent - want).abs().max() <= 1e-4, (latent - want).abs().max()
