"""A probe of our own: hostile model folders, options, data faults and killed writes.

Every case is one row of a table: what is damaged, and the words the one-line error must hold (the
file and field, or the option). Each asserts the exit code (2: usage, 1: everything else), one line
on stderr and no traceback, no output left behind, nothing the user had lost, and that the error
came before the heavy work (the text encoder is never loaded for a folder that is bad anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import STATE_FILE, assert_one_line_error, cli, listing

FAST = ["--steps", "2", "--frames", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def dead_pid() -> int:
    """The PID of a process that has exited: what a SIGKILLed writer leaves in its temporaries' names."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- hostile model folders ------------------------------------------------------------------------

def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_key(relative: str, key: str, value):
    """A damage: set `key` (dotted for nesting) in the JSON file `relative` of the model folder."""
    def damage(folder: Path) -> None:
        def change(data):
            *parents, last = key.split(".")
            for p in parents:
                data = data[p]
            data[last] = value
        edit_json(folder / relative, change)
    return damage


def write(relative: str, text: str):
    def damage(folder: Path) -> None:
        (folder / relative).write_text(text)
    return damage


def weights_as_ints(folder: Path) -> None:
    from safetensors.torch import load, save_file
    path = folder / "dit" / "model.safetensors"
    state = load(path.read_bytes())
    save_file({k: (v * 100).to(torch.int32) for k, v in state.items()}, str(path))


def huge_header(folder: Path) -> None:
    # safetensors opens with the header's length as 8 little-endian bytes: here it claims a petabyte
    path = folder / "dit" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((10**15).to_bytes(8, "little") + data[8:])


def vae_index_escapes(folder: Path) -> None:
    (folder / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"encoder.conv_in.weight": "../../secret.safetensors"}}))


def text_encoder_folder_with(config: dict):
    def damage(folder: Path) -> None:
        encoder = folder / "encoder"
        encoder.mkdir()
        (encoder / "config.json").write_text(json.dumps(config))
        edit_json(folder / "text_encoder.json", lambda d: d.update(source=str(encoder)))
    return damage


def exploding_output_layer(folder: Path) -> None:
    # finite weights whose predictions overflow: sampling ends in NaN, never in a "wrote" line
    from safetensors.torch import load, save_file
    path = folder / "dit" / "model.safetensors"
    state = load(path.read_bytes())
    state = {k: (torch.full_like(v, 3e38) if k.startswith("final.") else v) for k, v in state.items()}
    save_file(state, str(path))


MODEL_FOLDERS = {
    # dit/config.json: every size bounded, every type checked, before a block is built
    "depth a billion": (set_key("dit/config.json", "depth", 10**9), ["dit/config.json", "depth", "512"]),
    "depth a word": (set_key("dit/config.json", "depth", "eight"), ["dit/config.json", "depth", "integer"]),
    "no heads": (set_key("dit/config.json", "num_heads", 0), ["dit/config.json", "num_heads"]),
    "negative width": (set_key("dit/config.json", "hidden_size", -32), ["dit/config.json", "hidden_size"]),
    "zero patch": (set_key("dit/config.json", "patch_size", [1, 0, 2]), ["dit/config.json", "patch_size"]),
    "patch a string": (set_key("dit/config.json", "patch_size", "abc"), ["dit/config.json", "patch_size"]),
    "NaN mlp ratio": (write("dit/config.json", '{"mlp_ratio": NaN}'), ["dit/config.json", "mlp_ratio", "finite"]),
    "qk_norm a string": (set_key("dit/config.json", "qk_norm", "yes"), ["dit/config.json", "qk_norm"]),
    "unknown key": (set_key("dit/config.json", "flash", True), ["dit/config.json", "flash"]),
    "config a list": (write("dit/config.json", "[1, 2]"), ["dit/config.json", "object"]),
    "config not JSON": (write("dit/config.json", "{depth: 2"), ["dit/config.json", "not valid JSON"]),
    # the config is checked against the weights' shapes, read from the file's header
    "more blocks than weights": (set_key("dit/config.json", "depth", 9), ["model.safetensors", "missing"]),
    "wider than weights": (set_key("dit/config.json", "hidden_size", 64), ["shape", "config"]),
    "integer weights": (weights_as_ints, ["model.safetensors", "not as floats"]),
    "petabyte header": (huge_header, ["model.safetensors", "not a valid safetensors"]),
    # soragen.json
    "negative fps": (set_key("soragen.json", "video.fps", -5), ["soragen.json", "video.fps"]),
    "zero frames": (set_key("soragen.json", "video.frames", 0), ["soragen.json", "video.frames"]),
    "unknown sampler": (set_key("soragen.json", "sampling.sampler", "heun"), ["soragen.json", "sampling.sampler"]),
    "a billion steps": (set_key("soragen.json", "sampling.steps", 10**9), ["soragen.json", "sampling.steps"]),
    "guidance a word": (set_key("soragen.json", "sampling.guidance", "high"), ["sampling.guidance", "number"]),
    "format a string": (set_key("soragen.json", "format", "1"), ["soragen.json", "format"]),
    "manifest gone": (lambda f: (f / "soragen.json").unlink(), ["not a soragen model folder"]),
    # scheduler/scheduler_config.json
    "a trillion timesteps": (set_key("scheduler/scheduler_config.json", "num_train_timesteps", 10**12),
                             ["scheduler_config.json", "num_train_timesteps"]),
    "unknown prediction": (set_key("scheduler/scheduler_config.json", "prediction_type", "banana"),
                           ["scheduler_config.json", "prediction_type"]),
    "beta above one": (set_key("scheduler/scheduler_config.json", "beta_end", 2.0),
                       ["scheduler_config.json", "beta_end"]),
    "scheduler not JSON": (write("scheduler/scheduler_config.json", "{"), ["scheduler_config.json", "JSON"]),
    # vae/config.json
    "VAE a million wide": (set_key("vae/config.json", "base_dim", 10**6), ["vae/config.json", "base_dim"]),
    "VAE std zero": (set_key("vae/config.json", "latents_std", [0.0, 1.0, 1.0, 1.0]),
                     ["vae/config.json", "latents_std"]),
    "VAE mean too short": (set_key("vae/config.json", "latents_mean", [0.0]), ["vae/config.json", "latents_mean"]),
    "VAE z_dim a word": (set_key("vae/config.json", "z_dim", "four"), ["vae/config.json", "z_dim"]),
    "VAE index escapes": (vae_index_escapes, ["weight_map"]),
    # text_encoder.json and the encoder it names
    "encoder folder gone": (set_key("text_encoder.json", "source", "/no/such/encoder"),
                            ["text_encoder.json", "/no/such/encoder", "does not exist"]),
    "encoder not an id": (set_key("text_encoder.json", "source", "not a repo id!"), ["text_encoder.json", "neither"]),
    "encoder length a billion": (set_key("text_encoder.json", "max_length", 10**9), ["text_encoder.json", "max_length"]),
    "encoder of a billion layers": (text_encoder_folder_with({"model_type": "bert", "num_hidden_layers": 10**9}),
                                    ["config.json", "num_hidden_layers"]),
}


@pytest.mark.parametrize("case", MODEL_FOLDERS)
def test_a_hostile_model_folder_is_refused_before_any_heavy_work(tiny_model, tmp_path, outdir, capfd, monkeypatch,
                                                                 case):
    damage, needles = MODEL_FOLDERS[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    damage(folder)
    from soragen.models import text
    loaded = []
    if case != "encoder of a billion layers":  # that one is caught inside the encoder's own loading
        monkeypatch.setattr(text.TextEncoder, "__init__", lambda *a, **k: loaded.append(a) or 1 / 0)
    rc = cli("generate", "a red ball", "--model", folder, "--out", outdir / "x.mp4", *FAST)
    assert_one_line_error(capfd.readouterr(), 1, rc, *needles)
    assert loaded == [] and listing(outdir) == []


def test_sampling_that_diverges_is_an_error_not_a_black_video(tiny_model, tmp_path, outdir, capfd):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    exploding_output_layer(folder)
    rc = cli("generate", "a red ball", "--model", folder, "--out", outdir / "x.mp4", *FAST)
    captured = capfd.readouterr()  # the model's line came first: the failure is in the sampling itself
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in captured.err
    assert "NaN" in errors[0] and "diverged" in errors[0]
    assert "wrote" not in captured.out + captured.err and listing(outdir) == []


# ---- hostile options ------------------------------------------------------------------------------

OPTIONS = {
    "guidance NaN": (["--guidance", "nan"], ["--guidance", "finite"]),
    "guidance infinite": (["--guidance", "inf"], ["--guidance", "finite"]),
    "guidance huge": (["--guidance", "1e9"], ["--guidance", "100"]),
    "eta NaN": (["--sampler", "ddim", "--eta", "nan"], ["--eta", "finite"]),
    "eta negative": (["--eta", "-1"], ["--eta"]),
    "eta above one": (["--eta", "2"], ["--eta"]),
    "fps NaN": (["--fps", "nan"], ["--fps", "finite"]),
    "fps infinite": (["--fps", "inf"], ["--fps", "finite"]),
    "seed negative": (["--seed", "-1"], ["--seed"]),
    "seed past 64 bits": (["--seed", str(2**70)], ["--seed"]),
    "a million steps": (["--steps", "1000000"], ["--steps", "1000"]),
    "a million frames": (["--frames", "1000000"], ["--frames", "512"]),
    "empty sampler": (["--sampler", ""], ["--sampler"]),
    "unknown device": (["--device", "tpu"], ["device", "tpu"]),
    "odd dtype": (["--dtype", "int8"], ["dtype", "int8"]),
    "odd suffix": (["--out", "x.mov"], ["x.mov", ".mp4"]),
}


@pytest.mark.parametrize("case", OPTIONS)
def test_a_hostile_generate_option_is_a_usage_error(tiny_model, outdir, capfd, monkeypatch, case):
    option, needles = OPTIONS[case]
    monkeypatch.chdir(outdir)
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", outdir / "x.mp4", *FAST, *option)
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(outdir) == []


def test_a_prompt_that_is_not_utf8_is_refused_before_loading(tiny_model, outdir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    prompt = b"a red \xff\xfe ball"  # argv bytes that do not decode as UTF-8
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"soragen", b"generate", prompt, b"--model",
                        os.fsencode(tiny_model), b"--out", os.fsencode(outdir / "x.mp4"), b"--steps", b"2"],
                       capture_output=True, text=True, env=env)
    assert_one_line_error(p, 2, p.returncode, "PROMPT", "UTF-8", "0xff")
    assert listing(outdir) == []


OTHER_COMMANDS = {
    "eval guidance NaN": (["eval", "--guidance", "nan", "--limit", "1"], ["--guidance", "finite"]),
    "eval unknown sampler": (["eval", "--sampler", "euler", "--limit", "1"], ["--sampler"]),
    "export guidance NaN": (["export", "MODEL", "OUT/x", "--guidance", "nan"], ["--guidance", "finite"]),
    "export zero steps": (["export", "MODEL", "OUT/x", "--steps", "0"], ["--steps"]),
    "train lr NaN": (["train", "--lr", "nan"], ["--lr", "finite"]),
    "train lr zero": (["train", "--lr", "0"], ["--lr"]),
    "train zero steps": (["train", "--max-steps", "0"], ["--max-steps"]),
    "train zero batch": (["train", "--batch-size", "0"], ["--batch-size"]),
    "train negative warm-up": (["train", "--warmup", "-1"], ["--warmup"]),
    "train EMA above one": (["train", "--ema-decay", "1.5"], ["--ema-decay"]),
    "train odd schedule": (["train", "--lr-schedule", "linear"], ["--lr-schedule", "cosine"]),
    "train odd precision": (["train", "--mixed-precision", "fp8"], ["--mixed-precision", "bf16"]),
    "train seed negative": (["train", "--seed", "-1"], ["--seed"]),
    "train-vae lr infinite": (["train-vae", "--lr", "inf"], ["--lr", "finite"]),
    "train-vae KL NaN": (["train-vae", "--kl-weight", "nan"], ["--kl-weight", "finite"]),
    "inspect-patches a million frames": (["inspect-patches", "CLIP", "--frames", "1000000"], ["--frames"]),
    "make-dataset seed past 64 bits": (["make-dataset", "shapes", "OUT/d", "--seed", str(2**64)], ["--seed"]),
}


@pytest.mark.parametrize("case", OTHER_COMMANDS)
def test_a_hostile_option_of_any_command_is_a_usage_error(tiny_model, tiny_clip, outdir, capfd, monkeypatch, case):
    argv, needles = OTHER_COMMANDS[case]
    argv = [str(tiny_model) if a == "MODEL" else str(tiny_clip) if a == "CLIP" else a.replace("OUT", str(outdir))
            for a in argv]
    if argv[0] in ("train", "train-vae"):
        argv += ["--data", str(outdir / "clips"), "--out", str(outdir / "run")]
    if argv[0] == "eval":
        argv += ["--model", str(tiny_model), "--out", str(outdir / "eval")]
    monkeypatch.chdir(outdir)
    rc = cli(*argv)
    assert_one_line_error(capfd.readouterr(), 2, rc, *needles)
    assert listing(outdir) == []


# ---- data faults in training ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from soragen.tools.shapes import make_dataset
    folder = tmp_path_factory.mktemp("data") / "clips"
    make_dataset(folder, n=4, seed=0, frames=9, size=32)
    return folder


def train(clips, vae_model, out, cache, steps, *extra) -> int:
    return cli("train", "--data", clips, "--out", out, "--vae", vae_model, "--preset", "test", "--frames", 9,
               "--height", 32, "--width", 32, "--batch-size", 2, "--max-steps", steps, "--save-every", 2,
               "--warmup", 1, "--cache-dir", cache, "--sample-every", 0, "--samples",
               Path(__file__).parent / "data" / "one_prompt.txt", *extra)


@pytest.mark.parametrize("tear", ["torn last line", "garbage in the middle", "binary tail"])
def test_a_torn_metrics_log_does_not_stop_a_resume(tiny_model, clips, tmp_path, capfd, tear):
    out = tmp_path / "run"
    assert train(clips, tiny_model, out, tmp_path / "cache", 2) == 0
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    if tear == "torn last line":
        metrics.write_text("\n".join(lines) + '\n{"step": 3, "lo')
    elif tear == "garbage in the middle":
        metrics.write_text(lines[0] + "\n}{ not json\n" + "\n".join(lines[1:]) + "\n")
    else:
        metrics.write_bytes(metrics.read_bytes() + b"\x00\xff\xfe\x00")
    capfd.readouterr()
    assert train(clips, tiny_model, out, tmp_path / "cache", 4, "--resume") == 0
    assert "metrics.jsonl: dropped 1 unreadable line" in capfd.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert latest_name(out) == "checkpoint-4"


@pytest.mark.parametrize("damage, needles", [
    ("state.json torn", ["checkpoint-4/train_state/state.json", "not valid JSON"]),
    ("config out of range", ["state.json", "batch_size"]),
    ("training state truncated", [f"train_state/dcp/{STATE_FILE}", "not a valid safetensors"]),
    ("optimizer of another model", ["optimizer", "999.exp_avg"]),
])
def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_intact_one(tiny_model, clips, tmp_path, capfd,
                                                                                damage, needles):
    out = tmp_path / "run"
    assert train(clips, tiny_model, out, tmp_path / "cache", 4, "--keep-last", "2") == 0
    state = out / "checkpoint-4" / "train_state"
    if damage == "state.json torn":
        (state / "state.json").write_text('{"step": ')
    elif damage == "config out of range":
        edit_json(state / "state.json", lambda d: d["config"].update(batch_size=10**9))
    elif damage == "training state truncated":
        path = state / "dcp" / STATE_FILE
        path.write_bytes(path.read_bytes()[:100])
    else:  # state.json lists moments of a parameter this model does not have
        edit_json(state / "state.json", lambda d: d["dcp"][STATE_FILE].update({"optimizer.999.exp_avg": [3]}))
    capfd.readouterr()
    assert train(clips, tiny_model, out, tmp_path / "cache", 6, "--resume") == 0
    notes = [line for line in capfd.readouterr().err.splitlines() if "resuming from checkpoint-2" in line]
    assert len(notes) == 1 and all(n.lower() in notes[0].lower() for n in needles), notes
    from soragen.train.checkpoints import check_checkpoint
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for name in ("checkpoint-4", "checkpoint-6"):  # the damaged one was written again, whole
        check_checkpoint(out / name)


def test_a_checkpoint_is_safetensors_and_json_and_resuming_unpickles_nothing(tiny_model, clips, tmp_path,
                                                                              monkeypatch):
    import pickle
    out = tmp_path / "run"
    assert train(clips, tiny_model, out, tmp_path / "cache", 2) == 0
    files = [p for p in (out / "checkpoint-2").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".json", ".safetensors") for p in files), files
    assert sorted(p.name for p in (out / "checkpoint-2" / "train_state" / "dcp").iterdir()) == [STATE_FILE]

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")
    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    assert train(clips, tiny_model, out, tmp_path / "cache", 4, "--resume") == 0
    assert latest_name(out) == "checkpoint-4"


def latest_name(run_dir: Path) -> str:
    from soragen.io.folders import latest_checkpoint
    return latest_checkpoint(run_dir).name


@pytest.mark.parametrize("kind, damage", [
    ("latents", "truncated"), ("latents", "other shape"), ("latents", "empty"),
    ("text", "truncated"), ("text", "NaN"),
])
def test_a_damaged_cache_entry_is_recomputed_and_replaced(tiny_model, clips, tmp_path, capfd, kind, damage):
    from safetensors.torch import load_file, save_file
    cache = tmp_path / "cache"
    assert train(clips, tiny_model, tmp_path / "run1", cache, 1) == 0
    victim = sorted((cache / kind).glob("*.safetensors"))[0]
    good = {k: v.clone() for k, v in load_file(str(victim)).items()}  # not a map of the file damaged below
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:40])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "other shape":
        save_file({"latents": torch.zeros(1, 4, 2, 2, 2)}, str(victim))
    else:
        save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()}, str(victim))
    capfd.readouterr()
    assert train(clips, tiny_model, tmp_path / "run2", cache, 1) == 0
    err = capfd.readouterr().err
    assert "1 unreadable entry recomputed and replaced" in err and victim.name in err
    repaired = load_file(str(victim))
    assert set(repaired) == set(good)
    for key in good:
        assert repaired[key].shape == good[key].shape and torch.allclose(repaired[key], good[key], atol=1e-5)
    assert not [p for p in (cache / kind).iterdir() if p.name.startswith(".")]  # no temporary left


# ---- killed writes: their leftovers are swept, nothing is ever half there -------------------------

def test_leftovers_of_killed_generates_are_removed_by_the_next_one(tiny_model, outdir):
    pid = dead_pid()
    leftovers = [outdir / f".x.mp4.tmp-{pid}.mp4", outdir / f".frames.tmp-{pid}", outdir / f".frames.old-{pid}"]
    leftovers[0].write_bytes(b"half a video")
    for folder in leftovers[1:]:
        folder.mkdir()
        (folder / "frame_00000.png").write_bytes(b"half a frame")
    alive = outdir / f".y.mp4.tmp-{os.getpid()}.mp4"  # a writer still at work: left alone
    alive.write_bytes(b"being written")
    mine = outdir / "notes.tmp-1.txt"  # not ours: its name lacks the leading dot
    mine.write_text("keep me")
    assert cli("generate", "a red ball", "--model", tiny_model, "--out", outdir / "x.mp4", *FAST) == 0
    assert not any(p.exists() for p in leftovers)
    assert alive.exists() and mine.read_text() == "keep me" and (outdir / "x.mp4").is_file()


def test_a_killed_checkpoint_save_is_swept_by_the_next_save(tiny_model, clips, tmp_path):
    out = tmp_path / "run"
    assert train(clips, tiny_model, out, tmp_path / "cache", 2) == 0
    staging = out / f".checkpoint-4.tmp-{dead_pid()}"
    shutil.copytree(out / "checkpoint-2", staging)  # as big as a checkpoint, and as incomplete as a kill leaves it
    (staging / "soragen.json").unlink()
    assert train(clips, tiny_model, out, tmp_path / "cache", 4, "--resume") == 0
    assert not staging.exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_swaps_it_whole(tmp_path, exchange):
    """With the exchange (Linux renameat2) the folder is never missing; the fallback moves the old
    one aside first and must still end with the new folder and no leftovers."""
    from soragen.core.atomic import publish
    target = tmp_path / "frames"
    target.mkdir()
    (target / "frame_00000.png").write_text("old")
    missing = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            if not target.exists():
                missing.append(1)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(50):
            tmp = tmp_path / f".frames.tmp-{os.getpid()}"
            tmp.mkdir()
            (tmp / "frame_00000.png").write_text(str(i))
            publish(tmp, target, exchange=exchange)
    finally:
        done.set()
        watcher.join()
    assert (target / "frame_00000.png").read_text() == "49"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]
    if exchange and sys.platform == "linux":
        assert missing == []


def test_a_png_folder_output_is_replaced_and_other_folders_are_refused(tiny_model, outdir, capfd):
    frames = outdir / "frames"
    assert cli("generate", "a red ball", "--model", tiny_model, "--out", frames, *FAST) == 0
    first = sorted(p.name for p in frames.iterdir())
    assert cli("generate", "a red ball", "--model", tiny_model, "--out", frames, *FAST, "--seed", "3") == 0
    assert sorted(p.name for p in frames.iterdir()) == first
    (frames / "my-notes.txt").write_text("mine")
    capfd.readouterr()
    rc = cli("generate", "a red ball", "--model", tiny_model, "--out", frames, *FAST)
    assert_one_line_error(capfd.readouterr(), 1, rc, "refusing to replace", "my-notes.txt")
    assert (frames / "my-notes.txt").read_text() == "mine"


# ---- odd files for inspect-patches ------------------------------------------------------------------

def odd_file(folder: Path, how: str) -> Path:
    path = folder / "clip.mp4"
    if how == "fifo":
        os.mkfifo(path)  # opening it to read would wait forever for a writer
    elif how == "png renamed":
        from PIL import Image
        Image.new("RGB", (8, 8)).save(path, format="PNG")
    elif how == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif how == "symlink loop":
        path.symlink_to(folder / "clip.mp4")
    elif how == "no suffix":
        path = folder / "clip"
        path.write_bytes(b"\x00" * 64)
    return path


@pytest.mark.parametrize("how, needles", [
    ("fifo", ["not a regular file"]),
    ("random bytes", ["clip.mp4"]),
    ("symlink loop", ["clip.mp4"]),
    ("no suffix", ["not a video file"]),
])
def test_odd_files_for_inspect_patches(tiny_model, tmp_path, outdir, capfd, how, needles):
    if how == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    video = odd_file(inputs, how)
    rc = cli("inspect-patches", video, "--model", tiny_model, "--out", outdir / "p.png", "--json")
    captured = capfd.readouterr()
    assert_one_line_error(captured, 1, rc, *needles)
    assert captured.out == "" and listing(outdir) == []


def test_a_picture_renamed_to_mp4_is_read_as_the_one_frame_it_is(tiny_model, tmp_path, outdir, capfd):
    (tmp_path / "inputs").mkdir()
    video = odd_file(tmp_path / "inputs", "png renamed")  # ffmpeg opens it as a one-frame video
    assert cli("inspect-patches", video, "--model", tiny_model, "--out", outdir / "p.png", "--json") == 0
    assert json.loads(capfd.readouterr().out)["frames"] == 1
