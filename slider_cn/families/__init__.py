"""The model-family registry: a family name -> the class that builds and encodes for it.

Entries are import paths so that listing families (and validating a config) does not import
diffusers. Later families add one line here and one module beside this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig
    from slider_cn.families.base import ModelFamily

FAMILIES: dict[str, str] = {
    "sd1x": "slider_cn.families.sd1x:SD1xFamily",
    "sdxl": "slider_cn.families.sdxl:SDXLFamily",
    "sd3": "slider_cn.families.sd3:SD3Family",
    "flux": "slider_cn.families.flux:FluxFamily",
    "zimage": "slider_cn.families.zimage:ZImageFamily",
}


def family_names() -> list[str]:
    return sorted(FAMILIES)


def family_class(name: str) -> type[ModelFamily]:
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_family(config: TrainConfig) -> ModelFamily:
    """The family object for a validated config."""
    return family_class(config.model_family)(config)
