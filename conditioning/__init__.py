"""Conditioning images for ControlNet training: detectors (controlnet-aux, OpenCV) and a
resumable batch runner.

    from conditioning import run_batch
    report = run_batch("canny", {"low_threshold": 50}, "data/plus", "data/plus_canny", workers=2)

Names are imported on first use: importing the package (as every helper process of the runner
does) costs nothing, and neither torch nor controlnet-aux is imported until a detector that
needs them is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conditioning.inline import prepare_inline_conditioning
    from conditioning.registry import (
        DETECTORS,
        DetectorSpec,
        ParamSpec,
        get_spec,
        resolve_params,
    )
    from conditioning.runner import FailedFile, RunReport, run_batch

_EXPORTS = {
    "DETECTORS": "conditioning.registry",
    "DetectorSpec": "conditioning.registry",
    "ParamSpec": "conditioning.registry",
    "get_spec": "conditioning.registry",
    "resolve_params": "conditioning.registry",
    "FailedFile": "conditioning.runner",
    "RunReport": "conditioning.runner",
    "run_batch": "conditioning.runner",
    "prepare_inline_conditioning": "conditioning.inline",
}
__all__ = [
    "DETECTORS",
    "DetectorSpec",
    "FailedFile",
    "ParamSpec",
    "RunReport",
    "get_spec",
    "prepare_inline_conditioning",
    "resolve_params",
    "run_batch",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'conditioning' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
