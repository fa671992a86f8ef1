"""Which files are images and what pixels they hold: one rule for training and preprocessing.

Training (slider_cn/data) and the conditioning runner (conditioning/) list and decode images
through this module, so a transparent PNG or a 16-bit image gives the same pixels to the
detector that made its conditioning image and to the VAE that encodes it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Files with these extensions are images; anything else (captions, JSON) is ignored. A file
# Pillow cannot decode (e.g. .jxl without a plugin) is reported by name when it is read.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jxl", ".avif"}
)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def scan_images(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted by relative path), skipping hidden
    entries and the folders in ``exclude`` (e.g. other backends' folders nested inside)."""
    folder = Path(folder)
    excluded = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        found.extend(here / name for name in filenames if is_image_file(name))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def open_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB, upright by its EXIF orientation; transparency composited on
    white (as controlnet-aux's HWC3 does) and 16-bit grey reduced to its high byte.

    Raises what Pillow raises (OSError, ValueError, SyntaxError, DecompressionBombError);
    callers word the error for their command.
    """
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode in _SIXTEEN_BIT:
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        rgb = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")
