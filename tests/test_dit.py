"""The DiT, read as a description of the method: patches round-trip, blocks start as the identity,
the output listens to the prompt and the timestep."""

import pytest
import torch

from conftest import make_tiny_model
from soragen.core.config import DiTConfig, dit_preset
from soragen.layers.patches import patchify, token_grid, unpatchify
from soragen.layers.positions import sincos_3d
from soragen.models.dit import VideoDiT


def tiny_dit(**overrides) -> VideoDiT:
    torch.manual_seed(0)
    return VideoDiT(dit_preset("test", in_channels=4, text_dim=16, **overrides))


def text_inputs(batch=2, length=5, dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -2:] = False  # padding
    return tokens, mask, tokens[:, :3].mean(1)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (1, 4, 2)])
@pytest.mark.parametrize("shape", [(3, 8, 8), (4, 4, 12), (2, 16, 8)])
def test_patchify_round_trip(patch, shape):
    T, H, W = shape
    if T % patch[0] or H % patch[1] or W % patch[2]:
        pytest.skip("grid not divisible")
    x = torch.randn(2, 4, T, H, W)
    tokens = patchify(x, patch)
    grid = token_grid(shape, patch)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 4 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch), x)


def test_a_token_holds_one_spacetime_patch():
    x = torch.zeros(1, 1, 2, 4, 4)
    x[0, 0, 1, 2:4, 0:2] = 1.0  # latent frame 1, bottom-left 2x2 cells
    tokens = patchify(x, (1, 2, 2))  # grid (2, 2, 2): token index t*4 + h*2 + w
    assert tokens[0].sum(-1).nonzero().flatten().tolist() == [1 * 4 + 1 * 2 + 0]


def test_positions_work_for_any_grid_and_are_distinct():
    for grid in [(1, 1, 1), (5, 8, 8), (33, 3, 70)]:
        pos = sincos_3d(grid, 96)
        assert pos.shape == (grid[0] * grid[1] * grid[2], 96)
    pos = sincos_3d((3, 4, 5), 96)
    assert torch.cdist(pos, pos).fill_diagonal_(1.0).min() > 1e-3  # no two tokens share a position


def test_blocks_are_the_identity_at_init():
    model = tiny_dit()
    tokens = torch.randn(2, 10, 32)
    text, mask, pooled = text_inputs()
    cond = model.condition(torch.tensor([10, 500]), text, mask, pooled)
    for block, modulation, text_kv in zip(model.blocks, cond.blocks, cond.text):
        assert torch.equal(block(tokens, modulation, text_kv), tokens)
    # ... so the whole untrained model predicts zero noise, whatever the input.
    x = torch.randn(2, 4, 3, 8, 8)
    text, mask, pooled = text_inputs()
    assert torch.count_nonzero(model(x, torch.tensor([10, 500]), text, mask, pooled)) == 0


def perturbed(model: VideoDiT, scale=0.05) -> VideoDiT:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_output_changes_with_prompt_and_timestep_once_trained():
    model = perturbed(tiny_dit()).eval()
    x = torch.randn(1, 4, 3, 8, 8)
    text, mask, pooled = text_inputs(batch=1)
    other_text, _, other_pooled = text_inputs(batch=1, seed=7)
    base = model(x, torch.tensor([100]), text, mask, pooled)
    assert base.shape == x.shape
    assert not torch.allclose(base, model(x, torch.tensor([900]), text, mask, pooled), atol=1e-5)
    assert not torch.allclose(base, model(x, torch.tensor([100]), other_text, mask, other_pooled), atol=1e-5)
    # Padding tokens are masked out of cross-attention: changing them changes nothing.
    text2 = text.clone()
    text2[:, -2:] = 100.0
    assert torch.allclose(base, model(x, torch.tensor([100]), text2, mask, pooled), atol=1e-5)


def test_cross_attention_can_be_switched_off():
    model = perturbed(tiny_dit(cross_attention=False))
    assert not any("cross" in name for name, _ in model.named_parameters())
    x = torch.randn(1, 4, 2, 4, 4)
    text, mask, pooled = text_inputs(batch=1)
    assert model(x, torch.tensor([5]), text, mask, pooled).shape == x.shape


def test_any_grid_size_including_partial_patches():
    model = perturbed(tiny_dit(patch_size=(2, 2, 2)))
    text, mask, pooled = text_inputs(batch=1)
    for shape in [(1, 4, 4), (3, 6, 10), (5, 2, 2)]:
        x = torch.randn(1, 4, *shape)
        assert model(x, torch.tensor([1]), text, mask, pooled).shape == x.shape


def test_bad_configs_raise_value_errors():
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(patch_size=(1, 0, 2))
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_preset("gigantic")


def test_gradient_checkpointing_gives_the_same_gradients():
    text, mask, pooled = text_inputs(batch=1)
    x = torch.randn(1, 4, 2, 8, 8)
    grads = []
    for checkpointing in (False, True):
        model = perturbed(tiny_dit()).train()
        model.gradient_checkpointing = checkpointing
        model(x, torch.tensor([3]), text, mask, pooled).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_loaded_dit_holds_exactly_the_files_weights(tmp_path):
    """load_model builds the DiT without random init (meta device) and takes every weight from
    the file: float32 on the CPU, equal to the saved values, also when stored in bfloat16."""
    from safetensors.torch import load_file

    from soragen.io.model_folder import load_model

    folder = make_tiny_model(tmp_path / "m", perturb=0.02, dit_dtype=torch.bfloat16)
    saved = load_file(str(folder / "dit" / "model.safetensors"))
    loaded = load_model(folder).dit
    state = loaded.state_dict()
    assert set(state) == set(saved)
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32, name
        assert torch.equal(tensor, saved[name].float()), name
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.randn(1, 4, 2, 4, 4)
    out = loaded(x, torch.tensor([500.0]), torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool),
                 torch.randn(1, 384))
    assert out.shape == x.shape and torch.isfinite(out).all()
