"""Model families: a new one is a module and a registry entry, and every command then takes its folders.

The toy family below lives in the test's temporary folder, not in soragen: its own folder layout
(toy.json, dit.safetensors, vae/), its own loader, registered through soragen.families.registry
and nothing else. generate, export and train --dry-run then run on it through the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli
from soragen.families import registry

TOY_FAMILY = textwrap.dedent('''
    """A toy model family: a test-size DiT and VAE in a folder layout of its own."""
    from pathlib import Path

    from safetensors.torch import load_file

    from soragen.core.config import DiTConfig, SamplingDefaults, TextEncoderSpec, VideoDefaults
    from soragen.core.jsonfile import read_json
    from soragen.families.base import Family
    from soragen.families.registry import register
    from soragen.models.dit import VideoDiT
    from soragen.models.model import Model
    from soragen.models.vae import load_vae


    class ToyFamily(Family):
        name = "toy"

        def recognises(self, folder: Path) -> bool:
            return (folder / "toy.json").is_file()

        def configs(self, folder: Path):
            return DiTConfig(**read_json(folder / "toy.json")["dit"]), TextEncoderSpec()

        def load(self, folder: Path, source: str, dtype):
            config, text = self.configs(folder)
            dit = VideoDiT(config)
            dit.load_state_dict(load_file(str(folder / "dit.safetensors")))
            video = VideoDefaults(frames=4, height=32, width=32, fps=8.0)
            return Model(dit.to(dtype).eval().requires_grad_(False), load_vae(folder / "vae"), text, video, {},
                         SamplingDefaults(sampler="ddim", steps=3, guidance=3.0), folder, self)


    FAMILY = register(ToyFamily())
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy family registered (for this test only) and a saved folder of it."""
    from safetensors.torch import save_file

    from soragen.core.config import dit_preset, vae_preset_config
    from soragen.models.dit import VideoDiT
    from soragen.models.vae import new_vae, save_vae

    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))  # restored after the test
    module_file = tmp_path / "toy_family.py"
    module_file.write_text(TOY_FAMILY)
    spec = importlib.util.spec_from_file_location("toy_family", module_file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_family", module)
    spec.loader.exec_module(module)

    folder = tmp_path / "toy-model"
    folder.mkdir()
    config = dit_preset("test", in_channels=4, text_dim=384)
    torch.manual_seed(0)
    dit = VideoDiT(config)
    with torch.no_grad():  # so that the zero-initialised output layer and gates do something
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "dit.safetensors"))
    save_vae(new_vae(vae_preset_config("test")), folder / "vae")
    (folder / "toy.json").write_text(json.dumps({"dit": {k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in vars(config).items()}}))
    return module.FAMILY, folder


def frames_of(folder):
    from PIL import Image
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_a_family_added_through_the_registry_alone_runs_generate_export_and_dry_run(toy, tmp_path, capsys):
    family, folder = toy
    assert registry.family_of(folder, None) is family
    assert cli("generate", "a red ball moving right", "--model", folder, "--out", tmp_path / "toy-frames") == 0
    made = frames_of(tmp_path / "toy-frames")
    assert made.shape == (4, 32, 32, 3) and made.std() > 0  # the toy's video defaults, and not a blank video

    # export: a soragen model folder that says its family, and makes the same video
    assert cli("export", folder, tmp_path / "exported") == 0
    assert json.loads((tmp_path / "exported" / "soragen.json").read_text())["family"] == "toy"
    assert cli("generate", "a red ball moving right", "--model", tmp_path / "exported",
               "--out", tmp_path / "exported-frames") == 0
    assert np.array_equal(frames_of(tmp_path / "exported-frames"), made)

    # train --dry-run plans from the family's configs
    capsys.readouterr()
    assert cli("train", "--init", folder, "--dry-run", "--frames", 4, "--height", 32, "--width", 32) == 0
    plan = capsys.readouterr().out
    parameters = sum(p.numel() for p in toy_dit(folder).parameters())
    assert f"{parameters:,}" in plan, plan


def toy_dit(folder):
    from soragen.core.config import DiTConfig
    from soragen.models.dit import VideoDiT
    return VideoDiT(DiTConfig(**json.loads((folder / "toy.json").read_text())["dit"]))


def test_a_folder_of_a_family_this_soragen_does_not_know_is_refused_in_one_line(toy, tmp_path, capsys, monkeypatch):
    _, folder = toy
    assert cli("export", folder, tmp_path / "exported") == 0
    monkeypatch.setattr(registry, "FAMILIES", [f for f in registry.FAMILIES if f.name != "toy"])
    capsys.readouterr()
    rc = cli("generate", "a ball", "--model", tmp_path / "exported", "--out", tmp_path / "x.mp4")
    assert_one_line_error(capsys.readouterr(), 1, rc, "soragen.json", "family 'toy'", "upgrade")
    assert not (tmp_path / "x.mp4").exists()


def test_the_builtin_families_and_what_they_claim(tiny_model, tmp_path):
    from soragen.io.model_folder import load_model, read_manifest
    assert [f.name for f in registry.FAMILIES][:2] == ["soragen", "wan"]
    assert "family" not in read_manifest(tiny_model)  # soragen's own folders say nothing: read as ours
    assert registry.family_of(tiny_model, read_manifest(tiny_model)).name == "soragen"
    assert load_model(tiny_model).family.name == "soragen"
    (tmp_path / "model_index.json").write_text("{}")
    assert registry.family_of(tmp_path, None).name == "wan"
    assert registry.family_of(tmp_path / "nowhere", None) is None
