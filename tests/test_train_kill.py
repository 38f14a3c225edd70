"""A real kill: a torchrun group training with --fsdp, SIGKILLed while it writes a sharded
checkpoint, leaves the previous checkpoint as the latest, and --resume goes on from it to the
weights of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import descendants, torchrun_command, torchrun_each
from soragen.io.folders import latest_checkpoint

import test_train
from test_train import train_args

clips, model_for_vae, filled_cache = test_train.clips, test_train.model_for_vae, test_train.filled_cache  # its fixtures
from test_train_split import trained

STAGING = re.compile(r"^\.checkpoint-(\d+)\.tmp-(\d+)$")


def start(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(torchrun_command(2, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def kill_group(proc: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own, so a signal to
    torchrun's process group would miss them); returns the workers' ids."""
    workers = descendants(proc.pid)
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return workers


def kill_in_a_save(proc: subprocess.Popen, out, timeout: float = 240):
    """SIGKILL torchrun and its workers as soon as a save that has a checkpoint before it has
    written its model folder and begun writing the sharded training state (its staging folder
    holds train_state/dcp/). Returns the staging folder and its step, or None if the run ended first."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            for name in os.listdir(out) if out.is_dir() else ():
                match = STAGING.match(name)
                if match and int(match.group(1)) >= 2 and (out / name / "train_state" / "dcp").is_dir():
                    workers = kill_group(proc)
                    assert all(gone(pid, zombies=True) for pid in workers), "a worker outlived SIGKILL"
                    return out / name, int(match.group(1))
            time.sleep(0.002)
    finally:
        kill_group(proc)
    return None


def gone(pid: int, timeout: float = 10, zombies: bool = False) -> bool:
    """True once no process `pid` exists (with `zombies`: or it is one, dead and not yet reaped)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            if zombies and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_torchrun_group_killed_in_a_sharded_save_resumes_from_the_checkpoint_before(clips, model_for_vae, filled_cache,
                                                                                     tmp_path):
    cache = filled_cache
    flags = ["--fsdp", "--mixed-precision", "no", "--batch-size", "1", "--save-every", "1", "--keep-last", "2"]
    for attempt in range(5):  # until the kill lands inside a save (it did not if the save finished first)
        out = tmp_path / f"run{attempt}"
        hit = kill_in_a_save(start(*train_args(clips, out, model_for_vae, cache, 400, *flags)), out)
        if hit is not None and hit[0].exists():
            break
    else:
        pytest.fail("five runs killed, none of them in the middle of a save")
    cut, step = hit
    inside = sorted(str(p.relative_to(cut)) for p in (cut / "train_state").rglob("*"))
    print(f"killed in the save of checkpoint-{step} (attempt {attempt + 1}); its staging folder's train_state/ "
          f"held {inside}")
    assert not (cut / "train_state" / "state.json").exists()  # the save had not finished
    assert not (out / f"checkpoint-{step}").exists()
    assert latest_checkpoint(out).name == f"checkpoint-{step - 1}"  # the previous checkpoint is the latest
    # --resume goes on from it: the run's log back to its step, then the steps again, to a run's weights
    # that never stopped
    # and, in the same process group, a run that never stopped
    straight = tmp_path / "straight"
    torchrun_each(2, train_args(clips, out, model_for_vae, cache, step + 1, *flags, "--resume"),
                  train_args(clips, straight, model_for_vae, cache, step + 1, *flags), tmp_path=tmp_path)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2))
    state = json.loads((out / f"checkpoint-{step + 1}" / "train_state" / "state.json").read_text())
    assert state["step"] == step + 1
    if gone(int(STAGING.match(cut.name).group(2))):  # a dead writer's temporary is swept by the next save
        assert not cut.exists()
    a, b = trained(straight / f"checkpoint-{step + 1}"), trained(out / f"checkpoint-{step + 1}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    name = f"checkpoint-{step + 1}/dit/model.safetensors"
    a, b = load_file(straight / name), load_file(out / name)
    assert all(torch.equal(a[k], b[k]) for k in a)
