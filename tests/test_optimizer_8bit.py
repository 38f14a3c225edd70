"""`soragen train --optimizer adamw8bit`: torchao's AdamW with 8-bit moments, on a full fine-tune and a
LoRA of a tiny Wan model; its moments checkpointed as plain tensors (codes, scale, qmap) and a run
resumed bit for bit; the dry run's smaller optimizer memory; a clear refusal where it cannot run.

The tests that train need torchao (soragen's `lowbit` extra) and skip without it; the refusals run
everywhere. torchao's step is compiled by torch.compile, and compiling it once per parameter shape
takes minutes of a clean CI machine's two cores; the tests run the same torchao code uncompiled
(TORCHDYNAMO_DISABLE=1, which `--optimizer adamw8bit` honours: no C++ compiler needed then).
What is soragen's here (the moments' checkpoint, the resume, the dry run's count) is the same either way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import STATE_FILE, assert_one_line_error, cli
from soragen.io.model_folder import load_model
from soragen.train.optimizers import state_bytes
import test_finetune
from test_finetune import train_args

wan, clips = test_finetune.wan, test_finetune.clips  # its fixtures, here too

# a LoRA of rank 128 on the tiny Wan model: its matrices (128 x 40, 120 x 128, ...) have 4096 values or
# more in whole blocks of 256, so their moments are 8-bit (smaller tensors keep float32 moments)
LORA = ("--lora-rank", 128)


@pytest.fixture(autouse=True)
def uncompiled(monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # read by torch.compile at each of torchao's steps


def _torchao():
    return pytest.importorskip("torchao.optim", reason="torchao is not installed (pip install 'soragen[lowbit]')")


def _moments(checkpoint) -> dict[str, torch.Tensor]:
    return {k[len("optimizer."):]: v for k, v in load_file(checkpoint / "train_state" / "dcp" / STATE_FILE).items()
            if k.startswith("optimizer.")}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [(), LORA], ids=["full", "lora"])
def test_8bit_moments_train_are_stored_as_plain_tensors_and_resume_bit_for_bit(wan, clips, tmp_path, lora):
    _torchao()
    cache, straight, resumed = tmp_path / "cache", tmp_path / "straight", tmp_path / "resumed"
    args = ("--optimizer", "adamw8bit", *lora)
    assert cli(*train_args(clips, straight, wan, cache, 4, *args)) == 0
    assert cli(*train_args(clips, resumed, wan, cache, 2, *args)) == 0
    assert cli(*train_args(clips, resumed, wan, cache, 4, "--resume", *lora)) == 0  # the run's optimizer kept
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    state = json.loads((straight / "checkpoint-4" / "train_state" / "state.json").read_text())
    assert state["config"]["optimizer"] == "adamw8bit"
    # the moments: uint8 codes with a float32 scale per 256 values and a 256-entry table, where big enough
    moments = _moments(straight / "checkpoint-4")
    codes = {k[:-len(".codes")]: v for k, v in moments.items() if k.endswith(".codes")}
    assert codes and all(v.dtype == torch.uint8 for v in codes.values())
    for name, v in codes.items():
        assert moments[f"{name}.scale"].dtype == torch.float32 and moments[f"{name}.scale"].numel() == v.numel() // 256
        assert moments[f"{name}.qmap"].shape == (256,)
    eight_bit = sum(v.numel() for v in codes.values()) // 2
    trained = [k for k in load_file(straight / "checkpoint-4" / "train_state" / "dcp" / STATE_FILE) if k.startswith("model.")]
    if lora:  # every matrix of the adapter: 8-bit
        assert all(".lora_" in k for k in trained) and len(codes) == 2 * sum(".weight" in k for k in trained)
    else:
        assert eight_bit >= 10_000
    # the weights trained
    dcp = load_file(straight / "checkpoint-4" / "train_state" / "dcp" / STATE_FILE)
    # what --dry-run counts for the moments is what they hold
    held = sum(v.numel() * v.element_size() for k, v in moments.items() if not k.endswith(".step"))
    assert held == state_bytes("adamw8bit", [dcp[k].numel() for k in trained])
    base = load_model(wan).dit.state_dict()
    changed = [k for k in trained if k[len("model."):] not in base or not torch.equal(dcp[k], base[k[len("model."):]])]
    assert len(changed) >= len(trained) // 2
    # stopped at 2 and resumed to 4: the straight run's weights, EMA and moments, bit for bit
    weights = "lora.safetensors" if lora else "dit/model.safetensors"
    for name in (weights, f"train_state/dcp/{STATE_FILE}"):
        a, b = load_file(straight / "checkpoint-4" / name), load_file(resumed / "checkpoint-4" / name)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_the_optimizer_is_the_runs_adamw_writes_what_it_wrote_and_resume_keeps_it(wan, clips, tmp_path, capfd):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert cli(*train_args(clips, run, wan, cache, 1, "--save-every", 1)) == 0
    for name in ("train_config.json", "checkpoint-1/train_state/state.json"):  # the default is not written
        assert '"optimizer"' not in (run / name).read_text()
    assert not any(k.endswith((".codes", ".scale")) for k in _moments(run / "checkpoint-1"))
    capfd.readouterr()
    rc = cli(*train_args(clips, run, wan, cache, 2, "--resume", "--optimizer", "adamw8bit"))
    assert_one_line_error(capfd.readouterr(), 2, rc, "--optimizer adamw8bit", "--optimizer adamw", "--resume")


def test_fsdp_is_refused_before_anything_starts(wan, clips, tmp_path, capfd, monkeypatch):
    """Under torchrun with --fsdp (the world size is all the check before it reads)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    capfd.readouterr()
    rc = cli(*train_args(clips, tmp_path / "run", wan, tmp_path / "cache", 2, "--optimizer", "adamw8bit", "--fsdp"))
    assert_one_line_error(capfd.readouterr(), 2, rc, "--optimizer adamw8bit", "--fsdp")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_without_torchao_adamw8bit_is_refused_in_one_line_and_adamw_is_unaffected(wan, clips, tmp_path):
    """A real process that cannot find torchao, as where it is not installed (to diffusers too: a
    None in sys.modules makes importlib's find_spec say there is no such module, and its import fail)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torchao'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path]), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    args = [str(a) for a in train_args(clips, run, wan, tmp_path / "cache", 1, "--optimizer", "adamw8bit")]
    result = subprocess.run([sys.executable, "-m", "soragen", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert_one_line_error(result, 2, result.returncode, "--optimizer adamw8bit", "torchao", "pip install")
    assert not run.exists()  # refused before the run folder was made
    plan = subprocess.run([sys.executable, "-m", "soragen", *args, "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert plan.returncode == 0 and "optimizer (8-bit)" in plan.stdout, plan.stderr[-2000:]


def _optimizer_bytes(line: str, label: str) -> float:
    value, unit = re.search(re.escape(label) + r" ([0-9.]+) (MiB|GiB)", line).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def test_the_dry_run_counts_8bit_moments(wan, clips, tmp_path, capsys):
    """The tiny preset's DiT (about 6M weights, most in matrices of whole blocks): a quarter of AdamW's
    float32 moments and a little more for the scales."""
    from soragen.core.config import dit_preset
    from soragen.train.plan import training_plan
    config = dit_preset("tiny", in_channels=16, text_dim=384)
    adamw, low = (training_plan(config, (16, 3, 8, 8), 1, 8, 384, optimizer=name) for name in ("adamw", "adamw8bit"))
    trained = adamw.trainable
    assert adamw.bytes["optimizer"] == 8 * trained
    assert 2 * trained < low.bytes["optimizer"] < 2.2 * trained
    assert {k: v for k, v in adamw.bytes.items() if k != "optimizer"} == \
        {k: v for k, v in low.bytes.items() if k != "optimizer"}
    # through the command line, on the tiny Wan model
    lines = {}
    for name in ("adamw", "adamw8bit"):
        assert cli(*train_args(clips, tmp_path / name, wan, tmp_path / "cache", 2, "--optimizer", name,
                               "--dry-run")) == 0
        lines[name] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory")][0]
    assert _optimizer_bytes(lines["adamw8bit"], "optimizer (8-bit)") < _optimizer_bytes(lines["adamw"], "optimizer")
    assert "8-bit" not in lines["adamw"]
