"""Step caches (generate --cache, soragen calibrate-cache): at threshold 0 nothing changes, bit for
bit, on either family; First-Block-Cache skips the passes diffusers' hook skips on the same tiny
Wan pipeline and lands where it lands; TaylorSeer and MagCache skip on the schedules their rules
give, the conditional and unconditional passes each with its own state; bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, cli, listing
from soragen.diffusion.caches import CacheSpec, parse_cache
from soragen.tools.tiny_wan import tiny_pipeline

PROMPT = "a red ball moving right"
SMALL = dict(frames=5, height=32, width=32)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from soragen.pipeline import Pipeline
    folder = tmp_path_factory.mktemp("wan") / "Wan-tiny"
    tiny_pipeline().save_pretrained(folder, max_shard_size="40KB")
    return folder, Pipeline.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ours():
    from soragen.io.folders import default_model_dir
    from soragen.pipeline import Pipeline
    return Pipeline.load(default_model_dir(), device="cpu", dtype="float32")


def sample(pipe, steps, cache=None, seed=7, **given):
    size = SMALL if pipe.model.dit.config.positions == "rope" else dict(frames=8, height=32, width=32)
    settings = pipe.sampling(steps=steps, **given)
    return pipe.sample_latent(PROMPT, *size.values(), settings, seed=seed, cache=cache)


ALWAYS_SKIP = ((1.0,) * 50, (1.0,) * 50)  # magnitude ratios that never add error: MagCache skips all it may


@pytest.mark.parametrize("family", ["wan", "ours"])
@pytest.mark.parametrize("spec", [CacheSpec("first-block", 0.0), CacheSpec("taylorseer", 0.0),
                                  CacheSpec("taylorseer", 0.0, order=2), CacheSpec("magcache", 0.0, ratios=ALWAYS_SKIP)],
                         ids=str)
def test_every_cache_at_threshold_0_gives_the_latent_of_no_cache_bit_for_bit(request, family, spec):
    pipe = request.getfixturevalue("ours") if family == "ours" else request.getfixturevalue("wan")[1]
    plain = sample(pipe, 10)
    assert pipe.passes == {"run": 20, "skipped": 0, "skipped_at": []}  # guided: a cond and an uncond pass a step
    cached = sample(pipe, 10, spec)
    assert pipe.passes == {"run": 20, "skipped": 0, "skipped_at": []}
    assert torch.equal(cached, plain)
    # and the same cache above 0 does skip, and moves the latent: the equality above is not vacuous
    loose = CacheSpec(spec.kind, 2.0 if spec.kind != "taylorseer" else 2, spec.order, spec.ratios)
    moved = sample(pipe, 10, loose)
    assert pipe.passes["skipped"] > 0 and not torch.equal(moved, plain)


def diffusers_fbc(threshold: float, steps: int):
    """diffusers' WanPipeline (the same tiny weights) with its First-Block-Cache hook: the latent,
    and the (step, row) of the passes whose remaining blocks did not run (row 0 cond, 1 uncond)."""
    from diffusers import FirstBlockCacheConfig
    pipe = tiny_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    calls, ran = [], set()
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(len(calls)))
    pipe.transformer.blocks[-1].ffn.register_forward_hook(lambda module, args, out: ran.add(calls[-1]))
    latent = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(7), num_inference_steps=steps,
                  output_type="latent", num_frames=5, height=32, width=32).frames
    assert len(calls) == 2 * steps  # WanPipeline: a cond call, then an uncond one, each step
    return latent, [(call // 2, call % 2) for call in range(len(calls)) if call not in ran]


@pytest.mark.parametrize("threshold, steps", [(1.0, 10), (1.3, 10), (1.0, 20)])
def test_first_block_cache_skips_the_passes_diffusers_hook_skips_and_lands_on_its_latent(wan, threshold, steps):
    _, pipe = wan
    want, skipped = diffusers_fbc(threshold, steps)
    latent = sample(pipe, steps, CacheSpec("first-block", threshold))
    assert 0 < len(skipped) < 2 * steps  # some passes skipped, some run: the thresholds decide
    assert pipe.passes["skipped_at"] == skipped
    assert (latent - want).abs().max() <= 1e-4, (latent - want).abs().max()


def test_taylorseer_extrapolates_k_passes_after_each_full_one_after_3_full_steps(wan):
    _, pipe = wan
    sample(pipe, 10, CacheSpec("taylorseer", 2))
    assert pipe.passes["skipped_at"] == [(step, row) for step in (3, 4, 6, 7, 9) for row in (0, 1)]
    assert pipe.passes["run"] == 10


def test_magcache_skips_while_the_ratios_add_no_error_and_each_pass_keeps_its_own(wan):
    _, pipe = wan
    # ratios of 1: no error; never in the first fifth of the steps (2 of 10), at most 3 in a row
    sample(pipe, 10, CacheSpec("magcache", 0.06, ratios=ALWAYS_SKIP))
    assert pipe.passes["skipped_at"] == [(step, row) for step in (2, 3, 4, 6, 7, 8) for row in (0, 1)]
    # the unconditional pass's ratios say it changes: only the conditional one skips
    sample(pipe, 10, CacheSpec("magcache", 0.06, ratios=((1.0,) * 10, (1.5,) * 10)))
    assert pipe.passes["skipped_at"] == [(step, 0) for step in (2, 3, 4, 6, 7, 8)]
    # at guidance 1 only the conditional pass runs: it has its own state too
    sample(pipe, 10, CacheSpec("magcache", 0.06, ratios=ALWAYS_SKIP), guidance=1.0)
    assert pipe.passes["skipped_at"] == [(step, 0) for step in (2, 3, 4, 6, 7, 8)]


def test_calibration_interpolates_to_the_run_and_a_first_block_cache_on_two_rows_runs_only_the_one_needing_it(wan):
    from soragen.diffusion.caches import FirstBlockCache
    _, pipe = wan
    # ratios measured at 5 steps serve a run of 10 (diffusers' nearest_interp)
    sample(pipe, 10, CacheSpec("magcache", 0.06, ratios=((1.0,) * 5, (1.0,) * 5)))
    assert pipe.passes["skipped"] == 12
    # one row skipping and one running: the blocks run for that one row, the other reuses its residual
    cache, dit = FirstBlockCache(CacheSpec("first-block", 0.5), 2), pipe.model.dit
    x = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    from soragen.pipeline import CachedDiT
    text = pipe.encode(PROMPT, "")[0]
    cached = CachedDiT(dit, dit.predict, torch.tensor([900.0, 899.0]), pipe.device, pipe.dtype)
    both = text.cat(text)
    cond = cached.conditioning(x, torch.full((2,), 900.0), both)
    first = cache(dit, x, cond, 0)
    assert torch.equal(first, dit.predict(x, cond))
    nudged = x.clone()
    nudged[1] += 5 * torch.randn(x[1].shape, generator=torch.Generator().manual_seed(1))
    second = cache(dit, nudged, cond, 1)
    assert cache.ran[2:] == [(1, 0, False), (1, 1, True)]
    assert (second[1] - dit.predict(nudged, cond)[1]).abs().max() <= 1e-5
    assert (second[0] - first[0]).abs().max() <= 1e-5  # row 0 did not change: its reused residual is its own


# ---- the command line ---------------------------------------------------------------------------

OPTIONS = ["--frames", 5, "--height", 32, "--width", 32, "--steps", 6, "--dtype", "float32"]


@pytest.mark.parametrize("cache, needles", [("bogus", ["--cache", "bogus", "first-block"]),
                                            ("first-block:-1", ["--cache", "at least 0"]),
                                            ("first-block:nan", ["--cache", "finite"]),
                                            ("magcache:-0.5", ["--cache", "at least 0"]),
                                            ("taylorseer:1.5", ["--cache", "whole number"]),
                                            ("first-block:0.1:3", ["--cache", "too many"])])
def test_a_bad_cache_is_a_usage_error(wan, tmp_path, capfd, cache, needles):
    folder, _ = wan
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", folder, *OPTIONS, "--cache", cache, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(tmp_path) == []


def test_magcache_without_a_calibration_says_how_to_calibrate(wan, tmp_path, capfd):
    folder, _ = wan
    before = listing(folder)
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", folder, *OPTIONS, "--cache", "magcache", "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, "magcache", f"soragen calibrate-cache --model {folder}")
    assert listing(tmp_path) == [] and listing(folder) == before


def test_calibrate_cache_writes_into_the_model_folder_says_so_and_generate_uses_it(wan, tmp_path, capfd):
    folder, _ = wan
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\nthe blue sky\n")
    target = folder / "magcache.json"
    try:
        assert cli("calibrate-cache", "--model", folder, "--prompts", prompts, *OPTIONS) == 0
        out = capfd.readouterr().out
        assert str(target) in out and "model's folder" in out
        written = json.loads(target.read_text())
        assert written["steps"] == 6 and len(written["ratios"]) == 2 and len(written["ratios"][0]) == 6
        assert written["ratios"][0][0] == 1.0 and written["ratios"][0][1] != 1.0
        rc = cli("generate", PROMPT, "--model", folder, *OPTIONS, "--cache", "magcache:5", "--timings", "stderr",
                 "--out", tmp_path / "v.mp4")
        assert rc == 0 and (tmp_path / "v.mp4").is_file()
        timings = json.loads([line for line in capfd.readouterr().err.splitlines() if line.startswith("{")][-1])
        assert timings["dit_passes_run"] + timings["dit_passes_skipped"] == 12 and timings["dit_passes_skipped"] > 0
    finally:
        target.unlink(missing_ok=True)


def test_calibrate_cache_never_replaces_a_users_file(wan, tmp_path, capfd):
    folder, _ = wan
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    target = folder / "magcache.json"
    target.write_text('{"mine": true}\n')
    try:
        capfd.readouterr()
        rc = cli("calibrate-cache", "--model", folder, "--prompts", prompts, *OPTIONS)
        assert_one_line_error(capfd.readouterr(), 1, rc, str(target), "not a calibration soragen wrote")
        assert target.read_text() == '{"mine": true}\n'
    finally:
        target.unlink()


def test_a_hub_snapshots_and_the_builtin_models_calibration_go_to_soragens_cache(tmp_path, monkeypatch):
    from soragen.io.cache_file import calibration_file
    from soragen.io.folders import default_model_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    snapshot = tmp_path / "hub" / "models--Org--Wan-tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for folder in (snapshot, default_model_dir()):
        where = calibration_file(folder)
        assert where.parent == tmp_path / "xdg" / "soragen" / "magcache", where
    assert calibration_file(snapshot).name.startswith("models--Org--Wan-tiny-")
    assert calibration_file(tmp_path) == tmp_path.resolve() / "magcache.json"


def test_parse_cache():
    assert parse_cache("none") is None and parse_cache(None) is None
    assert parse_cache("first-block") == CacheSpec("first-block", 0.05)
    assert parse_cache("taylorseer:3:2") == CacheSpec("taylorseer", 3, 2)
    assert parse_cache("magcache:0.1") == CacheSpec("magcache", 0.1)
    from soragen.diffusion.caches import make_cache
    assert make_cache(CacheSpec("magcache", 0.0), 10) is not None  # at 0 no ratios are read: it changes nothing
    with pytest.raises(Exception, match="calibrate-cache"):
        make_cache(CacheSpec("magcache", 0.06), 10)


def test_two_experts_keep_a_cache_each_the_second_starting_with_full_passes(tmp_path):
    from soragen.pipeline import Pipeline
    tiny_pipeline(experts=2).save_pretrained(tmp_path / "a14b", max_shard_size="40KB")
    pipe = Pipeline.load(tmp_path / "a14b", device="cpu", dtype="float32")
    plain = sample(pipe, 10)
    assert torch.equal(sample(pipe, 10, CacheSpec("taylorseer", 0)), plain)
    for spec in (CacheSpec("taylorseer", 2), CacheSpec("first-block", 2.0), CacheSpec("magcache", 0.5,
                                                                                    ratios=ALWAYS_SKIP)):
        latent = sample(pipe, 10, spec)
        assert torch.isfinite(latent).all() and pipe.passes["skipped"] > 0, spec
        assert pipe.passes["run"] + pipe.passes["skipped"] == 20
    # TaylorSeer: the second expert's first steps are full passes of its own, whatever the step
    settings = pipe.sampling(steps=10)
    from soragen.diffusion.sampling import make_scheduler, set_schedule
    scheduler = make_scheduler(settings.sampler, pipe.model.scheduler_config)
    set_schedule(scheduler, 10)
    first_low = next(i for i, t in enumerate(scheduler.timesteps) if float(t) < pipe.model.boundary)
    sample(pipe, 10, CacheSpec("taylorseer", 2))
    assert not any(step in range(first_low, first_low + 3) for step, _ in pipe.passes["skipped_at"])
