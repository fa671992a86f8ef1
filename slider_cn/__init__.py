"""slider-cn: ControlNet-aware slider adapters for diffusion models.

Helpers for your own scripts (imported on first use, so ``import slider_cn`` stays light)::

    from slider_cn import load_slider, set_slider_strength
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "load_slider": "slider_cn.loading",
    "set_slider_strength": "slider_cn.loading",
    "load_slider_controlnet": "slider_cn.loading",
    "slider_files": "slider_cn.loading",
    "slider_info": "slider_cn.loading",
    "export_slider": "slider_cn.export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'slider_cn' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
