"""Wan 2.1 in our DiT: diffusers' own classes, tiny random configs, every parameter randomised
(default inits leave ones and zeros that hide mapping bugs), saved as diffusers saves them."""

from __future__ import annotations

import pytest
import torch

from soragen import fast_paths
from soragen.wan import WAN_2_1_T2V_1_3B, dit_config, key_map, load_transformer, mapped_shape


def tiny_transformer_config(heads=2, head_dim=20, layers=2, text_dim=24, ffn=48, in_channels=4, patch=(1, 2, 2)):
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

    from soragen.dit import VideoDiT
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

    from soragen.errors import SoragenError
    diffusers_transformer(tmp_path)
    victim = sorted((tmp_path / "transformer").glob("*.safetensors"))[0]
    state = load_file(str(victim))
    name = sorted(state)[0]
    del state[name]
    save_file(state, str(victim), metadata={"format": "pt"})
    with pytest.raises(SoragenError, match="missing"):
        load_transformer(tmp_path / "transformer")
