"""Every fast path gives the plain path's result within a stated tolerance; taken off, exactly it.

Each fast path is also forced off on every machine (SORAGEN_FAST_PATHS=off, or the CPU probe made
to say no), so the fallbacks an AVX2-only CPU takes are tested on AVX-512 machines too."""

import copy

import numpy as np
import pytest
import torch

from soragen.models import fast_paths
from soragen.core.config import dit_preset
from soragen.layers.attention import attention, mask_bias
from soragen.models.dit import VideoDiT
from soragen.models.fast_paths import has_fast_bf16, linear
from soragen.pipeline import CachedDiT, Pipeline, resolve_dtype
from soragen.diffusion.sampling import make_scheduler, sample
from soragen.models.text import TextEmbedding


def model_and_inputs(seed=0):
    torch.manual_seed(seed)
    model = VideoDiT(dit_preset("test", in_channels=4, text_dim=16, hidden_size=64, num_heads=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    text = torch.randn(2, 6, 16, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return model, x, torch.tensor([100.0, 700.0]), text, mask, text.mean(1)


# ---- taken off, the plain modules; on, the plain results within tolerance -------------------------

def test_uninstalled_fast_paths_leave_exactly_the_plain_model():
    model, x, t, text, mask, pooled = model_and_inputs()
    plain = copy.deepcopy(model)
    fast_paths.install(model)
    assert fast_paths.installed(model) == fast_paths.enabled()
    fast_paths.uninstall(model)
    assert not fast_paths.installed(model)
    assert not any(hasattr(m, "onednn_weight") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask, pooled), plain(x, t, text, mask, pooled))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_installed_fast_paths_give_the_plain_dit_within_tolerance(dtype, tol):
    model, x, t, text, mask, pooled = model_and_inputs()
    model = model.to(dtype)
    inputs = (x.to(dtype), t, text.to(dtype), mask, pooled.to(dtype))
    with torch.no_grad():
        ref = model(*inputs).float()
        fast_paths.install(model)
        out = model(*inputs).float()
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def test_bf16_matches_float32_within_two_percent_of_the_output_scale():
    model, x, t, text, mask, pooled = model_and_inputs()
    with torch.no_grad():
        ref = model(x, t, text, mask, pooled)
        fast_paths.install(model.to(torch.bfloat16))
        fast = model(x.bfloat16(), t, text.bfloat16(), mask, pooled.bfloat16()).float()
    assert (fast - ref).abs().max() <= 0.02 * ref.abs().max()


def test_with_fast_paths_off_the_pipeline_gives_exactly_the_plain_modules_video(tiny_model, monkeypatch):
    fast = Pipeline.load(tiny_model, device="cpu", dtype="float32")
    fast_paths.uninstall(fast.model.dit)
    for part in fast.model.vae.parts():  # the plain modules, as they were loaded
        fast_paths.uninstall(part)
    monkeypatch.setenv("SORAGEN_FAST_PATHS", "off")
    off = Pipeline.load(tiny_model, device="cpu", dtype="float32")
    assert not fast_paths.installed(off.model.dit) and not any(map(fast_paths.installed, off.model.vae.parts()))
    assert np.array_equal(off.generate("a red ball", steps=3, seed=4), fast.generate("a red ball", steps=3, seed=4))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_pipeline_gives_the_same_video_through_the_fallbacks(tiny_model, monkeypatch, dtype):
    fast = Pipeline.load(tiny_model, device="cpu", dtype=dtype).generate("a red ball", steps=3, seed=4)
    monkeypatch.setenv("SORAGEN_FAST_PATHS", "off")
    plain = Pipeline.load(tiny_model, device="cpu", dtype=dtype).generate("a red ball", steps=3, seed=4)
    diff = np.abs(fast.astype(np.int16) - plain.astype(np.int16))
    assert diff.max() <= (1 if dtype == "float32" else 8) and diff.mean() < 1.0


@pytest.mark.slow
def test_pipeline_in_bf16_stays_close_to_float32(tiny_model):
    fast = Pipeline.load(tiny_model, device="cpu", dtype="bfloat16")
    plain = Pipeline.load(tiny_model, device="cpu", dtype="float32")
    a = fast.generate("a red ball", steps=4, seed=1).astype(np.int16)
    b = plain.generate("a red ball", steps=4, seed=1).astype(np.int16)
    assert np.abs(a - b).mean() < 4.0  # mean error in 0..255 pixel units


# ---- what this CPU runs ---------------------------------------------------------------------------

def _onednn_kernel_runs(dtype) -> bool:
    try:
        x, w = torch.randn(3, 32, dtype=dtype), torch.randn(16, 32, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], "")
        return True
    except RuntimeError:
        return False


def test_the_cpu_probe_says_whether_onednn_runs_each_dtype_here():
    # On an AVX2-only CPU oneDNN refuses bf16 ("bf16 path needs the cpu support ..."), on AVX-512 it runs.
    for dtype in (torch.float32, torch.bfloat16):
        assert fast_paths.onednn_linear(dtype) == _onednn_kernel_runs(dtype)


def test_auto_dtype_follows_the_hardware():
    expected = torch.bfloat16 if has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected


@pytest.mark.slow
def test_bf16_on_a_cpu_whose_onednn_refuses_bf16_runs_through_torch(tiny_model, monkeypatch):
    # As on an AVX2-only CPU: bf16 is asked for, oneDNN cannot run it, torch's own bf16 kernels do.
    monkeypatch.setattr(fast_paths, "_onednn_linear_runs", lambda dtype: dtype == torch.float32)
    pipe = Pipeline.load(tiny_model, device="cpu", dtype="bfloat16")
    assert not any(hasattr(m, "onednn_weight") for m in pipe.model.dit.modules())
    a = pipe.generate("a red ball", steps=3, seed=1).astype(np.int16)
    b = Pipeline.load(tiny_model, device="cpu", dtype="float32").generate("a red ball", steps=3, seed=1)
    assert np.abs(a - b.astype(np.int16)).mean() < 4.0


def test_with_fast_paths_off_every_layer_is_torchs_own(monkeypatch):
    from soragen.core.config import vae_preset_config
    from soragen.models.vae import new_vae
    monkeypatch.setenv("SORAGEN_FAST_PATHS", "off")
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 96), torch.randn(2, 10, 64)
    for dtype in (torch.float32, torch.bfloat16):
        layer, xd = layer.to(dtype), x.to(dtype)
        fast_paths.install(layer)
        assert not fast_paths.installed(layer) and not hasattr(layer, "onednn_weight")
        with torch.no_grad():
            out = linear(layer, xd, "gelu")
        assert torch.equal(out, torch.nn.functional.gelu(torch.nn.functional.linear(xd, layer.weight, layer.bias)))
    vae = new_vae(vae_preset_config("test"))
    fast_paths.install(vae.model)
    assert not fast_paths.installed(vae.model)


# ---- the linears ----------------------------------------------------------------------------------

def test_onednn_linear_with_fused_gelu_matches_the_plain_layers():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(2, 10, 64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        layer_d, x_d = layer.to(dtype), x.to(dtype)
        reference = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        plain = torch.nn.functional.gelu(reference)
        with torch.no_grad():
            fast = linear(layer_d, x_d, "gelu").float()
            fast_plain = linear(layer_d, x_d).float()
        scale = plain.abs().max()
        assert (fast - plain).abs().max() <= tol * scale
        assert (fast_plain - reference).abs().max() <= tol * scale
    layer = layer.float()
    out = linear(layer, x.requires_grad_(True), "gelu")  # with autograd: the plain layers, so it can train
    out.sum().backward()
    assert x.grad is not None and out.grad_fn is not None


def test_an_installed_mlp_fuses_its_gelu_and_gives_the_plain_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ref = mlp(x)
        fast_paths.install(mlp)
        assert ("forward" in vars(mlp)) == fast_paths.onednn_linear(torch.float32) or not fast_paths.enabled()
        assert torch.allclose(mlp(x), ref, atol=1e-5)


def test_packed_weights_give_the_same_output_until_the_weight_changes():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 96), torch.randn(2, 10, 64)
    dtypes = [d for d in (torch.float32, torch.bfloat16) if fast_paths.onednn_linear(d)]
    if not dtypes:
        pytest.skip("oneDNN's linear runs in no dtype on this CPU")
    for dtype in dtypes:
        layer, xd = layer.to(dtype), x.to(dtype)
        with torch.no_grad():
            plain = linear(layer, xd, "gelu")
            fast_paths.pack(layer)
            assert hasattr(layer, "onednn_weight")
            assert torch.equal(linear(layer, xd, "gelu"), plain)  # the same kernel, the weight laid out ahead
            layer.weight.mul_(-1.0)  # e.g. a training step: the packed copy is stale now
            changed = linear(layer, xd)
        expected = torch.nn.functional.linear(xd.float(), layer.weight.float(), layer.bias.float())
        assert (changed.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
        del layer.onednn_weight


# ---- attention, the VAE's convolutions ------------------------------------------------------------

def test_matmul_attention_matches_sdpa_with_a_padding_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    ctx_k, ctx_v = torch.randn(2, 4, 6, 16, generator=g), torch.randn(2, 4, 6, 16, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False  # the unconditional prompt is shorter: its padding must not be attended to
    scale = 16 ** -0.5
    for keys, values, m in ((k, v, None), (ctx_k, ctx_v, mask)):
        ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=None if m is None
                                                               else m[:, None, None, :])
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            bias = None if m is None else mask_bias(m, dtype)
            args = ((q * scale).to(dtype), keys.to(dtype), values.to(dtype), bias)
            for attend in (attention, fast_paths.materialised_attention):
                assert (attend(*args).float() - ref).abs().max() <= tol * ref.abs().max()


def test_vae_decode_in_bf16_stays_within_a_few_levels_of_float32():
    from soragen.core.config import vae_preset_config
    from soragen.models.vae import new_vae

    torch.manual_seed(0)
    vae = new_vae(vae_preset_config("test"))
    latent = torch.randn(1, *vae.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(3))
    plain = vae.decode_uint8(latent, 9).astype(np.int16)
    vae.to(dtype=torch.bfloat16)
    fast = vae.decode_uint8(latent, 9).astype(np.int16)
    assert fast.shape == plain.shape == (1, 9, 32, 32, 3)
    assert np.abs(fast - plain).mean() < 1.0 and np.abs(fast - plain).max() <= 8


def test_onednn_conv3d_matches_torchs_choice_and_leaves_training_alone():
    from soragen.core.config import vae_preset_config
    from soragen.models.vae import new_vae

    torch.manual_seed(0)
    vae = new_vae(dict(vae_preset_config("test"), base_dim=16))
    latent = torch.randn(1, *vae.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(3))
    plain = vae.decode_uint8(latent, 9).astype(np.int16)  # torch's own choice (its slow reference conv3d at batch 1)
    fast_paths.install(vae.model)
    convs = [m for m in vae.model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all("_conv_forward" in vars(m) for m in convs) == fast_paths.onednn_conv3d(torch.float32)
    fast = vae.decode_uint8(latent, 9).astype(np.int16)
    assert np.abs(fast - plain).max() <= 1  # float32 both: summation order only

    conv = torch.nn.Conv3d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 3, 8, 8, requires_grad=True)
    ref = conv(x)
    fast_paths.install(conv)
    out = conv(x)  # with gradients: torch's own path, so training is untouched
    assert torch.allclose(out, ref, atol=1e-5) and out.grad_fn is not None
    with torch.no_grad():
        assert torch.allclose(conv(x), ref, atol=1e-5)


# ---- sampling: guidance as one batch, per-video caches, torch.compile -----------------------------

def test_batched_guidance_equals_two_separate_passes():
    model, x, _, text, mask, pooled = model_and_inputs()
    cond = TextEmbedding(text[:1], mask[:1], pooled[:1])
    uncond = TextEmbedding(text[1:, :4], mask[1:, :4], pooled[1:])

    def predict(x_, t_, e):
        return model(x_, t_, e.tokens, e.mask, e.pooled)

    def two_passes(x_, t_, e):  # the plain path: conditional and unconditional one at a time
        return torch.cat([predict(x_[:1], t_[:1], cond), predict(x_[1:], t_[1:], uncond)])

    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        batched = sample(predict, noise, cond, uncond, make_scheduler("ddim"), 5, guidance=4.0)
        plain = sample(two_passes, noise, cond, uncond, make_scheduler("ddim"), 5, guidance=4.0)
    # only float rounding apart; a random model's v-prediction DDIM latents reach ~600, so relative
    assert (batched - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_the_per_video_cache_gives_the_plain_forward(monkeypatch):
    """Text keys/values once per video and the modulations of all steps in batches change nothing."""
    monkeypatch.setattr(CachedDiT, "TABLE_STEPS", 2)  # so the table is refilled on the way
    model, x, _, text, mask, pooled = model_and_inputs()
    embedding = TextEmbedding(text, mask, pooled)
    timesteps = torch.tensor([900, 600, 300, 0])
    cached = CachedDiT(model, model.predict, timesteps, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for step in [*timesteps.tolist(), 450]:  # 450: off the table, computed on its own
            t = torch.full((2,), float(step))
            assert torch.allclose(cached(x, t, embedding), model(x, t, text, mask, pooled), atol=1e-6)


def test_padded_text_gives_the_same_prediction():
    model, x, t, text, mask, pooled = model_and_inputs()
    padded = TextEmbedding(text, mask, pooled).pad_to(11)
    assert padded.tokens.shape == (2, 11, 16) and not padded.mask[:, 6:].any()
    with torch.no_grad():
        ref = model(x, t, text, mask, pooled)
        out = model(x, t, padded.tokens, padded.mask, padded.pooled)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.slow
def test_compiled_dit_gives_the_eager_video(tiny_model):
    plain = Pipeline.load(tiny_model, device="cpu", dtype="float32")
    fast = Pipeline.load(tiny_model, device="cpu", dtype="float32", compile=True)
    assert fast.predict != fast.model.dit.predict
    compiled, calls = fast.predicts[0], []

    def recorded(*args):
        calls.append(args)
        return compiled(*args)
    fast.predicts[0] = recorded
    torch._dynamo.utils.counters.clear()
    for prompt in ("a red ball", "a yellow box falling at night"):  # two text lengths, one compile
        a = fast.generate(prompt, steps=3, seed=2).astype(np.int16)
        b = plain.generate(prompt, steps=3, seed=2).astype(np.int16)
        assert np.abs(a - b).max() <= 1  # float32 throughout: only summation order differs
    # the step itself, compiled with the oneDNN linears (the pipeline installs them), matches eager's
    assert len(calls) == 6  # 3 steps of each prompt
    with torch.no_grad():
        for args in calls[::3]:
            ref = fast.model.dit.predict(*args)
            assert (compiled(*args) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_the_dit_compiles_as_one_graph():
    # A graph break splits the model into pieces compiled apart, which ran slower than eager.
    model, x, t, text, mask, pooled = model_and_inputs()
    fast_paths.install(model)  # as the pipeline does
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.predict)(x, model.condition(t, text, mask, pooled))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_predict_with_onednn_linears_matches_eager_in_bf16():
    """(float32: test_compiled_dit_gives_the_eager_video, on the pipeline's one compile.)"""
    model, x, t, text, mask, pooled = model_and_inputs()
    for dtype, tol in ((torch.bfloat16, 2e-2),):
        model = model.to(dtype)
        fast_paths.install(model)
        with torch.no_grad():
            cond = model.condition(t, text.to(dtype), mask, pooled.to(dtype))
            ref = model.predict(x.to(dtype), cond).float()
            torch._dynamo.reset()
            out = fast_paths.compile_for_sampling(model)(x.to(dtype), cond).float()
        assert (out - ref).abs().max() <= tol * ref.abs().max()


# ---- the rest of the process --------------------------------------------------------------------------

def test_written_out_rms_norm_matches_torchs_on_strided_bf16_and_float32():
    from soragen.layers.attention import RMSNorm
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    qkv = torch.randn(2, 20, 3, 4, 64) * 3
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # a strided (B, heads, N, head_dim) view, as attention makes
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)):  # bf16: one rounding of the result
        x = q.to(dtype)
        ref = torch.nn.functional.rms_norm(x.float(), (64,), norm.weight, norm.eps)
        out = norm(x)
        assert out.dtype == dtype
        assert ((out.float() - ref).abs() <= tol * ref.abs() + 1e-6).all()


def test_keep_freed_memory_sets_glibc_malloc_and_can_be_turned_off(monkeypatch):
    from soragen.core import runtime
    if not runtime._glibc():
        pytest.skip("glibc's mallopt only")
    assert runtime.keep_freed_memory()  # mallopt accepted both settings
    monkeypatch.setenv("SORAGEN_MALLOC", "default")
    assert not runtime.keep_freed_memory()
