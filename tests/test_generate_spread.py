"""`soragen generate --prompts` under torchrun: each process makes its share of the videos, the ones
one process makes; rank 0 writes the one index.jsonl; no file is written twice; a process killed
mid-batch leaves every finished video whole. Real gloo process groups."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, descendants, torchrun_command
from soragen.io.video import read_video

PROMPTS = ["a red ball moving right", "a blue square moving left", "a green circle", "a yellow star",
           "a red square moving up"]
FAST = ["--frames", 5, "--steps", 2]


def command(tiny_model, prompts, out, *extra) -> list[str]:
    return torchrun_command(2, "generate", "--prompts", prompts, "--out", out, "--model", tiny_model, *FAST, *extra,
                            options=("--tee", "1"))


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The prompts' videos as one process makes them."""
    folder = tmp_path_factory.mktemp("one")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert cli("generate", "--prompts", folder / "prompts.txt", "--out", folder / "videos", "--model", tiny_model,
               *FAST) == 0
    return folder


def index(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_share_the_prompts_and_make_one_processs_videos(tiny_model, one_process, tmp_path):
    out = tmp_path / "videos"
    result = subprocess.run(command(tiny_model, one_process / "prompts.txt", out), capture_output=True, text=True,
                            env=environment(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert index(out) == index(one_process / "videos")  # the same prompts, files and seeds, in prompt order
    for record in index(out):
        a, b = read_video(out / record["file"])[0], read_video(one_process / "videos" / record["file"])[0]
        assert np.array_equal(a, b), record["file"]
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file"] for r in index(out)] + ["index.jsonl"])
    # each file written once, by the process whose share it is (prompt i: process i mod 2); the index by rank 0
    wrote = re.findall(r"^\[default(\d)\]:wrote (\S+)", result.stdout, re.M)
    assert Counter(Path(path).name for _, path in wrote) == Counter([r["file"] for r in index(out)] + ["index.jsonl"])
    for rank, path in wrote:
        name = Path(path).name
        assert int(rank) == (0 if name == "index.jsonl" else int(name[:3]) % 2), (rank, name)


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
def test_a_process_killed_mid_batch_leaves_the_finished_videos_whole(tiny_model, one_process, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n")  # ten videos, five each
    out = tmp_path / "videos"
    proc = subprocess.Popen(command(tiny_model, prompts, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=environment())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not all(list(out.glob(f"{i:03d}-*.mp4")) for i in range(3)):
            time.sleep(0.01)  # until each process has finished a video (and rank 0 two)
        victim = [pid for pid in descendants(proc.pid) if rank_of(pid) == 1]
        assert victim, "no rank 1 worker to kill"
        os.kill(victim[0], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # torchrun stops the others and fails
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    names = [f"{i:03d}-" for i in range(10)]
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    print(f"killed rank 1 with {finished} finished and {len(list(out.glob('.*')))} temporaries in {out.name}/")
    assert not (out / "index.jsonl").exists()  # written only when every process is done
    assert 1 <= len(finished) < 10 and all(name[:4] in names for name in finished)  # killed mid-batch
    reference = {r["prompt"]: r["file"] for r in index(one_process / "videos")}
    for name in finished:  # whole: every frame of the video one process makes of that prompt and seed
        i = int(name[:3])
        if i < 5:
            want = read_video(one_process / "videos" / reference[PROMPTS[i]])[0]
            assert np.array_equal(read_video(out / name)[0], want), name
        assert read_video(out / name)[0].shape[0] == 5, name
    # run again: all ten, one index, and the killed writers' temporaries swept
    result = subprocess.run(command(tiny_model, prompts, out), capture_output=True, text=True, env=environment(),
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["seed"] for r in index(out)] == list(range(10))
    assert sorted(p.name for p in out.iterdir()) == sorted([r["file"] for r in index(out)] + ["index.jsonl"])


@pytest.mark.slow  # torch.compile's import
def test_compile_is_refused_where_processes_share_steps_and_kept_where_each_makes_its_own_videos(tiny_model,
                                                                                                  monkeypatch):
    """Under torchrun (the world size is read before any group is joined): --compile with one PROMPT, whose
    steps the processes share, is one line; with --prompts each process compiles its own DiT."""
    from soragen.cli.generate import _load
    from soragen.core.errors import UsageError
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--compile under torchrun"):
        _load(tiny_model, "cpu", "float32", True, False, [], "auto")
    pipe, _ = _load(tiny_model, "cpu", "float32", True, False, [], None)  # --prompts: no steps shared
    assert pipe.compiled and pipe.predict is not pipe.model.dit.predict
