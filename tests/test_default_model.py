"""The built-in model: shipped inside the package, small, loads offline, and is what `generate`,
`inspect-patches` and `eval` use without --model."""

import json

import pytest

from soragen.cli import run
from soragen.io.folders import default_model_dir
from soragen.io.model_folder import load_model
from soragen.io.video import probe_video


@pytest.fixture(scope="module")
def default_dir():
    folder = default_model_dir()
    assert folder is not None, "the package ships src/soragen/weights/default/"
    return folder


def test_shipped_weights_are_small_safetensors(default_dir):
    files = [f for f in default_dir.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    # the text encoder is referenced, not copied
    assert json.loads((default_dir / "text_encoder.json").read_text())["source"] == "default"


def test_the_default_model_loads_offline(default_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(default_dir)
    assert (model.video.frames, model.video.height, model.video.width) == (16, 64, 64)
    assert model.vae.latent_channels == model.dit.config.in_channels


def test_generate_without_model_writes_16_frames(tmp_path, capfd):
    out = tmp_path / "ball.mp4"
    assert run(["generate", "a red ball moving right in the blue sky", "--out", str(out)]) == 0
    info = probe_video(out)
    assert (info.frames, info.height, info.width) == (16, 64, 64)


@pytest.mark.slow
def test_other_frame_counts_still_work(tmp_path):
    out = tmp_path / "short.mp4"
    assert run(["generate", "a white box rising at night", "--frames", "9", "--steps", "4", "--out", str(out)]) == 0
    assert probe_video(out).frames == 9


@pytest.mark.slow
def test_eval_runs_on_two_prompts(tmp_path, capfd):
    capfd.readouterr()
    assert run(["eval", "--limit", "2", "--json", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["prompts"] == 2
    assert set(result["scores"]) >= {"background", "color", "shape", "direction", "presence", "all"}
    assert len(list((tmp_path / "eval").glob("*.mp4"))) == 2


@pytest.mark.slow
def test_inspect_patches_uses_the_default_model(tmp_path, capfd):
    from conftest import moving_square
    from soragen.io.video import write_video
    clip = write_video(tmp_path / "c.mp4", moving_square(16, 64, 64), 8.0).path
    capfd.readouterr()
    assert run(["inspect-patches", str(clip), "--json", "--out", str(tmp_path / "p.png")]) == 0
    report = json.loads(capfd.readouterr().out)
    assert report["latent_shape"][1:] == [5, 16, 16] and report["num_tokens"] == 5 * 8 * 8


@pytest.mark.slow
def test_eval_reconstruct_judges_the_shipped_vaes_round_trips(tmp_path, capfd):
    capfd.readouterr()
    assert run(["eval", "--reconstruct", "--limit", "3", "--json", "--out", str(tmp_path / "rt")]) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["settings"] == {"reconstruct": True} and result["prompts"] == 3
    # The shipped VAE keeps every background and the object in every frame (measured: 60 of 60).
    assert result["scores"]["background"] == 1.0 and result["scores"]["presence"] > 0.9
    records = [json.loads(line) for line in (tmp_path / "rt" / "results.jsonl").read_text().splitlines()]
    assert [probe_video(tmp_path / "rt" / r["file"]).frames for r in records] == [16, 16, 16]


@pytest.mark.slow  # a new process
def test_a_video_from_the_default_model_imports_neither_diffusers_nor_transformers(tmp_path):
    """The first video as a new process: its time is mostly imports, and diffusers' and transformers'
    cost seconds. The default model's text encoder, sampler and VAE decoder are soragen's own."""
    import subprocess
    import sys
    script = ("import sys\nfrom soragen.cli.app import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
              "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft', 'torchao'})\n"
              "print('HEAVY', heavy, 'DYNAMO', 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script, "generate", "a red ball", "--frames", "5", "--steps", "2",
                          "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] DYNAMO False" in out.stdout, out.stdout
    assert (tmp_path / "v.mp4").stat().st_size > 0
