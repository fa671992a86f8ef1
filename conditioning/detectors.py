"""Detectors ready to run: build one from the registry, call it on an RGB array.

A built detector is called as ``detector(rgb, (width, height), rel_path)`` and returns a
uint8 array of exactly that size: HxW for one-channel maps (spec.gray), HxWx3 RGB otherwise. Canny is OpenCV alone; every other detector is
the controlnet-aux class, imported on demand (see ``_aux``) and, when it needs weights,
loaded with its own ``from_pretrained`` from a local folder or a hub id.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import zlib
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from conditioning._aux import aux_class
from conditioning.canny import CannyEdges
from conditioning.images import resize, to_map
from conditioning.registry import DetectorSpec, get_spec
from slider_cn.errors import ConfigError


class Detector(Protocol):
    def __call__(self, rgb: np.ndarray, size: tuple[int, int], rel: str) -> np.ndarray: ...


class AuxDetector:
    """A controlnet-aux detector instance with its call arguments fixed."""

    def __init__(self, spec: DetectorSpec, params: dict[str, Any], model: Any):
        self.spec = spec
        self.model = model
        self.seed = params.get("seed", 0)
        kwargs = {spec.call_names.get(k, k): v for k, v in params.items() if k != "seed"}
        kwargs.update(spec.call_fixed)
        accepted = inspect.signature(model.__call__).parameters
        # Work at detect_resolution and return at it (not at controlnet-aux's 64-multiple
        # image_resolution): the one resize to the output size happens here.
        if "image_resolution" in accepted:
            kwargs["image_resolution"] = params["detect_resolution"]
        kwargs["output_type"] = "np"
        self.kwargs = kwargs

    def __call__(self, rgb: np.ndarray, size: tuple[int, int], rel: str) -> np.ndarray:
        if not self.spec.seeded:
            out = self.model(rgb, **self.kwargs)
        else:
            # controlnet-aux draws from the global RNGs: seed them per file (reproducible,
            # independent of the processing order) and restore them afterwards.
            seed = (zlib.crc32(rel.encode()) + self.seed) % 2**32
            np_state, py_state = np.random.get_state(), random.getstate()
            np.random.seed(seed)
            random.seed(seed)
            try:
                out = self.model(rgb, **self.kwargs)
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
        return resize(to_map(out, self.spec.gray), size, upscale=cv2.INTER_LINEAR)


def resolve_device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _weights_only_loading():
    """controlnet-aux loads checkpoints with torch.load; force its safe (weights-only) mode so
    no pickled code runs, whatever the torch version's default."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _hub_files(spec: DetectorSpec) -> list[str]:
    prefix = f"{spec.hub_subfolder}/" if spec.hub_subfolder else ""
    return [prefix + name for name in spec.weights]


def weights_help(spec: DetectorSpec) -> str:
    """How to provide a detector's weights."""
    return (
        f"download them once with `hf download {spec.default_repo} {' '.join(_hub_files(spec))} "
        f"--local-dir DIR` and pass --annotator-path DIR (inline conditioning: "
        f'"annotator_path": "DIR" in its params)'
    )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~", "/"))


def _load_pretrained(spec: DetectorSpec, cls: type, annotator_path: str | None) -> Any:
    source = annotator_path or spec.default_repo
    kwargs = dict(spec.pretrained_kwargs)
    folder = Path(source).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        missing = [name for name in spec.weights if not (folder / name).is_file()]
        sub = folder / spec.hub_subfolder if spec.hub_subfolder else None
        if missing and sub is not None and all((sub / n).is_file() for n in spec.weights):
            folder, missing = sub, []  # a snapshot of the hub repo, files in its subfolder
        if missing:
            raise ConfigError(
                f"detector '{spec.name}' needs weights: looked in {folder} for "
                f"{', '.join(spec.weights)} and did not find {', '.join(missing)}; "
                + weights_help(spec)
            )
        kwargs.pop("subfolder", None)  # controlnet-aux reads local files from the folder itself
        try:
            with _weights_only_loading():
                return cls.from_pretrained(str(folder), **kwargs)
        except Exception as exc:
            raise ConfigError(
                f"detector '{spec.name}': could not load the weights in {folder} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "are they the original files?"
            ) from exc
    if not _looks_like_hub_id(source):
        raise ConfigError(
            f"detector '{spec.name}': annotator path {source} is not a folder "
            f"(and not a hub id like {spec.default_repo}); " + weights_help(spec)
        )
    try:
        with _weights_only_loading():
            return cls.from_pretrained(source, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(
            f"detector '{spec.name}' needs weights: looked for {', '.join(_hub_files(spec))} in "
            f"the Hugging Face hub repo '{source}' and its local cache{offline} and could not "
            f"load them ({type(exc).__name__}: {first}); " + weights_help(spec)
        ) from exc


def build_detector(
    name: str,
    params: dict[str, Any],
    annotator_path: str | None = None,
    device: str | None = None,
) -> Detector:
    """A ready detector for resolved `params` (see registry.resolve_params); weight-based ones
    are moved to `device` (default: CUDA when available)."""
    spec = get_spec(name)
    if spec.aux_module is None:
        return CannyEdges(params)
    cls = aux_class(spec.name, spec.aux_module, spec.aux_class, spec.requires)
    if not spec.needs_weights:
        return AuxDetector(spec, params, cls())
    model = _load_pretrained(spec, cls, annotator_path)
    if hasattr(model, "to"):
        model = model.to(resolve_device(device)) or model
    return AuxDetector(spec, params, model)
