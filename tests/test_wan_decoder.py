"""soragen's own Wan VAE decoder gives diffusers' AutoencoderKLWan decode bit for bit, loads only
the decoder's tensors of a VAE checkpoint, strictly, and imports no diffusers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soragen.core.errors import SoragenError
from soragen.models import fast_paths
from soragen.models.wan_decoder import WanDecoder, is_decoder_key, supports

DEFAULT_VAE = Path(__file__).resolve().parents[1] / "src" / "soragen" / "weights" / "default" / "vae" / "config.json"


def default_config():
    return {k: v for k, v in json.loads(DEFAULT_VAE.read_text()).items() if not k.startswith("_")}


CONFIGS = {
    "default": default_config(),
    # Wan 2.1's layout, tiny: four stages, two residual blocks each, a 2D-only upsampling last
    "wan21": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[1.0],
                  temperal_downsample=[False, True, True]),
    "2d_only": dict(base_dim=8, decoder_base_dim=6, z_dim=4, dim_mult=[1, 3], num_res_blocks=1,
                    temperal_downsample=[False]),
    # Wan 2.2's: residual up blocks with their shortcut, RGB in 2x2 patches, a wider decoder
    "wan22": dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                  temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                  in_channels=12, out_channels=12),
}


def random_pair(config, seed=0):
    """diffusers' AutoencoderKLWan with every parameter random (norm gains too), and WanDecoder
    holding its decoder's tensors."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours = WanDecoder(config).eval()
    ours.load_state_dict({k: v for k, v in vae.state_dict().items() if is_decoder_key(k)}, strict=True)
    return vae, ours


@torch.no_grad()
def diffusers_chunks(vae, z):
    """diffusers' decode, one latent frame at a time (as soragen.models.vae drives it), unclamped."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
    x = vae.post_quant_conv(z)
    vae.clear_cache()
    out = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        chunk = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
        out.append(unpatchify(chunk, vae.config.patch_size) if vae.config.patch_size else chunk)
    vae.clear_cache()
    return out


def assert_same_chunks(vae, ours, z):
    theirs, mine = diffusers_chunks(vae, z), list(ours.decode_frame_by_frame(z))
    assert len(mine) == len(theirs) == z.shape[2]
    for a, b in zip(theirs, mine):
        assert a.shape == b.shape and torch.isfinite(a).all() and a.std() > 0.01
        assert torch.equal(a, b), f"differs by {(a - b).abs().max().item()}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_is_bit_identical_to_diffusers(name, one_thread):
    config = CONFIGS[name]
    vae, ours = random_pair(config)
    z = torch.randn(1, config["z_dim"], 4, 3, 5, generator=torch.Generator().manual_seed(1))
    assert_same_chunks(vae, ours, z)
    assert_same_chunks(vae, ours, z[:, :, :2] * 2)  # again: nothing remembered from the last video


@pytest.mark.parametrize("name", ["default", "wan22"])
def test_bit_identical_with_the_fast_paths_on_both(name, one_thread):
    if not fast_paths.onednn_conv3d(torch.float32):
        pytest.skip("oneDNN's conv3d does not run on this CPU: fast_paths leaves the convs plain")
    config = CONFIGS[name]
    vae, ours = random_pair(config, seed=2)
    z = torch.randn(2, config["z_dim"], 3, 3, 4, generator=torch.Generator().manual_seed(3))
    fast_paths.install(vae)
    fast_paths.install(ours)
    swapped = [m for m in ours.modules() if "_conv_forward" in vars(m)]
    assert len(swapped) == sum(isinstance(m, torch.nn.Conv3d) for m in ours.modules())
    assert_same_chunks(vae, ours, z)


def test_bit_identical_in_bfloat16(one_thread):
    vae, ours = random_pair(CONFIGS["default"], seed=4)
    torch.nn.Module.to(vae, dtype=torch.bfloat16)
    ours.to(torch.bfloat16)
    assert_same_chunks(vae, ours, torch.randn(1, 8, 3, 2, 3, dtype=torch.bfloat16))


@pytest.mark.slow  # a new process
def test_importing_it_imports_no_diffusers():
    code = ("import sys, soragen.models.wan_decoder; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'peft')))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.stdout.strip() == "[]"


# ---- loading -------------------------------------------------------------------------------------

TINY = dict(base_dim=4, z_dim=2, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True])


def write_checkpoint(path, state):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_loads_the_decoder_alone_from_a_vae_checkpoint(tmp_path):
    vae, _ = random_pair(TINY)
    file = write_checkpoint(tmp_path / "vae.safetensors", vae.state_dict())
    ours = WanDecoder.from_files(TINY, [file])
    wanted = {k: v for k, v in vae.state_dict().items() if is_decoder_key(k)}
    assert ours.state_dict().keys() == wanted.keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in wanted.items())
    assert not any(p.is_meta or p.requires_grad for p in ours.parameters())
    assert_same_chunks(vae, ours, torch.randn(1, 2, 2, 3, 3))


@pytest.mark.parametrize("fault", ["shape", "missing"])
def test_a_checkpoint_that_does_not_fit_names_its_file(tmp_path, fault):
    state = {k: v for k, v in random_pair(TINY)[0].state_dict().items()}
    key = "decoder.conv_in.weight"
    if fault == "shape":
        state[key] = torch.zeros(3, *state[key].shape[1:])
    else:
        del state[key]
    file = write_checkpoint(tmp_path / f"{fault}.safetensors", state)
    with pytest.raises(SoragenError, match=re.escape(str(file))) as err:
        WanDecoder.from_files(TINY, [file])
    assert ("shape" in str(err.value)) == (fault == "shape")


def test_encoder_tensors_are_not_checked(tmp_path):
    """An encoder tensor the config would not make (a file with only the decoder fine, too)."""
    state = {k: v for k, v in random_pair(TINY)[0].state_dict().items()}
    state["encoder.conv_in.weight"] = torch.zeros(1)
    file = write_checkpoint(tmp_path / "odd_encoder.safetensors", state)
    WanDecoder.from_files(TINY, [file])
    file = write_checkpoint(tmp_path / "decoder_only.safetensors", {k: v for k, v in state.items() if is_decoder_key(k)})
    WanDecoder.from_files(TINY, [file])


# ---- what it says it does ------------------------------------------------------------------------

WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                 in_channels=12, out_channels=12, scale_factor_spatial=16)


def test_supports_what_it_reproduces():
    assert all(supports(c) for c in CONFIGS.values())
    assert supports({}) and supports(WAN22_VAE)  # Wan 2.1's defaults; Wan 2.2's VAE
    assert supports(json.loads(DEFAULT_VAE.read_text()))  # diffusers' own keys (_class_name, ...) pass


@pytest.mark.parametrize("change", [
    {"_class_name": "AutoencoderKL"},
    {"clip_output": True},  # a key it does not know, from a newer diffusers
    {"temperal_downsample": [True]},  # one per upsampling
    {"dim_mult": [1, 0, 2]},
    {"num_res_blocks": 0},
    {"z_dim": 4.0},
    {"patch_size": 2},  # 3 output channels cannot be 2x2 patches of RGB
    {"is_residual": True, "dim_mult": [1, 1, 3], "temperal_downsample": [False, False]},  # a shortcut spreading 24
    #   channels onto 4 x 8
])
def test_does_not_support_what_it_does_not_reproduce(change):
    assert not supports({**CONFIGS["default"], **change})
    with pytest.raises(ValueError):
        WanDecoder({**CONFIGS["default"], **change})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_holding_nan_or_infinity_is_refused_naming_it(tmp_path, bad):
    from safetensors.torch import save_file

    from soragen.core.weights import load_into
    module = torch.nn.Linear(64, 64)
    weights = {"weight": torch.randn(64, 64), "bias": torch.randn(64)}
    weights["weight"][40, 3] = bad
    save_file(weights, tmp_path / "w.safetensors")
    with pytest.raises(SoragenError, match=r"weight weight in .*w\.safetensors holds NaN or infinite"):
        load_into(module, [tmp_path / "w.safetensors"], "test")


def test_finite_weights_whose_sum_overflows_load(tmp_path):
    from safetensors.torch import save_file

    from soragen.core.weights import load_into
    module = torch.nn.Linear(64, 64)
    weights = {"weight": torch.full((64, 64), 3e38), "bias": torch.zeros(64)}
    save_file(weights, tmp_path / "w.safetensors")
    load_into(module, [tmp_path / "w.safetensors"], "test")
    assert torch.equal(module.weight.data, weights["weight"])
