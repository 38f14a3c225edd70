"""A hostile probe of the real-model features: Wan folders, LoRA adapters, fine-tuning, export.

A model folder, adapter or image from elsewhere is data, never code; a command removes or replaces
only what it wrote itself; every file a command relies on is checked first; every refusal is one
line naming the file or option. Each hostile folder or file is built here, from real files.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import STATE_FILE, as_written_before_dcp, assert_one_line_error, cli, listing

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red ball moving right"
SMALL = ["--frames", 1, "--height", 32, "--width", 32, "--steps", 1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from soragen.tools.tiny_wan import tiny_pipeline
    folder = tmp_path_factory.mktemp("wan") / "Wan-tiny"
    tiny_pipeline().save_pretrained(folder)
    return folder


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def soragen_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ---- a downloaded folder's code never runs ---------------------------------------------------------

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def plant_code(folder: Path, relative: str, marker: Path) -> None:
    """An auto_map in `relative` pointing to evil.py, placed where transformers looks for it (the
    folder's root) and beside the file; transformers asks "run the custom code? [y/N]" for it."""
    config = folder / relative

    def change(data):
        if relative.endswith("tokenizer_config.json"):
            data.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
        else:
            data.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    edit_json(config, change)
    for where in (folder, config.parent):
        (where / "evil.py").write_text(EVIL.format(marker=str(marker)))


def run_answering_yes(*args, disable_our_check: bool = False) -> subprocess.CompletedProcess:
    """soragen in a process of its own whose stdin answers "y" to every question (`yes | soragen ...`).
    `disable_our_check` turns off soragen's own auto_map check, to show what transformers then does
    with the trust_remote_code=False soragen passes it."""
    code = ("import sys, soragen.models.text as t\n"
            + ("t.check_encoder_folder = lambda *a, **k: None\n" if disable_our_check else "")
            + "from soragen.cli import run\nsys.exit(run(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input="y\n" * 50, capture_output=True,
                          text=True, env=soragen_env(), timeout=300)


@pytest.mark.parametrize("relative", ["text_encoder/config.json", "tokenizer/tokenizer_config.json"])
def test_a_wan_folder_with_code_is_refused_in_one_line_and_nothing_is_asked(wan, tmp_path, relative):
    folder, marker = copy_of(wan, tmp_path), tmp_path / "ran"
    plant_code(folder, relative, marker)
    p = run_answering_yes("generate", PROMPT, "--model", folder, *SMALL, "--out", tmp_path / "v.mp4")
    assert_one_line_error(p, 1, p.returncode, relative, "auto_map", "never runs code")
    assert "[y/N]" not in p.stdout + p.stderr and not marker.exists() and not (tmp_path / "v.mp4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("relative", ["text_encoder/config.json", "tokenizer/tokenizer_config.json"])
def test_without_our_check_transformers_is_told_not_to_run_code(wan, tmp_path, relative):
    folder, marker = copy_of(wan, tmp_path), tmp_path / "ran"
    plant_code(folder, relative, marker)
    p = run_answering_yes("generate", PROMPT, "--model", folder, *SMALL, "--out", tmp_path / "v.mp4",
                          disable_our_check=True)
    assert_one_line_error(p, 1, p.returncode, "text encoder", "custom code")
    assert "[y/N]" not in p.stdout + p.stderr and not marker.exists()


def test_a_soragen_model_whose_text_encoder_folder_has_code_is_refused_before_loading(tiny_model, tmp_path,
                                                                                    capfd, monkeypatch):
    from soragen.models import text
    from transformers import BertConfig, BertModel
    encoder, marker = tmp_path / "encoder", tmp_path / "ran"
    BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(encoder)
    plant_code(encoder, "config.json", marker)
    folder = copy_of(tiny_model, tmp_path)
    edit_json(folder / "text_encoder.json", lambda d: d.update(source=str(encoder)))
    loaded = []
    monkeypatch.setattr(text.TextEncoder, "__init__", lambda *a, **k: loaded.append(a) or 1 / 0)
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", folder, "--steps", 1, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, "encoder/config.json", "auto_map")
    assert loaded == [] and not marker.exists()


def remote_code_risks(source: str, filename: str = "<snippet>") -> list[str]:
    """Each call in `source` that could reach remote code: a from_pretrained (or diffusers'
    from_single_file) that does not pass trust_remote_code=False, unless it is called on a
    concrete transformers or diffusers class (CamelCase, not AutoModel and the like, not a pipeline:
    those never read an auto_map); any call passing trust_remote_code other than False, custom_pipeline, or
    **kwargs to such a loader."""
    risks = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        trust = keywords.get("trust_remote_code")
        if "trust_remote_code" in keywords and not (isinstance(trust, ast.Constant) and trust.value is False):
            risks.append(f"{where}: trust_remote_code is not the constant False")
        if "custom_pipeline" in keywords:
            risks.append(f"{where}: custom_pipeline loads code")
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr in ("from_pretrained", "from_single_file")):
            continue
        if None in keywords:
            risks.append(f"{where}: **kwargs to {func.attr} could carry trust_remote_code=True")
        receiver = func.value.id if isinstance(func.value, ast.Name) else ""
        concrete = receiver[:1].isupper() and not re.match(r"Auto[A-Z]", receiver) and "Pipeline" not in receiver
        if "trust_remote_code" not in keywords and not concrete:
            risks.append(f"{where}: {ast.unparse(func)} without trust_remote_code=False")
    return risks


def test_the_remote_code_check_finds_what_it_should():
    assert remote_code_risks("AutoModel.from_pretrained(p)")
    assert remote_code_risks("cls = AutoModel\ncls.from_pretrained(p)")
    assert remote_code_risks("transformers.AutoTokenizer.from_pretrained(p)")
    assert remote_code_risks("WanPipeline.from_pretrained(p)")
    assert remote_code_risks("AutoModel.from_pretrained(p, trust_remote_code=True)")
    assert remote_code_risks("AutoModel.from_pretrained(p, trust_remote_code=flag)")
    assert remote_code_risks("AutoModel.from_pretrained(p, **options)")
    assert remote_code_risks("DiffusionPipeline.from_pretrained(p, custom_pipeline='x', trust_remote_code=False)")
    assert not remote_code_risks("AutoModel.from_pretrained(p, trust_remote_code=False)")
    assert not remote_code_risks("T5EncoderModel.from_pretrained(p)")
    assert not remote_code_risks("AutoencoderKLWan.from_pretrained(p)")


def test_no_from_pretrained_call_site_can_reach_remote_code():
    files = [f for folder in ("src", "bench", "docs", "experiments", "tests") for f in (REPO / folder).rglob("*.py")]
    assert any(f.name == "text.py" for f in files)
    calls, risks = 0, []
    for file in files:
        source = file.read_text()
        calls += source.count(".from_pretrained(")
        risks += remote_code_risks(source, str(file.relative_to(REPO)))
    assert calls >= 4  # the walk sees the call sites (text.py's three at least)
    assert risks == []


# ---- JSON from a model folder is read with limits ------------------------------------------------

def nest(levels: int) -> str:
    return "[" * levels + "]" * levels


DEEP = {  # a file of a Wan folder, and the words its one-line error must hold
    "model_index.json": ["model_index.json", "nests deeper"],
    "transformer/config.json": ["transformer/config.json", "nests deeper"],
    "vae/config.json": ["vae/config.json", "nests deeper"],
    "scheduler/scheduler_config.json": ["scheduler_config.json", "nests deeper"],
    "text_encoder/config.json": ["text_encoder/config.json", "nests deeper"],
    "tokenizer/tokenizer_config.json": ["tokenizer_config.json", "nests deeper"],  # transformers reads it
}


@pytest.mark.parametrize("relative", DEEP)
@pytest.mark.parametrize("levels", [100, 100_000])  # within Python's recursion limit, and far past it
def test_a_deeply_nested_json_file_in_a_wan_folder_is_named(wan, tmp_path, capfd, relative, levels):
    folder = copy_of(wan, tmp_path)
    (folder / relative).write_text(nest(levels))
    rc = cli("generate", PROMPT, "--model", folder, *SMALL, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, *DEEP[relative])
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("damage, needles", [
    ("deep", ["dit/config.json", "nests deeper"]),
    ("huge integer", ["dit/config.json", "not valid JSON"]),
    ("fifo", ["dit/config.json", "FIFO"]),
    ("a folder", ["dit/config.json", "a folder"]),
    ("not UTF-8", ["dit/config.json", "UTF-8"]),
])
def test_odd_json_files_in_a_soragen_folder_are_named(tiny_model, tmp_path, capfd, damage, needles):
    folder = copy_of(tiny_model, tmp_path)
    config = folder / "dit" / "config.json"
    config.unlink()
    if damage == "deep":
        config.write_text('{"depth": ' + nest(5000) + "}")
    elif damage == "huge integer":
        config.write_text('{"depth": ' + "9" * 10_000 + "}")
    elif damage == "fifo":
        os.mkfifo(config)  # opening it to read would wait for a writer forever
    elif damage == "a folder":
        config.mkdir()
    else:
        config.write_bytes(b'{"depth": "\xff\xfe"}')
    rc = cli("generate", PROMPT, "--model", folder, "--steps", 1, "--out", tmp_path / "v.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, *needles)


# ---- hostile adapters -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A real adapter of the tiny Wan model, in diffusers' layout (what soragen train --lora-rank saves)."""
    from soragen.models import lora as lora_io
    from soragen.core.config import LoRAConfig
    from soragen.families.wan import FAMILY as WAN
    from soragen.families.wan import from_diffusers
    from soragen.io import lora_file
    from soragen.tools.tiny_wan import tiny_pipeline
    dit = from_diffusers(tiny_pipeline().transformer).float()
    torch.manual_seed(0)
    lora_io.add_lora(dit, LoRAConfig(lora_rank=2))
    with torch.no_grad():
        for p in lora_io.trainable_state(dit).values():
            p.add_(torch.randn(p.shape) * 0.1)
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    lora_file.save(dit, path, WAN)
    return path


def damaged_adapter(adapter: Path, folder: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file
    tensors, metadata = load_file(adapter), {"format": "pt"}
    path = folder / "x.safetensors"
    a_key = next(k for k in sorted(tensors) if k.endswith("attn1.to_q.lora_A.weight"))
    module = a_key.removesuffix(".lora_A.weight")
    b_key = f"{module}.lora_B.weight"
    if how.startswith("metadata"):
        metadata["lora_adapter_metadata"] = {
            "metadata rank 0": json.dumps({"transformer.r": 0, "transformer.lora_alpha": 4}),
            "metadata alpha a word": json.dumps({"transformer.r": 2, "transformer.lora_alpha": "high"}),
            "metadata rank pattern a list": json.dumps({"transformer.r": 2, "transformer.rank_pattern": [1, 2]}),
            "metadata not JSON": "{r: 2",
            "metadata nested deep": nest(10_000),
        }[how]
    elif how == "alpha not a scalar":
        tensors[f"{module}.alpha"] = torch.ones(3)
    elif how == "alpha NaN":
        tensors[f"{module}.alpha"] = torch.tensor(float("nan"))
    elif how == "ranks differ":
        tensors[b_key] = torch.randn(tensors[b_key].shape[0], tensors[a_key].shape[0] + 1)
    elif how == "rank 0":
        tensors[a_key] = torch.zeros(0, tensors[a_key].shape[1])
        tensors[b_key] = torch.zeros(tensors[b_key].shape[0], 0)
    elif how == "A a vector":
        tensors[a_key] = torch.zeros(tensors[a_key].shape[1])
    save_file(tensors, str(path), metadata=metadata)
    if how == "truncated":
        path.write_bytes(adapter.read_bytes()[:-100])
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "a folder":
        path.unlink()
        path.mkdir()
    return path


ADAPTERS = {
    "metadata rank 0": ["x.safetensors", "transformer.r", "0", "positive"],
    "metadata alpha a word": ["x.safetensors", "transformer.lora_alpha", "'high'", "number"],
    "metadata rank pattern a list": ["x.safetensors", "rank_pattern", "object"],
    "metadata not JSON": ["x.safetensors", "lora_adapter_metadata", "not valid JSON"],
    "metadata nested deep": ["x.safetensors", "lora_adapter_metadata", "nests deeper"],
    "alpha not a scalar": ["x.safetensors", ".alpha", "one number", "(3,)"],
    "alpha NaN": ["x.safetensors", ".alpha", "nan", "finite"],
    "ranks differ": ["x.safetensors", "attn1.to_q", "lora_A has rank 2", "lora_B rank 3"],
    "rank 0": ["x.safetensors", "attn1.to_q", "rank 0"],
    "A a vector": ["x.safetensors", "attn1.to_q", "matrices"],
    "truncated": ["x.safetensors", "not a readable safetensors"],
    "fifo": ["x.safetensors", "FIFO", "not a regular file"],
    "a folder": ["x.safetensors", "no lora.safetensors there"],
}


@pytest.mark.parametrize("how", ADAPTERS)
def test_a_hostile_adapter_is_refused_in_one_line_that_says_what_is_wrong(wan, adapter, tmp_path, capfd, how):
    path = damaged_adapter(adapter, tmp_path, how)
    capfd.readouterr()
    rc = cli("generate", PROMPT, "--model", wan, "--lora", path, *SMALL, "--out", tmp_path / "v.mp4")
    line = assert_one_line_error(capfd.readouterr(), 1, rc, *ADAPTERS[how])
    assert "another model" not in line and "no such file" not in line
    assert not (tmp_path / "v.mp4").exists()


def test_the_intact_adapter_still_merges(wan, adapter, tmp_path):
    assert cli("generate", PROMPT, "--model", wan, "--lora", adapter, *SMALL, "--out", tmp_path / "v.mp4") == 0


# ---- export removes nothing it did not write ---------------------------------------------------------

def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_replaces_a_folder_of_the_users_files(tiny_model, tmp_path, capfd):
    mine = tmp_path / "mine"
    (mine / "dit").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "dit" / "config.json").write_text("{}")  # looks like ours, but beside the user's notes
    before = snapshot(mine)
    for force in ([], ["--force"]):
        capfd.readouterr()
        rc = cli("export", tiny_model, mine, *force)
        assert_one_line_error(capfd.readouterr(), 1, rc, str(mine), "notes.txt", "did not write")
        assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left beside it


@pytest.mark.parametrize("where", ["itself", "inside it", "holding it"])
def test_export_never_writes_over_the_model_it_reads(wan, tmp_path, capfd, where):
    parent = tmp_path / "models"
    source = copy_of(wan, parent, "wan")  # a Wan folder: its text encoder is read from it at generate time
    out = {"itself": source, "inside it": source / "exported", "holding it": parent}[where]
    before = snapshot(parent)
    for force in ([], ["--force"]):
        capfd.readouterr()
        rc = cli("export", source, out, *force)
        assert_one_line_error(capfd.readouterr(), 1, rc, f"refusing to export into {out}", "model it exports from")
        assert snapshot(parent) == before
    assert cli("generate", PROMPT, "--model", source, *SMALL, "--out", tmp_path / "v.mp4") == 0  # it still loads


def test_export_replaces_an_earlier_export_only_with_force_and_whole(tiny_model, tmp_path, capfd):
    out = tmp_path / "exported"
    assert cli("export", tiny_model, out, "--steps", 7) == 0
    first = snapshot(out)
    capfd.readouterr()
    rc = cli("export", tiny_model, out, "--steps", 9)
    assert_one_line_error(capfd.readouterr(), 1, rc, str(out), "earlier export", "--force")
    assert snapshot(out) == first
    assert cli("export", tiny_model, out, "--steps", 9, "--force") == 0
    assert json.loads((out / "soragen.json").read_text())["sampling"]["steps"] == 9
    assert sorted(snapshot(out)) == sorted(first) and sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_export_over_the_base_of_the_lora_it_exports_is_refused(wan, tmp_path, capfd):
    from soragen.models import lora as lora_io
    from soragen.core.config import LoRAConfig, VideoDefaults
    from soragen.io.model_folder import load_model, save_lora_model
    base = tmp_path / "base"
    assert cli("export", wan, base) == 0  # an export: --force could replace it, were it not read
    dit = load_model(base).dit
    lora_io.add_lora(dit, LoRAConfig(lora_rank=2))
    save_lora_model(tmp_path / "run" / "checkpoint-2", dit, str(base), LoRAConfig(lora_rank=2),
                    VideoDefaults(frames=1, height=32, width=32, fps=8.0))
    before = snapshot(base)
    capfd.readouterr()
    rc = cli("export", tmp_path / "run", base, "--force")
    assert_one_line_error(capfd.readouterr(), 1, rc, "refusing to export into", "model it exports from")
    assert snapshot(base) == before


@pytest.mark.parametrize("where, needles", [
    ("under /proc", ["/proc", "cannot write"]),
    ("parent a file", ["a file, not a folder"]),
    ("a file", ["it is a file", "writes a folder"]),
    ("a FIFO", ["it is a FIFO"]),
    ("a link", ["symbolic link"]),
])
def test_export_to_an_odd_place_is_one_line_and_leaves_nothing(tiny_model, tmp_path, capfd, where, needles):
    if where == "under /proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("mine")
    out = {"under /proc": Path("/proc/soragen-export/model"), "parent a file": tmp_path / "file" / "model",
           "a file": tmp_path / "file", "a FIFO": tmp_path / "fifo", "a link": tmp_path / "link"}[where]
    if where == "a FIFO":
        os.mkfifo(out)
    elif where == "a link":
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    before = listing(tmp_path)
    capfd.readouterr()
    rc = cli("export", tiny_model, out)
    assert_one_line_error(capfd.readouterr(), 1, rc, *needles)
    assert listing(tmp_path) == before and (tmp_path / "file").read_text() == "mine"


def test_a_failed_export_leaves_no_folder_behind(tiny_model, tmp_path, capfd):
    damaged = copy_of(tiny_model, tmp_path)
    (damaged / "dit" / "model.safetensors").write_bytes(b"\0" * 64)
    capfd.readouterr()
    rc = cli("export", damaged, tmp_path / "new" / "deeper" / "out")
    assert_one_line_error(capfd.readouterr(), 1, rc, "model.safetensors")
    assert not (tmp_path / "new").exists()


# ---- resume checks every file of a checkpoint; the rotation keeps the intact ones ---------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from soragen.tools.shapes import make_dataset
    folder = tmp_path_factory.mktemp("data") / "clips"
    make_dataset(folder, n=4, seed=0, frames=9, size=32)
    return folder


def lora_train(clips, out, init, cache, steps, *extra) -> int:
    return cli("train", "--init", init, "--data", clips, "--out", out, "--frames", 9, "--height", 32, "--width", 32,
               "--batch-size", 2, "--max-steps", steps, "--save-every", 2, "--warmup", 1, "--lr", "1e-2",
               "--cache-dir", cache, "--lora-rank", 2, "--sample-every", 0, "--samples",
               Path(__file__).parent / "data" / "one_prompt.txt", *extra)


@pytest.fixture(scope="module")
def lora_run(wan, clips, tmp_path_factory):
    """A LoRA run of the tiny Wan model to step 6 that keeps three checkpoints: 2, 4 and 6."""
    folder = tmp_path_factory.mktemp("lora") / "run"
    assert lora_train(clips, folder, wan, folder.parent / "cache", 6, "--keep-last", 3) == 0
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


CHECKPOINT_DAMAGES = {  # a file of a LoRA checkpoint, what is done to it, and the words that name it
    "adapter truncated": ("lora.safetensors", truncate, ["lora.safetensors", "not a valid safetensors"]),
    "adapter gone": ("lora.safetensors", Path.unlink, ["lora.safetensors", "missing"]),
    "manifest torn": ("soragen.json", lambda p: p.write_text('{"format": 1, "ba'), ["soragen.json", "JSON"]),
    "manifest nested deep": ("soragen.json", lambda p: p.write_text(nest(50_000)), ["soragen.json", "nests deeper"]),
    "training state truncated": (f"train_state/dcp/{STATE_FILE}", truncate, [STATE_FILE, "not a valid safetensors"]),
    "training state gone": (f"train_state/dcp/{STATE_FILE}", Path.unlink, [f"train_state/dcp/{STATE_FILE}", "missing"]),
    "training state unlisted": ("train_state/state.json", lambda p: edit_json(p, lambda d: d.pop("dcp")),
                                ["state.json", "does not list the files of dcp/"]),
    "a stray file in the training state": ("train_state/dcp/shard-00002-model-00001-of-00001.safetensors",
                                           lambda p: shutil.copy(p.with_name(STATE_FILE), p),
                                           ["shard-00002", "not one of the files its state.json lists"]),
    "training state of another shape": (f"train_state/dcp/{STATE_FILE}", lambda p: moments_of_another_shape(p),
                                        [STATE_FILE, "does not hold what its state.json lists", "exp_avg"]),
    "LoRA rank negative": ("train_state/state.json", lambda p: edit_json(p, lambda d: d["lora"].update(lora_rank=-1)),
                           ["state.json", "lora_rank"]),
    "LoRA rank zero": ("train_state/state.json", lambda p: edit_json(p, lambda d: d["lora"].update(lora_rank=0)),
                       ["state.json", "rank 0", "does not fit"]),
    "config out of range": ("train_state/state.json",
                            lambda p: edit_json(p, lambda d: d["config"].update(batch_size=10**9)),
                            ["state.json", "batch_size"]),
    "kind a list": ("train_state/state.json", lambda p: edit_json(p, lambda d: d.update(kind=[1])),
                    ["state.json", "kind is '[1]'"]),
    "state a list": ("train_state/state.json", lambda p: p.write_text("[]"), ["state.json", "not a JSON object"]),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGES)
def test_resume_names_a_damaged_file_and_picks_the_newest_intact_checkpoint(lora_run, tmp_path, case):
    from soragen.train.checkpoints import resumable
    relative, damage, needles = CHECKPOINT_DAMAGES[case]
    run = copy_of(lora_run, tmp_path, "run")
    damage(run / "checkpoint-6" / relative)
    notes = []
    assert resumable(run, notes.append) == run / "checkpoint-4"
    assert len(notes) == 1 and f"checkpoint-6/{relative}" in notes[0] and "resuming from checkpoint-4" in notes[0]
    assert all(n.lower() in notes[0].lower() for n in needles), notes[0]


def test_a_lora_run_with_a_truncated_adapter_resumes_from_the_intact_checkpoint_and_keeps_it(
        wan, clips, lora_run, tmp_path, capfd):
    from soragen.train.checkpoints import check_checkpoint
    run = copy_of(lora_run, tmp_path, "run")
    truncate(run / "checkpoint-6" / "lora.safetensors")
    capfd.readouterr()
    assert lora_train(clips, run, wan, lora_run.parent / "cache", 8, "--resume") == 0
    err = capfd.readouterr().err
    assert "checkpoint-6/lora.safetensors" in err and "resuming from checkpoint-4" in err
    kept = sorted(p.name for p in run.glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]  # three kept, as the run asked: all intact
    for name in kept:
        check_checkpoint(run / name)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert cli("generate", PROMPT, "--model", run, *SMALL, "--out", tmp_path / "v.mp4") == 0


def test_resume_with_no_intact_checkpoint_is_one_line_and_changes_nothing(wan, clips, lora_run, tmp_path, capfd):
    run = copy_of(lora_run, tmp_path, "run")
    for step in (2, 4, 6):
        truncate(run / f"checkpoint-{step}" / "lora.safetensors")
    before = snapshot(run)
    capfd.readouterr()
    rc = lora_train(clips, run, wan, lora_run.parent / "cache", 8, "--resume")
    assert_one_line_error(capfd.readouterr(), 1, rc, "cannot resume", "checkpoint-6/lora.safetensors",
                          "2 earlier", "no intact checkpoint")
    assert snapshot(run) == before


def test_the_rotation_never_removes_the_last_intact_checkpoint_for_a_damaged_one(lora_run, tmp_path):
    from soragen.train.checkpoints import prune
    run = copy_of(lora_run, tmp_path, "run")
    truncate(run / "checkpoint-4" / "lora.safetensors")
    truncate(run / "checkpoint-6" / "train_state" / "dcp" / STATE_FILE)
    prune(run, 1)  # keep one: the newest intact is checkpoint-2; the damaged newer ones stay beside it
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    shutil.rmtree(run / "checkpoint-4")
    (run / "checkpoint-6" / "train_state" / "dcp" / STATE_FILE).write_bytes(
        (lora_run / "checkpoint-6" / "train_state" / "dcp" / STATE_FILE).read_bytes())
    prune(run, 1)  # checkpoint-6 is whole again: now it is the one kept
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6"]


@pytest.mark.parametrize("lora", [[], ["--lora-rank", 2]])
def test_train_from_a_damaged_model_leaves_no_folder_behind(wan, clips, tmp_path, capfd, lora):
    damaged = copy_of(wan, tmp_path)
    truncate(damaged / "transformer" / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "runs" / "new"
    capfd.readouterr()
    rc = cli("train", "--init", damaged, "--data", clips, "--out", out, "--frames", 9, "--height", 32,
             "--width", 32, "--max-steps", 2, "--cache-dir", tmp_path / "cache", *lora)
    assert_one_line_error(capfd.readouterr(), 1, rc, "diffusion_pytorch_model.safetensors")
    assert not (tmp_path / "runs").exists()


def rewrite(path: Path, change) -> None:
    """The tensors of a safetensors file changed by `change(tensors)`, its header's metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def moments_of_another_shape(path: Path) -> str:
    """One moment of the file made one longer; returns its name."""
    name = next(k for k in sorted(load_file_keys(path)) if k.endswith(".exp_avg"))
    rewrite(path, lambda tensors: tensors.update({name: torch.zeros(tensors[name].numel() + 1)}))
    return name


def load_file_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def listed_moments_of_another_shape(state_dir: Path) -> None:
    """A file that does not fit the model, though state.json lists it as it is."""
    name = moments_of_another_shape(state_dir / "dcp" / STATE_FILE)
    listed = lambda d: d["dcp"][STATE_FILE]  # noqa: E731
    edit_json(state_dir / "state.json", lambda d: listed(d).update({name: [math.prod(listed(d)[name]) + 1]}))


def nan_moments(path: Path) -> None:
    rewrite(path, lambda tensors: tensors.update({k: torch.full_like(v, float("nan"))
                                                  for k, v in tensors.items() if k.endswith(".exp_avg")}))


def before_dcp_with_garbage_settings(state_dir: Path) -> None:
    """The checkpoint as runs wrote it before train_state/dcp/, its optimizer's settings garbage."""
    from soragen.core.config import LoRAConfig
    from soragen.io.model_folder import load_model
    from soragen.models.lora import add_lora
    state = json.loads((state_dir / "state.json").read_text())
    dit = add_lora(load_model(json.loads((state_dir.parent / "soragen.json").read_text())["base"]).dit,
                   LoRAConfig(**state["lora"]))
    as_written_before_dcp(state_dir.parent, [n for n, p in dit.named_parameters() if p.requires_grad])


@pytest.mark.parametrize("case, damage, outcome, needles", [
    ("step a word", lambda s: edit_json(s / "state.json", lambda d: d.update(step="six")), "note",
     ["state.json", "step"]),
    ("step of another checkpoint", lambda s: edit_json(s / "state.json", lambda d: d.update(step=4)), "note",
     ["state.json", "step of checkpoint-6"]),
    # tensors' values are read only once the run has built its model, after the clips were scanned
    ("moments of another shape", listed_moments_of_another_shape, "error",
     ["optimizer", "exp_avg has shape", "resume from checkpoint-4"]),
    ("NaN moments", lambda s: nan_moments(s / "dcp" / STATE_FILE), "error",
     ["optimizer", "NaN", "resume from checkpoint-4"]),
    # a run's state as written before train_state/dcp/: read as it was, the run's own settings used
    ("settings not numbers", before_dcp_with_garbage_settings, "harmless", []),
])
def test_a_hostile_training_state_is_named_or_harmless(wan, clips, lora_run, tmp_path, capfd, case, damage,
                                                       outcome, needles):
    run = copy_of(lora_run, tmp_path, "run")
    damage(run / "checkpoint-6" / "train_state")
    capfd.readouterr()
    rc = lora_train(clips, run, wan, lora_run.parent / "cache", 8, "--resume")
    err = capfd.readouterr().err
    assert "Traceback" not in err
    if outcome == "error":
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert rc == 1 and len(lines) == 1 and all(n.lower() in lines[0].lower() for n in needles), lines
        return
    assert rc == 0 and json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"] is not None
    notes = [line for line in err.splitlines() if "resuming from checkpoint-4" in line]
    assert len(notes) == (outcome == "note") and all(n.lower() in notes[0].lower() for n in needles)


@pytest.mark.parametrize("where, code, needles", [
    ("a file", 2, ["--out", "is a file"]),
    ("under /proc", 1, ["--out", "/proc", "cannot make the run folder"]),
    ("below a file", 1, ["--out", "cannot make the run folder"]),
])
def test_train_out_in_an_odd_place_is_one_line(tiny_model, clips, tmp_path, capfd, where, code, needles):
    if where == "under /proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("mine")
    out = {"a file": tmp_path / "file", "under /proc": Path("/proc/soragen-run/run"),
           "below a file": tmp_path / "file" / "run"}[where]
    rc = cli("train", "--data", clips, "--vae", tiny_model, "--out", out, "--max-steps", 1)
    assert_one_line_error(capfd.readouterr(), code, rc, *needles)
    assert (tmp_path / "file").read_text() == "mine"
