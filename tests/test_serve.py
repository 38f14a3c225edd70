"""soragen serve without a browser: the command's safety rules and one-line errors, and what the page
does with a request (soragen.cli.studio) on a tiny random model: the CLI's messages for bad settings,
the video and its history (kept across a restart), Cancel, the seed reported back, LoRA weights.

The page driven from a real browser is tests/test_serve_browser.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli
from soragen.cli.serve import MISSING_GRADIO, is_loopback
from soragen.cli.studio import HISTORY, RANDOM_SEEDS, Cancelled, Lora, Request, Studio
from soragen.core.errors import SoragenError, UsageError
from soragen.io.video import read_video as read_with_fps

pytestmark = pytest.mark.usefixtures("one_thread")


def read_video(path) -> np.ndarray:
    return read_with_fps(path)[0]
FAST = {"steps": 2, "frames": 8}


def _soragen(*args, env_extra=None, code=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100", **(env_extra or {})}
    env.pop("SORAGEN_DEBUG", None)
    argv = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, "-m", "soragen", *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


# ---- the command: who may reach it, and its errors -------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.org", "127.0.0.1.example.org"])
def test_other_hosts_are_not_loopback(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("argv, needles", [
    (["--host", "0.0.0.0"], ["--host 0.0.0.0", "--auth", "--insecure"]),
    (["--host", "192.168.1.5"], ["--host 192.168.1.5", "--auth"]),
    (["--host", "::"], ["--host ::", "--auth"]),
    (["--auth", "alice"], ["--auth", "USER:PASSWORD"]),
    (["--auth", ":secret"], ["USER:PASSWORD"]),
    (["--auth", "alice:"], ["USER:PASSWORD"]),
    (["--host", "0.0.0.0", "--auth", "alice"], ["USER:PASSWORD"]),
    (["--port", "0"], ["--port"]),
    (["--port", "70000"], ["--port"]),
    (["--device", "tpu"], ["unknown device"]),
])
def test_serve_usage_errors_before_anything_starts(capfd, tmp_path, argv, needles):
    rc = cli("serve", "--out", tmp_path / "out", *argv)
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)


def test_a_non_loopback_host_without_auth_is_refused_by_the_real_command(tmp_path):
    done = _soragen("serve", "--host", "0.0.0.0", "--out", tmp_path / "out")
    assert_one_line_error(done, 2, done.returncode, "--host 0.0.0.0", "--auth USER:PASSWORD", "--insecure")
    assert done.stdout == ""


def test_insecure_says_what_it_means(capsys):
    assert cli("serve", "--help") == 0
    text = " ".join(word for word in capsys.readouterr().out.split() if word != "│")  # rich's box, wrapped
    assert "--insecure" in text and "anyone who can reach the port" in text


def test_without_gradio_one_line_says_how_to_install_it(tmp_path):
    # Gradio made unimportable the way Python marks a missing module (None in sys.modules)
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from soragen.cli import run; sys.exit(run(sys.argv[1:]))")
    done = _soragen("serve", "--port", _free_port(), "--out", tmp_path / "out", code=code)
    line = assert_one_line_error(done, 1, done.returncode, "pip install 'soragen[serve]'")
    assert line == f"error: {MISSING_GRADIO}"


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capfd):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc = cli("serve", "--port", busy.getsockname()[1], "--out", tmp_path / "out", "--model", tmp_path / "none")
    assert_one_line_error(capfd.readouterr(), 1, rc, "cannot serve on 127.0.0.1:", "in use")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a request: the CLI's checks and messages ----------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_model):
    from soragen.pipeline import Pipeline
    return Pipeline.load(tiny_model, dtype="float32")


@pytest.fixture
def studio(pipe, tmp_path):
    return Studio(pipe, tmp_path / "serve")


@pytest.mark.parametrize("settings, options", [
    ({"frames": 0}, ["--frames", "0"]),
    ({"steps": 0}, ["--steps", "0"]),
    ({"height": 33}, ["--height", "33"]),
    ({"width": 100000}, ["--width", "100000"]),
    ({"guidance": -1.0}, ["--guidance", "-1"]),
    ({"sampler": "bogus"}, ["--sampler", "bogus"]),
    ({"negative_prompt": "bad \udcff byte"}, ["--negative-prompt", "bad \udcff byte"]),
])
def test_bad_settings_give_the_message_generate_gives(studio, tiny_model, tmp_path, capfd, settings, options):
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", tmp_path / "x.mp4", *options)
    line = assert_one_line_error(capfd.readouterr(), 2, rc)
    with pytest.raises(UsageError) as err:
        studio.make(Request(prompt="a red ball", **settings))
    assert f"error: {err.value}" == line
    assert studio.history() == [] and list(studio.videos.iterdir()) == []


def test_an_image_on_a_text_only_model_gets_generate_s_message(studio, tiny_model, tmp_path, capfd):
    picture = tmp_path / "start.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(picture)
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", tmp_path / "x.mp4", "--image", picture)
    line = assert_one_line_error(capfd.readouterr(), 2, rc)
    with pytest.raises(UsageError) as err:
        studio.make(Request(prompt="a red ball", image=picture.read_bytes(), **FAST))
    assert f"error: {err.value}" == line


@pytest.mark.parametrize("value", [8.5, "8", True])
def test_a_number_that_is_not_whole_is_refused(studio, value):
    with pytest.raises(UsageError, match="--frames must be a whole number"):
        studio.check(Request(frames=value))


def test_a_lora_weight_for_a_lora_the_server_lacks_is_refused(studio):
    with pytest.raises(UsageError, match="0 LoRA"):
        studio.check(Request(lora_weights=[1.0]))


# ---- a request: the video, its seed, its history -------------------------------------------------

def test_a_video_with_the_settings_asked_and_a_history_that_survives_a_restart(pipe, tmp_path):
    out = tmp_path / "serve"
    first = Studio(pipe, out).make(Request(prompt="a red ball", height=32, width=64, **FAST))
    assert 0 <= first["seed"] < RANDOM_SEEDS  # random, and reported
    frames = read_video(out / first["file"])
    assert frames.shape == (8, 32, 64, 3)
    again = Studio(pipe, out)  # a restart: the same folder
    assert [e["file"] for e in again.history()] == [first["file"]]
    second = again.make(Request(prompt="a blue square", seed=first["seed"], height=32, width=64, **FAST))
    assert second["seed"] == first["seed"] and second["file"] != first["file"]
    newest = Studio(pipe, out).history()
    assert [e["prompt"] for e in newest] == ["a blue square", "a red ball"]  # newest first
    assert {k: newest[1][k] for k in ("frames", "height", "width", "steps", "sampler")} == \
        {"frames": 8, "height": 32, "width": 64, "steps": 2, "sampler": pipe.model.sampling.sampler}
    # the seed shown is the seed used: the same settings and seed give the same frames
    third = again.make(Request(prompt="a red ball", seed=first["seed"], height=32, width=64, **FAST))
    assert np.array_equal(read_video(out / third["file"]), frames)
    assert len((out / HISTORY).read_text().splitlines()) == 3


def test_the_history_passes_over_lines_that_are_not_ours(studio):
    good = studio.make(Request(prompt="a red ball", **FAST))
    secret = studio.out / "secret.mp4"
    secret.write_bytes(b"not for the page")
    with open(studio.out / HISTORY, "a") as f:
        for line in ["not json", "[1, 2]", json.dumps({"file": "../secret.mp4"}), json.dumps({"file": str(secret)}),
                     json.dumps({"file": "secret.mp4"}), json.dumps({"file": "videos/gone.mp4"}),
                     json.dumps({"file": 3}), "\udcff"]:
            f.write(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\n")
    assert [e["file"] for e in studio.history()] == [good["file"]]


def test_cancel_stops_between_steps_and_writes_nothing(pipe, tmp_path):
    studio = Studio(pipe, tmp_path / "serve")
    seen = []

    def progress(stage, done, total):
        seen.append((stage, done))

    # asked after step 3 was reported: step 4, running then, is the last
    with pytest.raises(Cancelled, match=r"cancelled while denoising \(4/20 done\)"):
        studio.make(Request(prompt="a red ball", frames=8, steps=20), progress,
                    cancelled=lambda: ("denoise", 3) in seen)
    assert seen[-1] == ("denoise", 3)
    assert list(studio.videos.iterdir()) == [] and studio.history() == []
    assert studio.make(Request(prompt="a red ball", **FAST))["frames"] == 8  # and the next one runs


def test_progress_names_each_stage_in_order(studio):
    stages = []
    studio.make(Request(prompt="a red ball", **FAST), lambda stage, done, total: stages.append((stage, done, total)))
    order = list(dict.fromkeys(stage for stage, _, _ in stages))
    assert order == ["encode", "denoise", "decode", "write"]
    assert [d for s, d, t in stages if s == "denoise"] == [0, 1, 2]


def test_uploaded_bytes_are_decoded_under_image_limits():
    from soragen.io.image import decode_image
    from test_image import png_claiming
    with pytest.raises(SoragenError, match="claims 9000x9000 pixels, more than soragen decodes"):
        decode_image(png_claiming(9000, 9000), "--image (the upload)")
    with pytest.raises(SoragenError, match="claims more pixels than soragen decodes"):
        decode_image(png_claiming(60000, 60000), "--image (the upload)")
    with pytest.raises(SoragenError, match="is not a readable image"):
        decode_image(b"/etc/passwd", "--image (the upload)")
    data = io.BytesIO()
    Image.fromarray(np.full((20, 30, 4), 100, np.uint8)).save(data, "PNG")
    assert decode_image(data.getvalue()).shape == (20, 30, 3)


# ---- LoRA weights per request ------------------------------------------------------------------

@pytest.fixture(scope="module")
def wan_and_lora(tmp_path_factory):
    """A tiny random Wan pipeline folder and a LoRA for it (diffusers' layout)."""
    import torch

    from soragen.core.config import LoRAConfig
    from soragen.families.wan import FAMILY as WAN
    from soragen.io import lora_file
    from soragen.io.model_folder import load_model
    from soragen.models import lora as lora_io
    from soragen.tools.tiny_wan import tiny_pipeline
    folder = tmp_path_factory.mktemp("wan") / "Wan-tiny"
    tiny_pipeline().save_pretrained(folder)
    dit = load_model(folder, torch.float32).dit
    lora_io.add_lora(dit, LoRAConfig(lora_rank=4, lora_alpha=8, lora_targets="attn,cross,ffn"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_io.trainable_state(dit).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora_file.save(dit, folder.parent / "a.safetensors", WAN)
    return folder, folder.parent / "a.safetensors"


@pytest.mark.slow
def test_lora_weights_per_request_make_what_generate_lora_makes(wan_and_lora, tmp_path):
    from soragen.pipeline import Pipeline
    folder, adapter = wan_and_lora
    settings = {"frames": 5, "height": 32, "width": 32, "steps": 2, "seed": 1}

    def frames_of(entry):
        return read_video(tmp_path / "serve" / entry["file"])

    studio = Studio(Pipeline.load(folder, dtype="float32"), tmp_path / "serve", [Lora(adapter, 1.0)])
    at = {w: frames_of(studio.make(Request(prompt="a corgi", lora_weights=[w], **settings))) for w in (1.0, 0.5, 0.0)}
    assert frames_of(studio.make(Request(prompt="a corgi", lora_weights=[1.0], **settings))).tolist() == \
        at[1.0].tolist()  # back to 1 after 0.5 and 0: the same weights, not drifted ones
    for weight in (1.0, 0.5):
        out = tmp_path / f"cli-{weight}.mp4"
        assert cli("generate", "a corgi", "--model", folder, "--lora", f"{adapter}:{weight}", "--out", out,
                   "--dtype", "float32", *[f"--{k}={v}" for k, v in settings.items()]) == 0
        assert np.array_equal(read_video(out), at[weight]), weight
    out = tmp_path / "cli-base.mp4"
    assert cli("generate", "a corgi", "--model", folder, "--out", out, "--dtype", "float32",
               *[f"--{k}={v}" for k, v in settings.items()]) == 0
    assert np.array_equal(read_video(out), at[0.0])
    assert not np.array_equal(at[1.0], at[0.0])  # the adapter does something


# ---- an image, on a model that starts from one -----------------------------------------------------

@pytest.mark.slow
def test_an_uploaded_image_makes_what_generate_image_makes(tmp_path):
    """Wan 2.2 TI2V-5B's architecture, tiny: the upload's bytes, decoded in memory, give the frames
    that `generate --image FILE` gives from the same file."""
    from soragen.pipeline import Pipeline
    from soragen.tools.tiny_wan import tiny_pipeline
    folder = tmp_path / "ti2v"
    tiny_pipeline(ti2v=True).save_pretrained(folder)
    picture = tmp_path / "start.png"
    yy, xx = np.mgrid[0:48, 0:40]
    Image.fromarray(np.stack([yy * 5, xx * 6, np.full_like(yy, 90)], -1).astype(np.uint8)).save(picture)
    settings = {"frames": 5, "height": 32, "width": 32, "steps": 2, "seed": 1}
    studio = Studio(Pipeline.load(folder, dtype="float32"), tmp_path / "serve")
    assert studio.takes_image
    entry = studio.make(Request(prompt="a corgi", image=picture.read_bytes(), **settings))
    assert entry["image"] is True
    out = tmp_path / "cli.mp4"
    assert cli("generate", "a corgi", "--model", folder, "--image", picture, "--out", out, "--dtype", "float32",
               *[f"--{k}={v}" for k, v in settings.items()]) == 0
    assert np.array_equal(read_video(tmp_path / "serve" / entry["file"]), read_video(out))
    # no height and width: as generate, the image's aspect ratio at the model's area (48x40 is taller than wide)
    sized = studio.make(Request(prompt="a corgi", image=picture.read_bytes(), frames=1, steps=1))
    out = tmp_path / "cli-sized.mp4"
    assert cli("generate", "a corgi", "--model", folder, "--image", picture, "--out", out, "--dtype", "float32",
               "--frames", 1, "--steps", 1, "--seed", sized["seed"]) == 0
    assert read_video(out).shape == read_video(tmp_path / "serve" / sized["file"]).shape
    assert sized["height"] > sized["width"]
    with pytest.raises(SoragenError, match=r"^--image \(the upload\) is not a readable image"):
        studio.make(Request(prompt="a corgi", image=b"/etc/passwd", **settings))


@pytest.mark.slow
def test_a_first_and_a_last_upload_make_what_generate_makes(tmp_path):
    """Wan 2.1 FLF2V's architecture, tiny: the page's two uploads give `generate --image --last-image`'s
    frames; a last image alone, or on a model that only starts from one, gets generate's message."""
    from soragen.pipeline import Pipeline
    from soragen.tools.tiny_wan import tiny_pipeline
    rng = np.random.default_rng(0)
    pictures = []
    for name in ("first", "last"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
        pictures.append(tmp_path / f"{name}.png")
    settings = {"frames": 5, "height": 32, "width": 48, "steps": 2, "seed": 1}
    for kind in ("flf2v", "clip"):
        tiny_pipeline(i2v=kind).save_pretrained(tmp_path / kind)
    studio = Studio(Pipeline.load(tmp_path / "flf2v", dtype="float32"), tmp_path / "serve")
    entry = studio.make(Request(prompt="a corgi", image=pictures[0].read_bytes(), last_image=pictures[1].read_bytes(),
                                **settings))
    out = tmp_path / "cli.mp4"
    assert cli("generate", "a corgi", "--model", tmp_path / "flf2v", "--image", pictures[0], "--last-image",
               pictures[1], "--out", out, "--dtype", "float32", *[f"--{k}={v}" for k, v in settings.items()]) == 0
    assert np.array_equal(read_video(tmp_path / "serve" / entry["file"]), read_video(out))
    with pytest.raises(UsageError, match="--last-image needs --image too"):
        studio.check(Request(prompt="a corgi", last_image=pictures[1].read_bytes(), **settings))
    one = Studio(Pipeline.load(tmp_path / "clip", dtype="float32"), tmp_path / "serve-one")
    with pytest.raises(UsageError, match="cannot take a last image"):
        one.check(Request(prompt="a corgi", image=pictures[0].read_bytes(), last_image=pictures[1].read_bytes(),
                          **settings))


def test_a_run_cancelled_before_it_starts_makes_nothing(studio):
    with pytest.raises(Cancelled, match="cancelled before it started"):
        studio.make(Request(prompt="a red ball", **FAST), cancelled=lambda: True)
    assert list(studio.videos.iterdir()) == [] and studio.history() == []


def test_guidance_that_is_not_finite_gets_the_cli_s_message(studio, tiny_model, tmp_path, capfd):
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", tmp_path / "x.mp4", "--guidance", "nan")
    line = assert_one_line_error(capfd.readouterr(), 2, rc)
    with pytest.raises(UsageError) as err:
        studio.check(Request(guidance=float("nan")))
    assert f"error: {err.value}" == line


def test_auth_from_the_environment_lets_a_non_loopback_host_start(tmp_path):
    # past the host rule: it goes on to load the model, which is not there (exit 1, one line)
    done = _soragen("serve", "--host", "0.0.0.0", "--port", _free_port(), "--out", tmp_path / "out",
                    "--model", tmp_path / "no-model", env_extra={"SORAGEN_AUTH": "alice:secret"})
    assert_one_line_error(done, 1, done.returncode, "no-model")
    done = _soragen("serve", "--host", "0.0.0.0", "--out", tmp_path / "out", env_extra={"SORAGEN_AUTH": "alice"})
    assert_one_line_error(done, 2, done.returncode, "USER:PASSWORD")
