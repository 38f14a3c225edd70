"""soragen's own DiT family: the shapes-world models that `soragen train` makes and the package ships.

Its folders are soragen model folders (soragen.io.model_folder reads them for every family); its
DiT is VideoDiT with DiTConfig's defaults and a preset's sizes (soragen.core.config). Its blocks
are named as Wan's are, so its LoRA adapters are stored in diffusers' Wan LoRA layout, which
other tools read.
"""

from __future__ import annotations

from soragen.families.wan import WanFamily


class SoragenFamily(WanFamily):
    name = "soragen"

    def recognises(self, folder) -> bool:  # only soragen model folders, which say their family
        return False


FAMILY = SoragenFamily()
