"""Shared fixtures: tiny random models built from configs, and tiny real clips."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_tiny_model(folder, seed: int = 0, perturb: float = 0.0, dit_dtype=None, **dit_overrides):
    """A complete model folder with random weights: test-size DiT and VAE, the packaged text encoder.
    `perturb` adds noise to every weight so the zero-initialised paths do something; `dit_dtype`
    stores the DiT in another precision, as a shipped model is."""
    from soragen.core.config import TextEncoderSpec, VideoDefaults, dit_preset, vae_preset_config
    from soragen.models.dit import VideoDiT
    from soragen.io.model_folder import save_model
    from soragen.models.vae import new_vae

    torch.manual_seed(seed)
    dit = VideoDiT(dit_preset("test", in_channels=4, text_dim=384, **dit_overrides))
    if perturb:
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(torch.randn_like(p) * perturb)
    vae = new_vae(vae_preset_config("test"))
    return save_model(folder, dit, vae, TextEncoderSpec(), VideoDefaults(frames=8, height=32, width=32, fps=8.0),
                      dit_dtype=dit_dtype)


SAMPLES = Path(__file__).parent / "data" / "one_prompt.txt"  # --samples of a short training run: one prompt


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", perturb=0.02)


def moving_square(frames: int = 9, height: int = 32, width: int = 48) -> np.ndarray:
    """(T, H, W, 3) uint8: a white square sliding right over a blue gradient."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 2] = np.linspace(120, 230, height, dtype=np.uint8)[None, :, None]
    for t in range(frames):
        x = 2 + t * (width - 12) // max(frames - 1, 1)
        video[t, height // 2 - 4:height // 2 + 4, x:x + 8] = 245
    return video


@pytest.fixture
def tiny_clip(tmp_path):
    from soragen.io.video import write_video
    return write_video(tmp_path / "clip.mp4", moving_square(), 8.0).path


@pytest.fixture(scope="module")
def one_thread():
    """The test model is tiny: one thread is as fast, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def outdir(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ---- the command line, in-process ----------------------------------------------------------------

def cli(*args) -> int:
    from soragen.cli import run
    return run([str(a) for a in args])


# ---- process groups: real torchrun, real gloo ----------------------------------------------------

def free_port() -> int:
    """A port no other test run holds now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torchrun makes a log folder per launch, in /tmp unless told where: the suite's go here, removed at its end
TORCHRUN_LOGS = Path(tempfile.mkdtemp(prefix="soragen-tests-torchrun-"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TORCHRUN_LOGS, ignore_errors=True)


def torchrun_command(nproc: int, *args, module: bool = True, options: tuple = ()) -> list[str]:
    """torchrun (with its `options`) on `nproc` processes of `soragen *args` (or, without `module`, of a
    script and its args)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            f"--log-dir={TORCHRUN_LOGS}", *options, *(["-m", "soragen"] if module else []), *[str(a) for a in args]]


def torchrun(nproc: int, *args, module: bool = True, check: bool = True, timeout: float = 400):
    """Run `soragen *args` under torchrun, one thread per process; with `check`, it must succeed."""
    result = subprocess.run(torchrun_command(nproc, *args, module=module), capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


# One process group running soragen commands in turn, as that many torchrun launches would (each command
# joins the group the first one made); rank 0 marks where each command's output ends. A command given as a
# string is the test's own Python, run by rank 0 between two commands (planting a file, checking one).
RUNS = """
import json, os, sys
import torch.distributed as dist
from soragen.cli import run
for i, command in enumerate(json.loads(sys.argv[1])):
    main = os.environ["RANK"] == "0"
    if isinstance(command, str):  # the test's own Python, on rank 0
        if main:
            exec(command, {})
        code = 0
    else:
        code = run(command)
    if main:
        print(f"\\n{MARK}{i} exit {code}", flush=True)
    if code:
        sys.exit(code)  # torchrun stops the other processes
    if dist.is_initialized():
        dist.barrier()  # every process done with this command before the next one starts
if dist.is_initialized():
    dist.destroy_process_group()
"""
MARK = "=== end of command "


def torchrun_each(nproc: int, *commands, check: bool = True, tmp_path: Path):
    """`soragen` commands (argument lists; or Python source for rank 0, a string) run in turn by one
    torchrun group, saving the launches in between: returns the CompletedProcess and rank 0's output of
    each command that ran."""
    script = tmp_path / "soragen_commands.py"
    script.write_text(f"MARK = {MARK!r}\n" + RUNS)
    given = [c if isinstance(c, str) else [str(a) for a in c] for c in commands]
    result = torchrun(nproc, script, json.dumps(given), module=False, check=check, timeout=400 * len(commands))
    return result, result.stdout.split(MARK)[:-1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers run in sessions of their own: signalling its
    process group misses them)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def listing(folder: Path) -> list[str]:
    """Everything under `folder`, hidden files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_line_error(captured, code: int, rc: int, *needles: str) -> str:
    """Exit code as asked, exactly one non-empty line on stderr starting "error:", no traceback.
    `captured` is pytest's captured output or a CompletedProcess."""
    err = captured.stderr if isinstance(captured, subprocess.CompletedProcess) else captured.err
    out = captured.stdout if isinstance(captured, subprocess.CompletedProcess) else captured.out
    assert rc == code, f"exit {rc}, wanted {code}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"wanted one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


STATE_FILE = "shard-00001-model-00001-of-00001.safetensors"  # one process's file of train_state/dcp/


def as_written_before_dcp(checkpoint: Path, names: list[str]) -> None:
    """Rewrite a one-process checkpoint's train_state/ as unsharded runs wrote it before
    train_state/dcp/: the trained weights, the EMA and the optimizer's moments in files of their
    own, the moments by parameter number (`names`: the trained parameters in the optimizer's
    order), its settings beside them. The settings are garbage: a run uses its own, a file cannot
    set them."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    state_dir = checkpoint / "train_state"
    stored = load_file(state_dir / "dcp" / STATE_FILE)

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
    save_file(part("model."), str(state_dir / "model.safetensors"))
    save_file(part("ema."), str(state_dir / "ema.safetensors"))
    moments, meta = {}, {"param_groups": [{"lr": "high", "betas": None, "params": list(range(len(names)))}], "state": {}}
    for pid, name in enumerate(names):
        entries = {k: v for k, v in part(f"optimizer.{name}.").items() if "." not in k}
        meta["state"][str(pid)] = sorted(entries)
        moments.update({f"{pid}.{key}": value for key, value in entries.items()})
    save_file(moments, str(state_dir / "optimizer.safetensors"))
    (state_dir / "optimizer.json").write_text(json.dumps(meta))
    shutil.rmtree(state_dir / "dcp")
    state = json.loads((state_dir / "state.json").read_text())
    del state["dcp"]
    (state_dir / "state.json").write_text(json.dumps(state))
