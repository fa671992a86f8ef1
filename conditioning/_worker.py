"""Making one output file, shared by the runner's own process and its helper processes.

Imports stay lean on purpose: a helper process for canny starts with numpy, OpenCV and Pillow
only, so a pool costs little to start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conditioning.images import ImageReadError, load_rgb, output_name, save_png, target_size

_state: dict[str, Any] = {}


def process_file(
    detector: Any, input_dir: Path, output_dir: Path, rel: str, resolution: int | None
) -> str | None:
    """Make one output; returns an error message, or None on success."""
    try:
        rgb = load_rgb(input_dir / rel)
    except ImageReadError as exc:
        return str(exc)
    height, width = rgb.shape[:2]
    size = target_size(width, height, resolution)
    try:
        out = detector(rgb, size, rel)
    except Exception as exc:  # one bad image must not stop the batch
        return f"detector failed ({type(exc).__name__}: {exc})"
    try:
        save_png(out, output_dir / output_name(rel))
    except OSError as exc:
        return f"could not write the output ({exc})"
    return None


def init(
    native: bool,
    name: str,
    params: dict[str, Any],
    annotator_path: str | None,
    device: str | None,
    input_dir: Path,
    output_dir: Path,
    resolution: int | None,
) -> None:
    """Helper-process initializer: build the detector once."""
    import cv2

    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would oversubscribe
    _state.update(input_dir=input_dir, output_dir=output_dir, resolution=resolution)
    try:
        if native:
            from conditioning.canny import CannyEdges

            _state["detector"] = CannyEdges(params)
        else:
            from conditioning.detectors import build_detector

            _state["detector"] = build_detector(name, params, annotator_path, device)
    except Exception as exc:  # reported per file rather than breaking the pool
        _state["error"] = f"helper process could not start: {exc}"


def ping() -> bool:
    """A no-op task: its completion tells the runner this helper is up."""
    return True


def work_chunk(rels: list[str]) -> list[tuple[str, str | None]]:
    if "error" in _state:
        return [(rel, _state["error"]) for rel in rels]
    results = []
    for rel in rels:
        try:
            error = process_file(
                _state["detector"],
                _state["input_dir"],
                _state["output_dir"],
                rel,
                _state["resolution"],
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        results.append((rel, error))
    return results
