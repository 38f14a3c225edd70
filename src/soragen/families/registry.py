"""Model families, and the one place that answers "which family is this folder?".

A family is everything soragen knows about one kind of model: how to recognise its folders, what
its DiT is (a DiTConfig), how its weights' keys map onto ours, the names its LoRA adapters use in
other tools, its sampling and video defaults, and its text encoder and VAE. Each family is one
module in this folder that subclasses `Family` (soragen.families.base) and is registered below; generate, train,
export, --dry-run, --lora and inspect-patches all ask `family_of` and nothing else.

A soragen model folder (soragen.json) says its family in the manifest's "family" field, and is
soragen's own when it says nothing. A folder in another tool's layout (a diffusers pipeline, say)
is claimed by the first family whose `recognises` is true.
"""

from __future__ import annotations

from pathlib import Path

from soragen.core.errors import SoragenError
from soragen.families import ours, wan
from soragen.families.base import Family

DEFAULT = "soragen"  # the family of a soragen.json that names none


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Add a family (a later one with the same name replaces the earlier)."""
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name] + [family]
    return family


def named(name: str, where: Path | str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SoragenError(f"{where}: model family {name!r} is not one this soragen knows "
                       f"({', '.join(f.name for f in FAMILIES)}): upgrade soragen")


def family_of(folder: Path, manifest: dict | None) -> Family | None:
    """The family of a model folder: by its manifest (soragen.json, already read) where it has one,
    else the first that recognises the folder; None where none does."""
    if manifest is not None:
        name = manifest.get("family", DEFAULT)
        if not isinstance(name, str):
            raise SoragenError(f"{folder / 'soragen.json'}: \"family\" must be a string, got {name!r}")
        return named(name, folder / "soragen.json")
    return next((family for family in FAMILIES if family.recognises(folder)), None)


for _module in (ours, wan):  # soragen's own first: the others claim only folders in their own layouts
    register(_module.FAMILY)
