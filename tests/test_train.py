"""`soragen train` and `train-vae` on tiny real clips: checkpoints generate, resume is exact,
broken files are skipped, the cache is reused, two gloo processes train together."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from soragen.cli import run
from soragen.io.folders import latest_checkpoint
from soragen.io.model_folder import load_model

from conftest import SAMPLES, STATE_FILE, as_written_before_dcp, make_tiny_model


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from soragen.tools.shapes import make_dataset
    folder = tmp_path_factory.mktemp("data") / "clips"
    make_dataset(folder, n=6, seed=0, frames=9, size=32)
    return folder


@pytest.fixture(scope="module")
def model_for_vae(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base") / "model")


def train_args(clips, out, vae_model, cache, steps, *extra):
    return ["train", "--data", str(clips), "--out", str(out), "--vae", str(vae_model), "--preset", "test",
            "--frames", "9", "--height", "32", "--width", "32", "--batch-size", "2", "--max-steps", str(steps),
            "--save-every", "2", "--warmup", "2", "--cache-dir", str(cache), "--samples", str(SAMPLES), *extra]


@pytest.fixture(scope="module")
def filled_cache(clips, model_for_vae, tmp_path_factory):
    """A latent cache holding the clips' latents and captions, for runs whose subject is not the cache:
    a new process then starts training without encoding (or importing what encoding needs)."""
    folder = tmp_path_factory.mktemp("filled")
    assert run(train_args(clips, folder / "run", model_for_vae, folder / "cache", 1)) == 0
    return folder / "cache"


@pytest.mark.slow
def test_train_writes_checkpoints_that_generate(clips, model_for_vae, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(clips, out, model_for_vae, tmp_path / "cache", 4)) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["loss"] > 0 for m in metrics)
    assert (out / "loss.png").stat().st_size > 0
    assert len(list((out / "samples" / "step-000004").glob("*.mp4"))) == 1
    # The run folder stands for its latest checkpoint, whose samplers know what the DiT predicts.
    assert load_model(out).path.name == "checkpoint-4"
    assert load_model(out).scheduler_config["prediction_type"] == "v_prediction"
    video = tmp_path / "v.mp4"
    assert run(["generate", "a red ball", "--model", str(out), "--steps", "2", "--out", str(video)]) == 0
    from soragen.io.video import probe_video
    info = probe_video(video)
    assert (info.frames, info.height, info.width) == (9, 32, 32)


@pytest.mark.slow
def test_a_zero_terminal_snr_run_keeps_its_schedule_in_the_model(clips, model_for_vae, tmp_path):
    out = tmp_path / "run"
    args = train_args(clips, out, model_for_vae, tmp_path / "cache", 2, "--zero-terminal-snr")
    assert run(args) == 0
    config = load_model(out).scheduler_config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    from soragen.diffusion.sampling import training_scheduler
    assert training_scheduler(config).alphas_cumprod[-1] == 0
    assert run(["generate", "a red ball", "--model", str(out), "--steps", "2", "--out", str(tmp_path / "v.mp4")]) == 0
    # Resumed, the run keeps the schedule it started with.
    assert run(train_args(clips, out, model_for_vae, tmp_path / "cache", 4, "--resume")) == 0
    assert load_model(out).scheduler_config["rescale_betas_zero_snr"] is True
    # With the noise as the target, a pure-noise input would make the target the input itself.
    assert run(train_args(clips, tmp_path / "eps", model_for_vae, tmp_path / "cache", 2, "--zero-terminal-snr",
                          "--prediction", "epsilon")) == 2


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(clips, model_for_vae, tmp_path):
    cache = tmp_path / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(train_args(clips, straight, model_for_vae, cache, 4)) == 0
    assert run(train_args(clips, resumed, model_for_vae, cache, 2)) == 0
    assert run(train_args(clips, resumed, model_for_vae, cache, 4, "--resume")) == 0
    for name in ("dit/model.safetensors", f"train_state/dcp/{STATE_FILE}"):  # the weights, EMA and optimizer
        a, b = load_file(straight / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    # a run begun before train_state/dcp/ (its state in model, ema and optimizer files) resumes as exactly
    older = tmp_path / "older"
    assert run(train_args(clips, older, model_for_vae, cache, 2)) == 0
    names = [n for n, _ in load_model(older / "checkpoint-2").dit.named_parameters()]  # all of them train
    as_written_before_dcp(older / "checkpoint-2", names)
    assert run(train_args(clips, older, model_for_vae, cache, 4, "--resume")) == 0
    for name in ("dit/model.safetensors", f"train_state/dcp/{STATE_FILE}"):
        a, b = load_file(straight / "checkpoint-4" / name), load_file(older / "checkpoint-4" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_a_new_run_will_not_overwrite_an_old_one(clips, model_for_vae, tmp_path, capfd):
    out = tmp_path / "run"
    assert run(train_args(clips, out, model_for_vae, tmp_path / "cache", 2)) == 0
    assert run(train_args(clips, out, model_for_vae, tmp_path / "cache", 4)) == 2
    assert "--resume" in capfd.readouterr().err


@pytest.mark.slow
def test_broken_files_are_skipped_and_the_cache_is_reused(clips, model_for_vae, tmp_path, capfd):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(clips, data)
    (data / "empty.mp4").write_bytes(b"")
    (data / "notes.mp4").write_text("not a video at all")
    good = (data / "clip_00000.mp4").read_bytes()
    (data / "cut.mp4").write_bytes(good[: len(good) // 2])
    cache = tmp_path / "cache"
    assert run(train_args(data, tmp_path / "a", model_for_vae, cache, 2)) == 0
    err = capfd.readouterr().err
    assert "used 6 clips" in err and "skipped 3" in err
    assert "latent cache: 0 of 6 clips reused" in err
    assert len(list((cache / "latents").glob("*.safetensors"))) == 6
    assert run(train_args(data, tmp_path / "b", model_for_vae, cache, 2)) == 0
    assert "latent cache: 6 of 6 clips reused" in capfd.readouterr().err


def test_a_folder_of_only_broken_files_fails_clearly(model_for_vae, tmp_path, capfd):
    data = tmp_path / "broken"
    data.mkdir()
    (data / "a.mp4").write_bytes(b"")
    (data / "b.webm").write_text("nope")
    assert run(train_args(data, tmp_path / "run", model_for_vae, tmp_path / "cache", 2)) == 1
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]  # above it, at most the scan's progress bar
    assert last.startswith("error: no usable clip") and "Traceback" not in err


@pytest.mark.slow
def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(clips, model_for_vae, filled_cache, tmp_path):
    """SIGKILL a real run while it trains and saves every step, then resume it."""
    out = tmp_path / "run"
    args = train_args(clips, out, model_for_vae, filled_cache, 400, "--save-every", "1", "--keep-last", "2")
    proc = subprocess.Popen([sys.executable, "-m", "soragen", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("checkpoint-*"))) < 2:
        time.sleep(0.2)
    time.sleep(0.7)  # somewhere inside later steps and saves
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(out)
    assert latest is not None
    load_model(latest)  # loadable
    step = int(latest.name.split("-")[1])
    assert run(train_args(clips, out, model_for_vae, filled_cache, step + 1, "--resume")) == 0
    assert latest_checkpoint(out).name == f"checkpoint-{step + 1}"


@pytest.mark.slow
def test_train_vae_lowers_its_loss_and_feeds_train(clips, tmp_path):
    import shutil
    one = tmp_path / "one"  # a single clip: the loss must fall within a few steps
    one.mkdir()
    for f in clips.glob("clip_00000.*"):
        shutil.copy(f, one)
    out = tmp_path / "vae"
    assert run(["train-vae", "--data", str(one), "--out", str(out), "--preset", "test", "--frames", "5",
                "--height", "32", "--width", "32", "--batch-size", "2", "--max-steps", "30", "--save-every", "30",
                "--lr", "1e-3", "--warmup", "1"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    vae_config = json.loads((out / "checkpoint-30" / "vae" / "config.json").read_text())
    assert vae_config["latents_std"] != [1.0] * 4  # measured latent statistics were stored
    run_dir = tmp_path / "dit"
    assert run(train_args(clips, run_dir, out, tmp_path / "cache", 2)) == 0
    assert load_model(run_dir).vae.latent_channels == 4


@pytest.mark.slow
def test_train_vae_decoder_only_keeps_the_latents_and_changes_the_decoder(clips, model_for_vae, tmp_path, capfd):
    base = model_for_vae / "vae"
    out = tmp_path / "dec"
    args = ["train-vae", "--data", str(clips), "--out", str(out), "--frames", "5", "--height", "32", "--width", "32",
            "--batch-size", "2", "--max-steps", "3", "--save-every", "3", "--lr", "1e-3", "--warmup", "1",
            "--decoder-only"]
    assert run(args + ["--init", str(base)]) == 0
    before = load_file(base / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "checkpoint-3" / "vae" / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    capfd.readouterr()
    args[args.index(str(out))] = str(tmp_path / "no-init")
    assert run(args) == 2  # nothing to fine-tune without --init
    assert "--decoder-only fine-tunes a trained VAE" in capfd.readouterr().err


@pytest.mark.slow
def test_train_init_with_another_vae_moves_the_dit_onto_its_latents(clips, model_for_vae, tmp_path, capfd):
    from soragen.core.config import vae_preset_config
    from soragen.models.vae import new_vae, save_vae
    other = make_tiny_model(tmp_path / "other", seed=1)  # same sizes, other weights
    base = make_tiny_model(tmp_path / "base")
    manifest = json.loads((base / "soragen.json").read_text())
    manifest["sampling"] = {"sampler": "dpm++", "steps": 7, "guidance": 2.0}  # tuned for this model
    (base / "soragen.json").write_text(json.dumps(manifest))
    out = tmp_path / "moved"
    assert run(train_args(clips, out, other / "vae", tmp_path / "cache", 2, "--init", str(base))) == 0
    moved, init, donor = load_model(out), load_model(base), load_model(other)
    assert (moved.sampling.sampler, moved.sampling.steps, moved.sampling.guidance) == ("dpm++", 7, 2.0)
    assert all(torch.equal(v, donor.vae.model.state_dict()[k]) for k, v in moved.vae.model.state_dict().items())
    assert not all(torch.equal(v, init.vae.model.state_dict()[k]) for k, v in moved.vae.model.state_dict().items())
    # the DiT starts from --init's weights (two steps, EMA 0.999: still close), not from fresh ones
    near = [(v.float() - init.dit.state_dict()[k].float()).abs().max() < 1e-3 for k, v in moved.dit.state_dict().items()]
    same = [torch.equal(v, donor.dit.state_dict()[k]) for k, v in moved.dit.state_dict().items()]
    assert all(near) and not all(same)

    wide = tmp_path / "wide"  # 8-channel latents for a DiT that takes 4
    save_vae(new_vae(dict(vae_preset_config("test"), z_dim=8, latents_mean=[0.0] * 8, latents_std=[1.0] * 8)), wide)
    capfd.readouterr()
    assert run(train_args(clips, tmp_path / "bad", wide, tmp_path / "cache", 2, "--init", str(model_for_vae))) == 2
    assert "makes 8-channel latents; the --init DiT takes 4" in capfd.readouterr().err


@pytest.mark.slow
def test_train_vae_crop_trains_on_full_scale_windows_of_each_clip(clips, model_for_vae, tmp_path, capfd):
    from soragen.core.config import TrainConfig, VAEObjective
    from soragen.train.data import scan_clips
    from soragen.train.tasks import VAETask
    from soragen.models.vae import load_vae

    found = scan_clips(clips, 5, 8.0).clips
    vae = load_vae(model_for_vae / "vae")
    cfg = TrainConfig(frames=5, fps=8.0, height=32, width=32)
    whole = VAETask(vae, found, cfg, VAEObjective(kl_weight=0.0))
    cropped = VAETask(vae, found, cfg, VAEObjective(kl_weight=0.0, crop=16))
    offsets = set()
    for step in range(6):
        full = whole._clip(step % len(found), torch.Generator().manual_seed(step))
        part = cropped._clip(step % len(found), torch.Generator().manual_seed(step))
        assert part.shape == (5, 16, 16, 3)
        # the same frames, not resized: the crop is a window of the whole frame
        hits = [(y, x) for y in range(17) for x in range(17) if (full[:, y:y + 16, x:x + 16] == part).all()]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 1  # the window moves

    args = ["train-vae", "--data", str(clips), "--out", str(tmp_path / "run"), "--init", str(model_for_vae / "vae"),
            "--frames", "5", "--height", "32", "--width", "32", "--batch-size", "2", "--max-steps", "1",
            "--save-every", "1"]
    assert run(args + ["--crop", "16"]) == 0
    capfd.readouterr()
    assert run(args[:4] + [str(tmp_path / "bad")] + args[5:] + ["--crop", "15"]) == 2
    assert "--crop must be a multiple of" in capfd.readouterr().err


@pytest.mark.slow
def test_train_object_weight_changes_the_loss_and_a_resume_keeps_it(clips, tmp_path, capfd):
    from soragen.io.folders import default_model_dir
    vae = default_model_dir() / "vae"  # a trained VAE: a random one's latents show no objects to weigh
    cache = tmp_path / "cache"
    plain, weighted = tmp_path / "plain", tmp_path / "weighted"
    assert run(train_args(clips, plain, vae, cache, 2)) == 0
    assert run(train_args(clips, weighted, vae, cache, 2, "--object-weight", "4")) == 0
    first = [json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"] for run_dir in (plain, weighted)]
    assert first[0] != first[1]  # same weights, batch, noise and steps: only the weighting differs
    assert run(train_args(clips, weighted, vae, cache, 4, "--resume")) == 0
    assert json.loads((weighted / "train_config.json").read_text())["objective"]["object_weight"] == 4.0
    capfd.readouterr()
    assert run(train_args(clips, tmp_path / "bad", vae, cache, 2, "--object-weight", "-1")) == 2
    assert "--object-weight must be between 0 and 1000" in capfd.readouterr().err


def test_cosine_schedule_warms_up_then_falls_to_zero_at_max_steps():
    from soragen.core.config import TrainConfig
    from soragen.train.loop import learning_rate
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, lr_schedule="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)  # warm-up: (step + 1) / warmup
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60) == pytest.approx(0.5e-3)  # half way down
    assert learning_rate(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    constant = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert learning_rate(constant, 100) == 1e-3


@pytest.mark.slow
def test_the_python_api_the_cli_and_training_samples_make_the_same_video(clips, model_for_vae, tmp_path):
    """One source of defaults: a checkpoint's sample video, `soragen generate --model CHECKPOINT` and
    Pipeline.load(CHECKPOINT).generate(...) give the same frames for the same prompt and seed."""
    import numpy as np
    from soragen.pipeline import Pipeline
    from soragen.io.video import read_video, write_video
    out = tmp_path / "run"
    assert run(train_args(clips, out, model_for_vae, tmp_path / "cache", 2)) == 0
    prompt = SAMPLES.read_text().splitlines()[0]
    sample, _ = read_video(out / "samples" / "step-000002" / "00.mp4")
    assert run(["generate", prompt, "--model", str(out), "--out", str(tmp_path / "cli.mp4"), "--seed", "0"]) == 0
    api = Pipeline.load(out).generate(prompt, seed=0)
    write_video(tmp_path / "api.mp4", api, 8.0)
    for other in ("cli.mp4", "api.mp4"):
        assert np.array_equal(read_video(tmp_path / other)[0], sample), other
