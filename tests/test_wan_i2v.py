"""Wan's image-to-video by input channels: the DiT takes the noisy latent, then a mask of the frames
that are given and the VAE latent of those frames with black between (36 channels in the real
models). Wan 2.2 I2V-A14B does only that, with two experts; Wan 2.1 I2V also cross-attends to a CLIP
vision tower's tokens of the image; FLF2V to those of a first and a last image, positioned. Tiny
random WanImageToVideoPipelines of each, saved by diffusers, against soragen: the same latent within
1e-4, the same frames within 2 levels, an export that makes the same frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLES, assert_one_line_error, cli, listing
from soragen.tools.tiny_wan import tiny_pipeline

PROMPT, NEGATIVE = "a red ball moving right in the blue sky", "green box"
RUN = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=4.0)
KINDS = {"i2v-a14b": dict(i2v="channels", experts=2), "i2v": dict(i2v="clip"), "flf2v": dict(i2v="flf2v")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("wan-i2v"), {}
    for name, kind in KINDS.items():
        pipe = tiny_pipeline(**kind)
        pipe.save_pretrained(root / name, max_shard_size="40KB")
        made[name] = (root / name, pipe)
    return made


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A first and a last image at the video's size (so that no resizing comes between), as PNGs."""
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(5)
    paths = []
    for name in ("first", "last"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / f"{name}.png")
        paths.append(root / f"{name}.png")
    return paths


def reference_latent(pipe, images: list, output_type: str = "latent"):
    """diffusers' WanImageToVideoPipeline, given the text pipeline's embeddings (its own prompt
    cleaning needs ftfy, which is not installed here)."""
    from diffusers import WanPipeline
    text = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                       transformer=pipe.transformer)
    with torch.no_grad():
        embeds, negative = text.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True,
                                              max_sequence_length=512, device=torch.device("cpu"))
    pictures = [Image.open(p).convert("RGB") for p in images]
    out = pipe(image=pictures[0], last_image=pictures[1] if len(pictures) > 1 else None, prompt_embeds=embeds,
               negative_prompt_embeds=negative, generator=torch.Generator("cpu").manual_seed(7),
               output_type=output_type, **RUN).frames
    return out if output_type == "latent" else out[0]


def frames_in(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("frame_*.png"))])


def generate(model, out, *extra):
    return cli("generate", PROMPT, "--model", model, "--frames", 5, "--height", 32, "--width", 48, "--steps", 4,
               "--guidance", 4, "--negative-prompt", NEGATIVE, "--seed", 7, "--dtype", "float32", "--out", out, *extra)


@pytest.mark.parametrize("name", list(KINDS))
def test_the_latent_is_wan_image_to_video_pipelines(folders, images, name):
    from soragen.pipeline import Pipeline
    folder, pipe = folders[name]
    given = images if name == "flf2v" else images[:1]
    want = reference_latent(pipe, given)
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    assert ours.model.image_channels and ours.model.image_inputs == len(given)
    assert ours.model.dit.config.in_channels == 12 and ours.model.dit.config.predicted_channels == 4
    assert (ours.model.image_encoder is not None) == (name != "i2v-a14b")
    if name == "i2v-a14b":
        assert ours.model.boundary == 900.0  # boundary_ratio 0.9 of 1000 timesteps
    settings = ours.sampling(steps=4, guidance=4.0, negative_prompt=NEGATIVE)
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in given]
    latent = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7, image=pictures[0],
                                last_image=pictures[1] if len(pictures) > 1 else None)
    assert latent.shape == want.shape == (1, 4, 2, 8, 12)
    assert (latent - want).abs().max() <= 1e-4, (latent - want).abs().max()
    if name == "flf2v":  # the image tokens' positions take part: the two images' tokens swapped, another video
        encode = ours.image_encoder.encode
        ours.image_encoder.encode = lambda pictures: encode(pictures[::-1])
        swapped = ours.sample_latent(PROMPT, 5, 32, 48, settings, seed=7, image=pictures[0], last_image=pictures[1])
        assert (swapped - want).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["i2v-a14b", "flf2v"])
def test_the_cli_makes_diffusers_frames_and_an_export_the_same(folders, images, name, tmp_path):
    folder, pipe = folders[name]
    given = images if name == "flf2v" else images[:1]
    want = (reference_latent(pipe, given, "np") * 255).round().astype(np.int16)
    flags = ["--image", given[0]] + (["--last-image", given[1]] if len(given) > 1 else [])
    assert generate(folder, tmp_path / "frames", *flags) == 0
    frames = frames_in(tmp_path / "frames")
    assert frames.shape == want.shape == (5, 32, 48, 3)
    assert np.abs(frames.astype(np.int16) - want).max() <= 2

    assert cli("export", folder, tmp_path / "exported") == 0
    assert (tmp_path / "exported" / "image_encoder.json").exists() == (name == "flf2v")
    assert generate(tmp_path / "exported", tmp_path / "exported-frames", *flags) == 0
    assert np.array_equal(frames_in(tmp_path / "exported-frames"), frames)


def test_the_images_a_model_needs_and_takes(folders, images, tmp_path, capfd):
    """Nothing written for any of these: an image-to-video model without its image, FLF2V without
    its last one, a last image on a model that only starts from one."""
    out = tmp_path / "out"
    out.mkdir()
    for name, flags, needles in (
            ("i2v", [], ["--image", "from an image"]),
            ("flf2v", ["--image", images[0]], ["--last-image", "a first and a last image"]),
            ("i2v", ["--image", images[0], "--last-image", images[1]], ["--last-image", "cannot"]),
            ("i2v-a14b", ["--last-image", images[1]], ["--last-image needs --image"])):
        rc = cli("generate", PROMPT, "--model", folders[name][0], "--frames", 5, "--height", 32, "--width", 48,
                 "--steps", 1, "--out", out / "x.mp4", *flags)
        assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(out) == []
    for name, flags, needles in (("i2v", ["--first-frame", 0.5], ["--first-frame", "image-to-video"]),
                                 ("i2v-a14b", [], ["two experts", "--expert"])):
        rc = cli("train", "--init", folders[name][0], "--data", tmp_path, "--out", out / "run", "--max-steps", 1,
                 "--lora-rank", 4, *flags)
        assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(out) == []


def test_an_image_to_video_config_maps_every_tensor():
    """Every tensor of diffusers' image-to-video transformer has a place in ours, and ours all come
    from one (the image embedder, its positions, each block's image keys, values and key norm)."""
    from soragen.families.wan import config_key_map, dit_config
    transformer = tiny_pipeline(i2v="flf2v").transformer
    config = dit_config(dict(transformer.config))
    assert (config.in_channels, config.out_channels, config.image_dim, config.image_tokens) == (12, 4, 24, 34)
    rules = config_key_map(config)
    assert sorted(s for r in rules for s in r.sources) == sorted(transformer.state_dict())
    from soragen.models.dit import VideoDiT
    assert sorted(r.key for r in rules) == sorted(VideoDiT(config).state_dict())


# ---- fine-tuning: each clip's first (and last) frame is its condition --------------------------------

def train_args(clips, out, init, cache, steps, *extra):
    return ["train", "--init", init, "--data", clips, "--out", out, "--frames", 5, "--height", 32, "--width", 48,
            "--batch-size", 2, "--max-steps", steps, "--save-every", 2, "--warmup", 1, "--lr", "1e-2",
            "--cache-dir", cache, "--lora-rank", 4, "--samples", SAMPLES, *extra]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from soragen.tools.shapes import make_dataset
    folder = tmp_path_factory.mktemp("data") / "clips"
    make_dataset(folder, n=3, seed=0, frames=9, size=48)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["i2v", "i2v-a14b"])
def test_a_lora_trained_from_first_frames_loads_into_diffusers(folders, clips, name, tmp_path):
    """The run conditions each window on its first frame as generate --image does (the cached
    condition is the pipeline's for that frame); its adapter, in diffusers' image-to-video
    transformer, predicts what our merged DiT predicts."""
    from safetensors.torch import load_file

    from soragen.core.config import TrainConfig
    from soragen.io.model_folder import load_model
    from soragen.pipeline import Pipeline
    from soragen.train.data import file_hash, scan_clips
    from soragen.train.latent_cache import clip_windows
    folder, _ = folders[name]
    expert = ["--expert", "low"] if name == "i2v-a14b" else []
    assert cli(*train_args(clips, tmp_path / "run", folder, tmp_path / "cache", 2, *expert)) == 0

    pipe = Pipeline.load(folder, device="cpu", dtype="float32")
    cfg = TrainConfig(data=str(clips), frames=5, height=32, width=48)
    clip = min(scan_clips(clips, 5, cfg.fps).clips, key=lambda c: c.path)
    [cached] = [load_file(f) for f in (tmp_path / "cache" / "conditions").glob(f"{file_hash(clip.path)}-*")]
    first = clip_windows(clip, cfg, 4)[0][0]  # the first window's first frame
    assert (cached["channels"][0] - pipe.image_channels([first], 5)[0]).abs().max() <= 1e-5
    if pipe.image_encoder is not None:
        assert (cached["tokens"][0] - pipe.image_tokens([first])[0]).abs().max() <= 1e-5

    tuned = load_model(tmp_path / "run" / "checkpoint-2")
    reference = tiny_pipeline(**KINDS[name])
    transformer = reference.transformer_2 if expert else reference.transformer
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 12, 2, 8, 12, generator=g), torch.randn(2, 512, 16, generator=g)
    image = torch.randn(2, 17, 24, generator=g) if name == "i2v" else None

    def theirs():
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=torch.tensor([950.0, 300.0]), encoder_hidden_states=text,
                               encoder_hidden_states_image=image, return_dict=False)[0]
    before = theirs()
    reference.load_lora_weights(str(tmp_path / "run" / "checkpoint-2" / "lora.safetensors"),
                                **({"load_into_transformer_2": True} if expert else {}))
    after = theirs()
    dit = tuned.dit_2 if expert else tuned.dit
    with torch.no_grad():
        ours = dit(x, torch.tensor([950.0, 300.0]), text, torch.ones(2, 512, dtype=torch.bool), None, image=image)
    assert (after - before).abs().max() > 1e-3  # the adapter does something
    assert (ours - after).abs().max() <= 1e-4, (ours - after).abs().max()


def test_any_frame_count_and_the_dry_run_work_on_image_to_video_models(folders, images, clips, tmp_path, capfd):
    """7 frames (the VAE takes 1 + 4k: the condition video is padded as the sampled latent is), and
    train --dry-run's plan runs the DiT's training forward with its image inputs."""
    assert cli("generate", PROMPT, "--model", folders["flf2v"][0], "--image", images[0], "--last-image", images[1],
               "--frames", 7, "--height", 32, "--width", 48, "--steps", 2, "--out", tmp_path / "seven") == 0
    assert len(list((tmp_path / "seven").glob("frame_*.png"))) == 7
    for name, extra in (("i2v", []), ("i2v-a14b", ["--expert", "low"])):
        capfd.readouterr()
        assert cli("train", "--init", folders[name][0], "--data", clips, "--out", tmp_path / "run", "--frames", 5,
                   "--height", 32, "--width", 48, "--lora-rank", 4, "--dry-run", *extra) == 0
        assert "memory per device" in capfd.readouterr().out
    assert not (tmp_path / "run").exists()
