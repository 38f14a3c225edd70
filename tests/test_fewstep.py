"""Few-step videos: step-distillation LoRAs in the layouts people download (LightX2V / Lightning /
CausVid's original Wan names, kohya / musubi-tuner's, diffusers' own with lora_B biases) merged as
diffusers' load_lora_weights + fuse_lora merges them, and LCM sampling with explicit timesteps,
against diffusers on a tiny random Wan pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, cli
from soragen.families.wan import FAMILY as WAN
from soragen.families.wan import from_diffusers
from soragen.io import lora_file
from soragen.tools.tiny_wan import tiny_pipeline
from test_finetune import inputs, ours_forward

PROMPT = "a red ball moving right"
DIM, FFN, OUT = 40, 48, 16  # the tiny transformer's width, FFN width and output features (4 channels x 2 x 2)


def theirs_forward(transformer, x, t, text):
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def lightx2v_adapter(rank=4, alpha=8.0, seed=5, bias=True, norms="zero") -> dict[str, torch.Tensor]:
    """An adapter in the original Wan layout as LightX2V's distillation LoRAs are published:
    `diffusion_model.` names, lora_down / lora_up with an alpha, a `diff_b` bias delta beside every
    pair (attention, FFN, head), and norm deltas (`norms`: "zero" as in those files, "random", or
    "none"). Random values throughout."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    state = {}

    def pair(name, fan_in, fan_out, with_alpha=True):
        state[f"diffusion_model.{name}.lora_down.weight"] = rand(rank, fan_in)
        state[f"diffusion_model.{name}.lora_up.weight"] = rand(fan_out, rank)
        if with_alpha:
            state[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
        if bias:
            state[f"diffusion_model.{name}.diff_b"] = rand(fan_out)
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for part in "qkvo":
                pair(f"blocks.{i}.{attn}.{part}", DIM, DIM)
        pair(f"blocks.{i}.ffn.0", DIM, FFN)
        pair(f"blocks.{i}.ffn.2", FFN, DIM)
        if norms != "none":
            make = (lambda n: torch.zeros(n)) if norms == "zero" else rand
            for name in (f"blocks.{i}.self_attn.norm_q", f"blocks.{i}.cross_attn.norm_k", f"blocks.{i}.norm3"):
                state[f"diffusion_model.{name}.diff"] = make(DIM)
            state[f"diffusion_model.blocks.{i}.norm3.diff_b"] = make(DIM)
    pair("head.head", DIM, OUT, with_alpha=False)  # diffusers' converter reads no alpha for the head
    return state


def save_adapter(path, state, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def diffusers_fused(path, weight=1.0):
    """The tiny pipeline with the adapter loaded and fused by diffusers itself."""
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(path), adapter_name="a")
    if weight != 1.0:
        pipe.set_adapters(["a"], [weight])
    pipe.fuse_lora(components=["transformer"])
    return pipe


def soragen_merged(path, weight=1.0):
    dit = from_diffusers(tiny_pipeline().transformer).float()
    changed = lora_file.apply(dit, path, WAN, weight)
    return dit, changed


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_a_lightx2v_adapter_merges_as_diffusers_fuses_it_bias_deltas_included(tmp_path, weight):
    path = save_adapter(tmp_path / "lightx2v.safetensors", lightx2v_adapter())
    pipe = diffusers_fused(path, weight)
    dit, changed = soragen_merged(path, weight)
    # per block: qkv's weight and bias, proj's, q's, kv's, proj's, two FFN linears' (7 x 2), the
    # norms' 4 tensors (norm_q, norm_k, the cross-attention norm's weight and bias: zero deltas,
    # added all the same); and the head's weight and bias
    assert changed == 2 * (7 * 2 + 4) + 2
    x, t, text = inputs()
    with torch.no_grad():
        want = theirs_forward(pipe.transformer, x, t, text)
        plain = theirs_forward(tiny_pipeline().transformer, x, t, text)
        got = ours_forward(dit, x, t, text)
    assert (want - plain).abs().max() > 0.05  # the adapter does something
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()


def test_the_bias_deltas_matter(tmp_path):
    """Merged without its diff_b keys, the same adapter lands far from diffusers' fused model: a
    merge that dropped the bias deltas would fail the test above."""
    full = save_adapter(tmp_path / "full.safetensors", lightx2v_adapter())
    no_bias = save_adapter(tmp_path / "no-bias.safetensors", lightx2v_adapter(bias=False))
    pipe = diffusers_fused(full)
    dit, _ = soragen_merged(no_bias)
    x, t, text = inputs()
    with torch.no_grad():
        assert (ours_forward(dit, x, t, text) - theirs_forward(pipe.transformer, x, t, text)).abs().max() > 1e-2


def musubi_adapter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same pairs in kohya / musubi-tuner's names (`lora_unet_blocks_0_self_attn_q.lora_down.weight`);
    musubi has no bias deltas and an alpha on every pair."""
    out = {}
    for key, value in state.items():
        module, _, tail = key.removeprefix("diffusion_model.").partition(".lora_")
        if not tail or module.startswith("head"):
            continue
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{tail}"] = value
        out[f"{name}.alpha"] = state.get(f"diffusion_model.{module}.alpha", torch.tensor(4.0))
    return out


def diffusers_layout_with_bias(seed=6, rank=3) -> dict[str, torch.Tensor]:
    """diffusers' own layout with lora_B biases (what a peft LoRA with lora_bias=True saves)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(2):
        for name, fan_in, fan_out in ((f"blocks.{i}.attn1.to_k", DIM, DIM), (f"blocks.{i}.attn2.to_v", DIM, DIM),
                                      (f"blocks.{i}.ffn.net.0.proj", DIM, FFN)):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.1
            state[f"transformer.{name}.lora_B.bias"] = torch.randn(fan_out, generator=g) * 0.1
    return state


LAYOUTS = {
    "original, lora_A / lora_B names (ComfyUI)": lambda: {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
                                                          for k, v in lightx2v_adapter(seed=7).items()},
    "kohya / musubi-tuner": lambda: musubi_adapter(lightx2v_adapter(seed=8, bias=False, norms="none")),
    "diffusers with lora_B biases": diffusers_layout_with_bias,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_other_layouts_merge_as_diffusers_fuses_them(tmp_path, layout):
    path = save_adapter(tmp_path / "a.safetensors", LAYOUTS[layout]())
    pipe = diffusers_fused(path)
    dit, _ = soragen_merged(path)
    x, t, text = inputs()
    with torch.no_grad():
        want = theirs_forward(pipe.transformer, x, t, text)
        assert (want - theirs_forward(tiny_pipeline().transformer, x, t, text)).abs().max() > 0.05
        assert (ours_forward(dit, x, t, text) - want).abs().max() <= 1e-4


def test_whole_tensor_deltas_land_on_the_tensors_their_original_names_say(tmp_path):
    """The deltas diffusers' converter drops or fails on (a norm's, the patch embedding's kernel,
    a modulation table's, a weight inside our fused q/k/v, bias deltas without a LoRA pair): each
    added to the tensor diffusers' names say, as if added to WanPipeline's transformer before it
    is mapped onto ours (its kernel flattened, its k among the fused rows)."""
    g = torch.Generator().manual_seed(9)
    reference = tiny_pipeline().transformer
    theirs = dict(reference.named_parameters())
    deltas = {"patch_embedding.diff": "patch_embedding.weight", "blocks.0.modulation.diff": "blocks.0.scale_shift_table",
              "blocks.1.self_attn.k.diff": "blocks.1.attn1.to_k.weight", "blocks.1.norm3.diff": "blocks.1.norm2.weight",
              "blocks.0.cross_attn.norm_q.diff": "blocks.0.attn2.norm_q.weight",
              "text_embedding.0.diff_b": "condition_embedder.text_embedder.linear_1.bias",
              "time_projection.1.diff_b": "condition_embedder.time_proj.bias", "head.modulation.diff": "scale_shift_table",
              "head.head.diff": "proj_out.weight"}
    state = {}
    with torch.no_grad():
        for key, name in deltas.items():
            state[f"diffusion_model.{key}"] = torch.randn(theirs[name].shape, generator=g) * 0.1
            theirs[name].add_(state[f"diffusion_model.{key}"] * 0.5)
    path = save_adapter(tmp_path / "deltas.safetensors", state)
    dit, changed = soragen_merged(path, weight=0.5)
    assert changed == len(deltas)
    want = from_diffusers(reference).state_dict()
    got = dit.state_dict()
    assert all((got[k] - want[k]).abs().max() <= 1e-6 for k in want)


@pytest.mark.parametrize("key, shape", [("blocks.0.norm1.diff", (DIM,)), ("blocks.0.modulation.diff_b", (DIM,)),
                                        ("blocks.5.self_attn.q.diff_b", (DIM,))])
def test_a_delta_soragen_cannot_place_is_refused_naming_it(tmp_path, key, shape):
    """Wan's norm1 has no weight, a modulation table no bias, the tiny model no block 5: refused
    before any weight changes (diffusers drops the first two without a word)."""
    from soragen.core.errors import SoragenError
    state = {**lightx2v_adapter(), f"diffusion_model.{key}": torch.ones(shape)}
    path = save_adapter(tmp_path / "odd.safetensors", state)
    dit = from_diffusers(tiny_pipeline().transformer).float()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(SoragenError, match=key.replace(".", r"\.")):
        lora_file.apply(dit, path, WAN)
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


# ---- few-step sampling: LCM and explicit timesteps, against WanPipeline ------------------------------

RUN = dict(height=32, width=32, num_frames=5)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "Wan-tiny"
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder, max_shard_size="40KB")
    return folder, pipe


def lcm_reference(pipe, seed, steps, timesteps=None, pass_generator=True, output_type="latent"):
    """WanPipeline with diffusers' FlowMatchLCMScheduler at the folder's shift, guidance 1 (one
    pass per step). WanPipeline 0.42.1 does not pass its generator to `scheduler.step`, so LCM's
    re-noising would come from torch's global generator and differ run to run; here the
    scheduler's own step is called with the run's generator, the one WanPipeline drew the
    starting noise from: the same stream soragen draws from. Everything else (the loop, the
    transformer, the scheduler's arithmetic) is diffusers' as it is. `timesteps`: the scheduler's
    set_timesteps given them as sigmas t / 1000 (which it shifts), as soragen gives them."""
    import copy

    from diffusers import FlowMatchLCMScheduler
    pipe = copy.copy(pipe)
    scheduler = FlowMatchLCMScheduler(shift=pipe.scheduler.config.flow_shift)
    generator = torch.Generator("cpu").manual_seed(seed)
    step, set_timesteps = scheduler.step, scheduler.set_timesteps
    if pass_generator:
        scheduler.step = lambda *args, **kwargs: step(*args, generator=generator, **kwargs)
    if timesteps is not None:
        scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=[t / 1000 for t in timesteps],
                                                                       device=device)
    pipe.scheduler = scheduler
    return pipe(PROMPT, generator=generator, guidance_scale=1.0, num_inference_steps=steps, output_type=output_type,
                **RUN).frames


@pytest.mark.parametrize("timesteps", [None, (1000.0, 750.0, 500.0, 250.0)])
def test_lcm_at_guidance_1_matches_wanpipeline_with_its_generator_passed(wan_folder, timesteps):
    from soragen.pipeline import Pipeline
    folder, pipe = wan_folder
    want = lcm_reference(pipe, 7, 4, timesteps)
    ours = Pipeline.load(folder, device="cpu", dtype="float32")
    settings = ours.sampling(sampler="lcm", steps=None if timesteps else 4, guidance=1.0, timesteps=timesteps)
    assert settings.steps == 4
    latent = ours.sample_latent(PROMPT, 5, 32, 32, settings, seed=7)
    assert (latent - want).abs().max() <= 1e-4, (latent - want).abs().max()
    assert torch.equal(ours.sample_latent(PROMPT, 5, 32, 32, settings, seed=7), latent)  # a seed, one video
    assert (ours.sample_latent(PROMPT, 5, 32, 32, settings, seed=8) - latent).abs().max() > 0.1
    # the steps' noise matters: drawn from another generator, the video is another
    assert (lcm_reference(pipe, 7, 4, timesteps, pass_generator=False) - want).abs().max() > 0.1
    if timesteps:  # and the list matters: the default 4 steps land elsewhere
        assert (lcm_reference(pipe, 7, 4) - want).abs().max() > 1e-2


# ---- the command line: recommended settings, bad input ----------------------------------------------

SMALL = ["--frames", 5, "--height", 32, "--width", 32, "--dtype", "float32"]


def frames_in(folder) -> np.ndarray:
    from PIL import Image
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("frame_*.png"))])


def recipe_adapter(folder, recipe, name="lightx2v.safetensors"):
    return save_adapter(folder / name, lightx2v_adapter(), {"soragen.recipe": json.dumps(recipe)})


def test_an_adapters_recommended_settings_are_used_and_said_unless_overridden(wan_folder, tmp_path, capfd):
    folder, _ = wan_folder
    adapter = recipe_adapter(tmp_path, {"sampler": "lcm", "steps": 4, "guidance": 1, "shift": 5,
                                        "timesteps": [1000, 750, 500, 250]})
    plain = save_adapter(tmp_path / "plain.safetensors", lightx2v_adapter())
    capfd.readouterr()
    assert cli("generate", PROMPT, "--model", folder, "--lora", adapter, *SMALL, "--out", tmp_path / "a") == 0
    notes = [line for line in capfd.readouterr().err.splitlines() if "recommend" in line]
    assert notes == [f"note: using the settings {adapter} recommends: sampler lcm, steps 4, guidance 1, shift 5, "
                     f"timesteps 1000,750,500,250 (an option given overrides its own)"]
    assert cli("generate", PROMPT, "--model", folder, "--lora", plain, *SMALL, "--sampler", "lcm", "--guidance", 1,
               "--shift", 5, "--timesteps", "1000,750,500,250", "--out", tmp_path / "b") == 0
    assert np.array_equal(frames_in(tmp_path / "a"), frames_in(tmp_path / "b"))
    # each option given overrides its own: --steps drops the recommended list of timesteps too
    capfd.readouterr()
    assert cli("generate", PROMPT, "--model", folder, "--lora", adapter, *SMALL, "--steps", 2, "--guidance", 1.5,
               "--out", tmp_path / "c") == 0
    err = capfd.readouterr().err
    assert "recommends: sampler lcm, shift 5 (" in err and "lcm 2" in err and "guidance 1.5" in err


BAD_RECIPES = {
    "steps 0": ({"steps": 0}, ["steps", "between 1 and 1000"]),
    "a sampler soragen lacks": ({"sampler": "turbo"}, ["sampler", "turbo"]),
    "timesteps rising": ({"timesteps": [250, 500, 750, 1000]}, ["timesteps", "decrease"]),
    "timesteps past the schedule": ({"timesteps": [4000, 2000]}, ["timesteps", "at most 1000"]),
    "guidance negative": ({"guidance": -1}, ["guidance"]),
    "a key soragen does not know": ({"cfg": 1}, ["'cfg'"]),
    "not an object": ([4], ["JSON object"]),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_an_adapter_recommending_settings_out_of_range_is_one_line_naming_it(wan_folder, tmp_path, capfd, case):
    folder, _ = wan_folder
    recipe, needles = BAD_RECIPES[case]
    adapter = recipe_adapter(tmp_path, recipe, "odd.safetensors")
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", folder, "--lora", adapter, *SMALL, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, "odd.safetensors", *needles)
    assert not (tmp_path / "v.mp4").exists()


BAD_OPTIONS = {
    "timesteps rising": (["--timesteps", "250,500"], ["--timesteps", "decrease"]),
    "timesteps repeated": (["--timesteps", "500,500"], ["--timesteps", "decrease"]),
    "timesteps not numbers": (["--timesteps", "1000,half"], ["--timesteps", "numbers"]),
    "timesteps NaN": (["--timesteps", "nan"], ["--timesteps", "finite"]),
    "timesteps zero": (["--timesteps", "1000,0"], ["--timesteps", "above 0"]),
    "timesteps past the schedule": (["--timesteps", "1500,750"], ["--timesteps", "at most 1000"]),
    "timesteps and steps disagree": (["--timesteps", "1000,500", "--steps", 3], ["--timesteps", "--steps"]),
    "timesteps with dpm++": (["--timesteps", "1000,500", "--sampler", "dpm++"], ["--timesteps", "dpm++"]),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_timesteps_are_a_usage_error(wan_folder, tmp_path, capfd, case):
    folder, _ = wan_folder
    options, needles = BAD_OPTIONS[case]
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", folder, *SMALL, *options, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("options, needles", [(["--sampler", "lcm"], ["--sampler lcm", "DDPM"]),
                                              (["--timesteps", "999,500"], ["--timesteps", "flow-matching"])])
def test_lcm_and_timesteps_on_the_default_ddpm_model_are_a_usage_error(tmp_path, capfd, options, needles):
    capfd.readouterr()
    rc = cli("generate", PROMPT, *options, "--frames", 4, "--steps", 2, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("key, needle", [("blocks.0.norm1.diff", "cannot place"),
                                         ("blocks.0.self_attn.q.dora_scale", "DoRA")])
def test_an_adapter_with_a_key_soragen_cannot_place_is_one_line_naming_it(wan_folder, tmp_path, capfd, key, needle):
    """diffusers drops both (norm1 has no weight; DoRA's magnitudes with a warning): soragen refuses."""
    folder, _ = wan_folder
    adapter = save_adapter(tmp_path / "odd.safetensors", {**lightx2v_adapter(), f"diffusion_model.{key}": torch.ones(DIM)})
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", folder, "--lora", adapter, *SMALL, "--steps", 1, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, "odd.safetensors", key, needle)
    assert not (tmp_path / "v.mp4").exists()


def reference_frames(video) -> np.ndarray:
    return (video[0] * 255).round().astype(np.int16)


@pytest.mark.slow
def test_generate_with_a_lightx2v_adapter_gives_the_frames_of_wanpipeline_with_it_fused(wan_folder, tmp_path):
    """The latent of a video (where the adapter's effect shows: the tiny random VAE's frames barely
    depend on it) within 1e-4 of WanPipeline's with the adapter fused, far from the one without;
    and the PNG frames `generate` writes within 2 levels of WanPipeline's (merge, sampling, decode
    and writing end to end)."""
    from soragen.pipeline import Pipeline
    folder, plain = wan_folder
    adapter = save_adapter(tmp_path / "lightx2v.safetensors", lightx2v_adapter())
    pipe = diffusers_fused(adapter)
    run = dict(negative_prompt="the sky", guidance_scale=4.0, num_inference_steps=3, **RUN)
    latents = [p(PROMPT, output_type="latent", generator=torch.Generator("cpu").manual_seed(7), **run).frames
               for p in (pipe, plain)]
    ours = Pipeline.load(folder, device="cpu", dtype="float32", loras=[(adapter, 1.0)])
    latent = ours.sample_latent(PROMPT, 5, 32, 32, ours.sampling(steps=3, guidance=4.0, negative_prompt="the sky"),
                                seed=7)
    assert (latent - latents[0]).abs().max() <= 1e-4, (latent - latents[0]).abs().max()
    assert (latents[1] - latents[0]).abs().max() > 0.1
    want = pipe(PROMPT, output_type="np", generator=torch.Generator("cpu").manual_seed(7), **run).frames
    assert cli("generate", PROMPT, "--model", folder, "--lora", adapter, *SMALL, "--steps", 3, "--guidance", 4,
               "--negative-prompt", "the sky", "--seed", 7, "--out", tmp_path / "frames") == 0
    frames = frames_in(tmp_path / "frames")
    assert frames.shape == (5, 32, 32, 3)
    assert np.abs(frames.astype(np.int16) - reference_frames(want)).max() <= 2


@pytest.mark.slow
def test_generate_lcm_4_steps_guidance_1_gives_the_frames_of_the_reference(wan_folder, tmp_path):
    """The command line end to end (its latent is compared, tighter, above)."""
    folder, pipe = wan_folder
    want = lcm_reference(pipe, 3, 4, output_type="np")
    assert cli("generate", PROMPT, "--model", folder, *SMALL, "--sampler", "lcm", "--steps", 4, "--guidance", 1,
               "--seed", 3, "--out", tmp_path / "frames") == 0
    assert np.abs(frames_in(tmp_path / "frames").astype(np.int16) - reference_frames(want)).max() <= 2


def test_a14b_lightning_pair_goes_into_the_experts_named_as_diffusers_loads_it(tmp_path):
    """Wan2.2-Lightning's A14B adapters come as two files, one per expert: `FILE@high` and
    `FILE@low` merge each into its expert, as WanPipeline's load_lora_weights (the second with
    load_into_transformer_2) and fuse_lora do; the latent of a 4-step, guidance-1 video within 1e-4."""
    from soragen.pipeline import Pipeline
    pipe = tiny_pipeline(experts=2)
    folder = tmp_path / "Wan-a14b-tiny"
    pipe.save_pretrained(folder)
    high = save_adapter(tmp_path / "high_noise_model.safetensors", lightx2v_adapter(seed=11))
    low = save_adapter(tmp_path / "low_noise_model.safetensors", lightx2v_adapter(seed=12))
    pipe.load_lora_weights(str(high))
    pipe.load_lora_weights(str(low), load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer", "transformer_2"])
    want = pipe(PROMPT, guidance_scale=1.0, guidance_scale_2=1.0, num_inference_steps=4, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(4), **RUN).frames
    latents = {}
    for name, loras in (("named", [(high, 1.0, "high"), (low, 1.0, "low")]), ("swapped", [(high, 1.0, "low"),
                                                                                           (low, 1.0, "high")])):
        ours = Pipeline.load(folder, device="cpu", dtype="float32", loras=loras)
        latents[name] = ours.sample_latent(PROMPT, 5, 32, 32, ours.sampling(steps=4, guidance=1.0), seed=4)
    assert (latents["named"] - want).abs().max() <= 1e-4, (latents["named"] - want).abs().max()
    assert (latents["swapped"] - want).abs().max() > 1e-2
