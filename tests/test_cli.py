"""The `soragen` command line, end to end on a tiny random model.

Most tests call `soragen.cli.run(argv)` in-process (the model loads in a fraction of a second once
torch is imported); `test_subprocess_*` run `python -m soragen` for real exit codes and stderr.
Sizes and steps are kept small so the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli, listing, moving_square
from soragen import __version__
from soragen.io.video import probe_video, read_video, write_video

FAST = ["--steps", "2"]
COMMANDS = ["generate", "inspect-patches", "train", "train-vae", "make-dataset", "eval", "serve", "calibrate-cache"]
SCORE_KEYS = {"background", "color", "shape", "direction", "presence"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- generate: sizes and formats ----------------------------------------------------------------

@pytest.mark.parametrize("frames", [16, 7, 1])
def test_generate_mp4_has_the_asked_frame_count(tiny_model, outdir, capfd, frames):
    out = outdir / "x.mp4"
    assert cli("generate", "a red ball moving right", "--model", tiny_model, "--out", out,
               "--frames", frames, *FAST) == 0
    info = probe_video(out)
    assert (info.frames, info.height, info.width) == (frames, 32, 32)  # the model's default size
    assert info.fps == pytest.approx(8.0)
    assert f"{frames} frames" in capfd.readouterr().out
    assert listing(outdir) == ["x.mp4"]  # no temporary file left next to it


def test_generate_height_and_width(tiny_model, outdir):
    out = outdir / "wide.mp4"
    assert cli("generate", "a blue square", "--model", tiny_model, "--out", out, "--frames", 1,
               "--height", 48, "--width", 64, *FAST) == 0
    video, _ = read_video(out)
    assert video.shape == (1, 48, 64, 3)


def test_generate_gif_by_suffix(tiny_model, outdir):
    out = outdir / "x.gif"
    assert cli("generate", "a green circle", "--model", tiny_model, "--out", out, "--frames", 5,
               "--fps", 10, *FAST) == 0
    assert out.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    info = probe_video(out)
    assert (info.frames, info.height, info.width) == (5, 32, 32)
    assert info.fps == pytest.approx(10.0)


def test_generate_png_folder_without_suffix(tiny_model, outdir):
    from PIL import Image
    out = outdir / "frames"
    assert cli("generate", "a red ball", "--model", tiny_model, "--out", out, "--frames", 3, *FAST) == 0
    pngs = sorted(out.iterdir())
    assert [p.name for p in pngs] == [f"frame_{i:05d}.png" for i in range(3)]
    for png in pngs:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size == (32, 32)
    assert listing(outdir) == ["frames"] + [f"frames/{p.name}" for p in pngs]


# ---- generate: seeds, batches, samplers, dtypes -------------------------------------------------

def _frames_for(tiny_model, folder: Path, seed: int, name: str) -> np.ndarray:
    out = folder / name
    assert cli("generate", "a yellow triangle moving up", "--model", tiny_model, "--out", out,
               "--frames", 1, "--seed", seed, *FAST) == 0
    return read_video(out)[0]


def test_same_seed_same_frames_other_seed_other_frames(tiny_model, outdir):
    a = _frames_for(tiny_model, outdir, 7, "a.mp4")
    b = _frames_for(tiny_model, outdir, 7, "b.mp4")
    c = _frames_for(tiny_model, outdir, 8, "c.mp4")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_prompts_one_video_each_and_index(tiny_model, tmp_path, capfd, monkeypatch):
    import soragen.pipeline
    loads = []
    real_load = soragen.pipeline.load_model
    monkeypatch.setattr(soragen.pipeline, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    prompts = ["a red ball moving right", "# a comment line is skipped", "", "a blue square moving left"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "videos"
    assert cli("generate", "--prompts", tmp_path / "prompts.txt", "--out", out, "--model", tiny_model,
               "--frames", 1, *FAST) == 0
    assert len(loads) == 1  # the model loads once for the whole batch
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in index] == [prompts[0], prompts[3]]
    files = [r["file"] for r in index]
    assert len(set(files)) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["index.jsonl"])
    for name in files:
        info = probe_video(out / name)
        assert (info.frames, info.height, info.width) == (1, 32, 32)
    capfd.readouterr()


@pytest.mark.parametrize("option", [["--sampler", "dpm++"], ["--sampler", "unipc"],
                                    ["--dtype", "float32"], ["--dtype", "bfloat16"]])
def test_samplers_and_dtypes_on_cpu(tiny_model, outdir, capfd, option):
    out = outdir / "x.mp4"
    assert cli("generate", "a red ball", "--model", tiny_model, "--out", out, "--frames", 1, "--device", "cpu",
               *option, *FAST) == 0
    assert probe_video(out).frames == 1
    err = capfd.readouterr().err
    assert option[1] in err  # the summary line names the sampler / dtype really used


# ---- inspect-patches ----------------------------------------------------------------------------

def _expected_tokens(report: dict, spatial: int = 4, temporal: int = 4) -> tuple[list[int], int]:
    """The latent shape and token count by hand, from the test VAE's factors and the patch size."""
    t, h, w = report["frames"], report["height"], report["width"]
    latent = [4, 1 + math.ceil((t - 1) / temporal), h // spatial, w // spatial]
    pt, ph, pw = report["patch_size"]
    tokens = math.ceil(latent[1] / pt) * math.ceil(latent[2] / ph) * math.ceil(latent[3] / pw)
    return latent, tokens


def test_inspect_patches_json_report(tiny_model, tmp_path, outdir, capfd):
    from PIL import Image
    clip = write_video(tmp_path / "clip.mp4", moving_square(9, 32, 32), 8.0).path
    picture = outdir / "patches.png"
    assert cli("inspect-patches", clip, "--model", tiny_model, "--out", picture, "--json") == 0
    report = json.loads(capfd.readouterr().out)
    assert report["frames"] == 8  # the model's 8 frames, taken from the clip's 9
    assert (report["height"], report["width"]) == (32, 32)
    assert report["fps"] == pytest.approx(8.0)
    assert report["patch_size"] == [1, 2, 2]
    latent, tokens = _expected_tokens(report)
    assert report["latent_shape"] == latent == [4, 3, 8, 8]
    assert report["num_tokens"] == tokens == 48
    assert "kept" in report["resize"]
    assert report["picture"] == str(picture)
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.size[0] > 32
    assert listing(outdir) == ["patches.png"]


def test_inspect_patches_other_size_is_resized_and_cropped(tiny_model, tmp_path, outdir, capfd):
    clip = write_video(tmp_path / "wide.mp4", moving_square(6, 48, 80), 8.0).path
    picture = outdir / "wide.png"
    assert cli("inspect-patches", clip, "--model", tiny_model, "--out", picture, "--frames", 5, "--json") == 0
    report = json.loads(capfd.readouterr().out)
    assert (report["frames"], report["height"], report["width"]) == (5, 32, 32)
    assert "80x48" in report["input"]
    assert "resized 80x48" in report["resize"] and "crop" in report["resize"]
    latent, tokens = _expected_tokens(report)
    assert report["latent_shape"] == latent == [4, 2, 8, 8]
    assert report["num_tokens"] == tokens
    assert picture.is_file()


def test_inspect_patches_table(tiny_model, tiny_clip, outdir, capfd):
    assert cli("inspect-patches", tiny_clip, "--model", tiny_model, "--out", outdir / "p.png") == 0
    out = capfd.readouterr().out
    assert "tokens" in out and "VAE latent" in out


# ---- version and help ---------------------------------------------------------------------------

def test_version(capsys):
    assert cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"soragen {__version__}"


def test_top_level_help_lists_commands(capsys):
    assert cli("--help") == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_has_examples(capsys, command):
    assert cli(command, "--help") == 0
    out = capsys.readouterr().out
    assert "Example" in out
    assert f"soragen {command}" in out  # an example invocation, not only the usage line
    assert "Traceback" not in out


# ---- bad input: generate ------------------------------------------------------------------------

@pytest.mark.parametrize("option, needles", [
    (["--frames", "0"], ["--frames", "1"]),
    (["--steps", "0"], ["--steps", "1"]),
    (["--height", "30"], ["--height", "multiple of 8", "nearest valid value: 32"]),
    (["--width", "100000"], ["--width", "multiple of 8", "nearest valid value: 2048"]),
    (["--height", "0"], ["--height", "nearest valid value: 8"]),
    (["--fps", "0"], ["--fps"]),
    (["--sampler", "heun"], ["--sampler", "dpm++"]),
    (["--sampler", "euler"], ["--sampler euler", "DDPM", "unipc"]),  # flow matching's, not for this model
    (["--dtype", "float8"], ["unknown dtype", "bfloat16"]),
])
def test_generate_usage_errors(tiny_model, outdir, capfd, option, needles):
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", outdir / "x.mp4", *FAST, *option)
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(outdir) == []


@pytest.mark.parametrize("argv, needles", [
    (["generate", "a red ball", "--frames", "many"], ["--frames", "integer"]),
    (["generate", "a red ball", "--colour", "red"], ["no such option", "--colour"]),
    (["render", "a red ball"], ["no such command", "render"]),
    (["inspect-patches"], ["missing argument"]),
])
def test_option_parsing_errors_are_one_line_usage_errors(tiny_model, outdir, capfd, argv, needles):
    rc = cli(*argv, "--model", tiny_model, "--out", outdir / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(outdir) == []


def test_bare_soragen_shows_help(capfd):
    assert cli() == 2
    captured = capfd.readouterr()
    assert "generate" in captured.out and "Traceback" not in captured.err + captured.out


def _broken(tiny_model: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the tiny model, damaged in one way."""
    folder = tmp_path / "broken"
    if how == "missing":
        return folder
    shutil.copytree(tiny_model, folder)
    weights = folder / "dit" / "model.safetensors"
    if how == "incomplete":
        weights.unlink()
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "pickle":
        from safetensors.torch import load  # from bytes, not mmap: the file gets overwritten
        torch.save(load(weights.read_bytes()), weights)
    elif how == "nan":
        from safetensors.torch import load, save_file
        state = load(weights.read_bytes())
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name].view(-1)[0] = float("nan")
        save_file(state, str(weights))
    elif how == "newer":
        manifest = json.loads((folder / "soragen.json").read_text())
        manifest["format"] = 99
        (folder / "soragen.json").write_text(json.dumps(manifest))
    elif how == "odd-manifest":
        (folder / "soragen.json").write_text('["not", "a", "manifest"]')
    else:
        raise AssertionError(how)
    return folder


@pytest.mark.parametrize("how, needles", [
    ("missing", ["does not exist"]),
    ("incomplete", ["missing", "model.safetensors"]),
    ("truncated", ["not a valid safetensors"]),
    ("pickle", ["not a valid safetensors"]),
    ("nan", ["NaN"]),
    ("newer", ["format 99", "upgrade"]),
    ("odd-manifest", ["soragen.json", "not a soragen manifest"]),
])
def test_generate_bad_model_folder(tiny_model, tmp_path, outdir, capfd, monkeypatch, how, needles):
    model = _broken(tiny_model, tmp_path, how)
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: unpickled.append(a))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: unpickled.append(a))
    rc = cli("generate", "a red ball", "--model", model, "--out", outdir / "x.mp4", "--frames", 1, *FAST)
    assert_one_line_error(capfd.readouterr(), 1, rc, *needles)
    assert unpickled == []  # nothing was ever unpickled
    assert listing(outdir) == []


@pytest.mark.parametrize("name", ["x.avi", "x.png"])
def test_generate_unsupported_output_suffix(tiny_model, outdir, capfd, name):
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", outdir / name, *FAST)
    assert_one_line_error(capfd.readouterr(), 2, rc, name, ".mp4")
    assert listing(outdir) == []


def test_generate_unwritable_output(tiny_model, tmp_path, capfd):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file")
    before = listing(tmp_path)
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", blocker / "sub" / "x.mp4", "--frames", 1,
             *FAST)
    assert_one_line_error(capfd.readouterr(), 1, rc, "cannot write")
    assert listing(tmp_path) == before
    assert blocker.read_text() == "a regular file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_cuda_without_cuda(tiny_model, outdir, capfd):
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", outdir / "x.mp4", "--device", "cuda",
             "--frames", 1, *FAST)
    assert_one_line_error(capfd.readouterr(), 1, rc, "cuda")
    assert listing(outdir) == []


def test_generate_prompt_and_prompts_both_is_usage_error(tiny_model, tmp_path, outdir, capfd):
    (tmp_path / "p.txt").write_text("a red ball\n")
    rc = cli("generate", "a red ball", "--prompts", tmp_path / "p.txt", "--model", tiny_model, "--out", outdir)
    assert_one_line_error(capfd.readouterr(), 2, rc, "--prompts")
    assert listing(outdir) == []


# ---- bad input: inspect-patches -----------------------------------------------------------------

def _bad_video(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    path = folder / "clip.mp4"
    if how == "missing":
        pass
    elif how == "directory":
        path.mkdir()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        real = write_video(folder / "real.mp4", moving_square(9, 32, 32), 8.0).path.read_bytes()
        path.write_bytes(real[: len(real) // 2])
    elif how == "text":
        path.write_text("this is not a video, only text renamed to .mp4\n" * 20)
    elif how == "audio":
        import imageio_ffmpeg
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi",
                        "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(path)], check=True)
    else:
        raise AssertionError(how)
    return path


@pytest.mark.parametrize("how, needles", [
    ("missing", ["no such file"]),
    ("directory", ["directory"]),
    ("empty", ["empty"]),
    ("truncated", ["clip.mp4", "truncated"]),
    ("text", ["clip.mp4", "invalid data"]),
    ("audio", ["no video stream"]),
])
def test_inspect_patches_bad_video(tiny_model, tmp_path, outdir, capfd, how, needles):
    video = _bad_video(tmp_path, how)
    rc = cli("inspect-patches", video, "--model", tiny_model, "--out", outdir / "p.png", "--json")
    captured = capfd.readouterr()
    assert_one_line_error(captured, 1, rc, *needles)
    assert captured.out == ""
    assert listing(outdir) == []


@pytest.mark.parametrize("option, needles", [
    (["--frames", "0"], ["--frames", "1"]),
    (["--out", "patches.jpg"], ["png"]),
])
def test_inspect_patches_usage_errors(tiny_model, tiny_clip, outdir, capfd, monkeypatch, option, needles):
    monkeypatch.chdir(outdir)
    rc = cli("inspect-patches", tiny_clip, "--model", tiny_model, *option)
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(outdir) == []


def test_inspect_patches_default_picture_in_current_folder(tiny_model, tiny_clip, tmp_path, monkeypatch, capfd):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli("inspect-patches", tiny_clip, "--model", tiny_model, "--json") == 0
    report = json.loads(capfd.readouterr().out)
    assert listing(work) == ["clip.patches.png"]
    assert report["picture"] == "clip.patches.png"


# ---- eval ---------------------------------------------------------------------------------------

def test_eval_json_scores(tiny_model, capfd):
    assert cli("eval", "--model", tiny_model, "--limit", 2, "--steps", 2, "--json") == 0
    result = json.loads(capfd.readouterr().out)
    assert result["prompts"] == 2
    assert SCORE_KEYS <= set(result["scores"])
    assert all(0.0 <= result["scores"][k] <= 1.0 for k in SCORE_KEYS)
    for attribute, counts in result["mistakes"].items():  # every miss is listed once
        assert sum(counts.values()) == round(2 * (1 - result["scores"][attribute]))


def test_eval_table_lists_the_mistakes(tiny_model, capfd):
    assert cli("eval", "--model", tiny_model, "--limit", 2, "--steps", 2) == 0
    out = capfd.readouterr().out
    assert "accuracy" in out and "background" in out
    # An untrained model gets something wrong in two videos; the table names what was asked and seen.
    assert "mistakes (asked -> judged)" in out and " -> " in out


def test_eval_bad_limit(tiny_model, capfd):
    rc = cli("eval", "--model", tiny_model, "--limit", 0, "--json")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--limit")


# ---- a real process ----------------------------------------------------------------------------

def _soragen(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}
    env.pop("SORAGEN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "soragen", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_version(tmp_path):
    done = _soragen("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"soragen {__version__}"


def test_subprocess_errors_give_one_line_and_exit_code(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = _soragen("generate", "a red ball", "--model", tiny_model, "--out", out / "x.mp4", "--steps", 0,
                    cwd=tmp_path)
    assert_one_line_error(done, 2, done.returncode, "--steps")
    done = _soragen("generate", "a red ball", "--model", tmp_path / "no-model", "--out", out / "x.mp4",
                    cwd=tmp_path)
    assert_one_line_error(done, 1, done.returncode, "does not exist")
    assert done.stdout == ""
    assert listing(out) == []
