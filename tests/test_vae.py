"""The 3D causal VAE adapter: the frame-count rule, causality, and loading through the real path."""

import json

import numpy as np
import pytest
import torch

from soragen.core.config import vae_preset_config
from soragen.core.errors import SoragenError
from soragen.models.vae import load_vae, new_vae, save_vae


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return new_vae(vae_preset_config("test"))


def test_frame_rule(vae):
    assert vae.temporal_factor == 4 and vae.spatial_factor == 4
    assert [vae.latent_frames(f) for f in (1, 2, 5, 6, 9, 16, 17)] == [1, 2, 2, 3, 3, 5, 5]
    assert vae.latent_shape(16, 32, 48) == (4, 5, 8, 12)


@pytest.mark.parametrize("frames", [1, 3, 5, 16])
def test_any_frame_count_round_trips_to_the_same_count(vae, frames):
    video = torch.rand(1, 3, frames, 16, 16) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (1, 4, vae.latent_frames(frames), 4, 4)
    out = vae.decode_uint8(latent, frames)
    assert out.shape == (1, frames, 16, 16, 3) and out.dtype == np.uint8


def test_frame_t_does_not_depend_on_later_frames(vae):
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, :, 5:] = -video[:, :, 5:]  # frames 5..8 change: latent frames 0 and 1 (frames 0..4) must not
    a, b = vae.encode(video), vae.encode(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])
    # and the decoder is causal too
    la = a.clone()
    la[:, :, 2:] += 1.0
    da, db = vae.decode_uint8(a), vae.decode_uint8(la)
    assert np.array_equal(da[:, :5], db[:, :5]) and not np.array_equal(da[:, 5:], db[:, 5:])


def test_chunked_decode_matches_diffusers_decode(vae):
    latent = torch.randn(1, 4, 3, 4, 4)
    ours = vae.decode_uint8(latent)
    ref = vae.decode(latent)
    ref_uint8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(ours.astype(int) - ref_uint8.astype(int)).max() <= 1


def test_latents_are_normalised_with_the_config_statistics(tmp_path):
    config = vae_preset_config("test")
    config["latents_mean"] = [1.0, 2.0, 3.0, 4.0]
    config["latents_std"] = [2.0, 2.0, 2.0, 2.0]
    torch.manual_seed(0)
    vae = new_vae(config)
    torch.manual_seed(0)
    plain = new_vae(vae_preset_config("test"))
    video = torch.rand(1, 3, 5, 16, 16)
    expected = (plain.encode(video) - torch.tensor([1.0, 2, 3, 4]).view(1, -1, 1, 1, 1)) / 2
    assert torch.allclose(vae.encode(video), expected, atol=1e-5)


def test_save_and_load_through_the_diffusers_layout(vae, tmp_path):
    save_vae(vae, tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    loaded = load_vae(tmp_path / "vae")
    for (k, a), (_, b) in zip(vae.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    # A Wan pipeline repo keeps its VAE under vae/: the parent folder loads too.
    assert load_vae(tmp_path).latent_channels == 4
    from diffusers import AutoencoderKLWan
    assert AutoencoderKLWan.from_pretrained(tmp_path / "vae").config.z_dim == 4


def test_wan21_sized_config_loads_through_the_same_path(tmp_path):
    """The pretrained Wan 2.1 VAE's config (x8 space, x4 time, z_dim 16), at a tiny width."""
    from diffusers import AutoencoderKLWan
    from soragen.core.weights import save_module
    model = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                             temperal_downsample=[False, True, True])
    folder = tmp_path / "wan"
    folder.mkdir()
    model.save_config(folder)
    save_module(model, folder / "diffusion_pytorch_model.safetensors", "VAE")
    vae = load_vae(folder)
    assert (vae.temporal_factor, vae.spatial_factor, vae.latent_channels) == (4, 8, 16)
    assert vae.encode(torch.zeros(1, 3, 5, 16, 16)).shape == (1, 16, 2, 2, 2)


def test_broken_vae_folders_fail_clearly(vae, tmp_path):
    with pytest.raises(SoragenError, match="no config.json"):
        load_vae(tmp_path)
    save_vae(vae, tmp_path / "v")
    weights = tmp_path / "v" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SoragenError, match="not a valid safetensors"):
        load_vae(tmp_path / "v")


def test_a_vae_loaded_for_decoding_is_identified_as_diffusers_model_identifies_it(tiny_model):
    """The latent cache's key of a VAE read from its files (no diffusers model made) is the key of
    the same VAE made by diffusers, so a cache stays valid whichever made it."""
    from soragen.io.folders import default_model_dir
    from soragen.train.latent_cache import vae_fingerprint
    for folder in (default_model_dir() / "vae", tiny_model / "vae"):
        vae = load_vae(folder)
        assert vae.decoder is not None and not vae.parts()[1:]  # the decoder alone so far
        lazy = vae_fingerprint(vae)
        assert len(vae.parts()) == 1
        vae.model  # noqa: B018  (diffusers' model, made now: it decodes too)
        assert vae.parts() == [vae.model] and vae_fingerprint(vae) == lazy


def test_a_vae_loaded_for_decoding_saves_the_bytes_diffusers_model_saves(tiny_model, tmp_path):
    from soragen.io.folders import default_model_dir
    for i, folder in enumerate((default_model_dir() / "vae", tiny_model / "vae")):
        lazy, made = load_vae(folder), load_vae(folder)
        made.model  # noqa: B018
        save_vae(lazy, tmp_path / f"lazy{i}")
        save_vae(made, tmp_path / f"made{i}")
        assert len(lazy.parts()) == 1  # saved without diffusers' model
        for name in ("config.json", "diffusion_pytorch_model.safetensors"):
            assert (tmp_path / f"lazy{i}" / name).read_bytes() == (tmp_path / f"made{i}" / name).read_bytes(), name
