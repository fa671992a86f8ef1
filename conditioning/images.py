"""Finding, reading, sizing and writing images for the batch runner."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from slider_cn.image_files import open_rgb, scan_images


class ImageReadError(Exception):
    """A file with an image extension that cannot be decoded."""


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under `root`, recursively, sorted; hidden entries
    (names starting with '.') are skipped (the same files training lists)."""
    return [path.relative_to(root).as_posix() for path in scan_images(root)]


def output_name(rel: str) -> str:
    """The output's relative path: the source's, as PNG."""
    return Path(rel).with_suffix(".png").as_posix()


def load_rgb(path: Path) -> np.ndarray:
    """The image as an HxWx3 uint8 RGB array, with the pixels training sees for the same file
    (slider_cn.image_files.open_rgb: EXIF orientation, transparency on white, 16-bit to 8)."""
    try:
        return np.asarray(open_rgb(path))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"not a readable image ({exc})") from exc


def target_size(width: int, height: int, resolution: int | None) -> tuple[int, int]:
    """Output (width, height): the source size, or the shorter side scaled to `resolution`
    keeping the aspect ratio."""
    if resolution is None:
        return width, height
    scale = resolution / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(image: np.ndarray, size: tuple[int, int], *, upscale=cv2.INTER_LANCZOS4) -> np.ndarray:
    """Resize to (width, height); area averaging when shrinking (as controlnet-aux does)."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    interpolation = cv2.INTER_AREA if size[0] * size[1] < w * h else upscale
    return cv2.resize(image, size, interpolation=interpolation)


def to_map(image: np.ndarray, gray: bool) -> np.ndarray:
    """A detector's output as uint8: HxW when `gray` (its first channel), else HxWx3."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = image.clip(0, 255).astype(np.uint8)
    if gray:
        return np.ascontiguousarray(image if image.ndim == 2 else image[:, :, 0])
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an 8-bit PNG, grayscale (HxW) or RGB (HxWx3), atomically (a temporary file renamed
    into place), so an interrupted run never leaves a truncated image that a rerun would trust."""
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(encoded.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
