"""Conditioning images for ControlNet training: detectors (controlnet-aux, OpenCV) and a
resumable batch runner.

    from conditioning import run_batch
    report = run_batch("canny", {"low_threshold": 50}, "data/plus", "data/plus_canny", workers=2)

Importing this package imports neither torch nor controlnet-aux; a detector's pieces are
imported when it is first built.
"""

from conditioning.registry import DETECTORS, DetectorSpec, ParamSpec, get_spec, resolve_params
from conditioning.runner import FailedFile, RunReport, run_batch

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


def __getattr__(name: str):
    # inline.py needs the data-layer schema (pydantic); worker processes do not.
    if name == "prepare_inline_conditioning":
        from conditioning.inline import prepare_inline_conditioning

        return prepare_inline_conditioning
    raise AttributeError(f"module 'conditioning' has no attribute '{name}'")
