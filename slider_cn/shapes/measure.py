"""Measure a shapes-world picture: the shape's mask, colour, size, position and class.

Works on rendered pictures (exactly, up to edge antialiasing) and on a model's samples: the
background is read from the picture's border, the shape is the largest connected region that
differs from it, and the colour is averaged over the region's core (its blended rim left out).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import cv2
import numpy as np
from PIL import Image

from slider_cn.shapes.world import colour_name, warmth

# A pixel belongs to the shape when some channel differs from the background by more than this.
MASK_THRESHOLD = 0.15
# Fill ratio (area / bounding-box area): triangle 0.5, circle 0.785, square 1.
_CLASS_BOUNDS = ((0.64, "triangle"), (0.90, "circle"), (math.inf, "square"))


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What a picture shows. With no shape found, ``found`` is False and the numbers are NaN."""

    found: bool
    hue: float  # degrees
    saturation: float
    value: float  # brightness of the shape's colour, 0..1
    warmth: float  # cos(hue - 30 deg): +1 orange, -1 azure
    area: float  # fraction of the picture
    cx: float  # centroid, fractions of the side
    cy: float
    fill: float  # area / bounding-box area
    shape: str
    colour: str

    def as_dict(self) -> dict[str, float | str | bool]:
        return dataclasses.asdict(self)


NUMERIC = ("hue", "saturation", "value", "warmth", "area", "cx", "cy", "fill")

_NOTHING = Measurement(False, *(math.nan,) * 8, shape="none", colour="none")


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def _background(rgb: np.ndarray) -> np.ndarray:
    """The background colour: the median of the picture's one-pixel border."""
    return np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)


def shape_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean HxW mask of the largest region that differs from the background."""
    rgb = _as_rgb(image)
    return _mask(rgb, _background(rgb))


def _mask(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    differs = (np.abs(rgb - background).max(axis=-1) > MASK_THRESHOLD).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(differs, connectivity=4)
    if count <= 1:
        return np.zeros(differs.shape, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def measure(image: Image.Image | np.ndarray) -> Measurement:
    """The attributes of the shape in ``image`` (PIL or HxWx3 array, uint8 or 0..1 floats)."""
    return measure_with_mask(image)[0]


def measure_with_mask(image: Image.Image | np.ndarray) -> tuple[Measurement, np.ndarray]:
    """`measure` and `shape_mask` in one pass."""
    rgb = _as_rgb(image)
    background = _background(rgb)
    mask = _mask(rgb, background)
    area = int(mask.sum())
    if area == 0:
        return _NOTHING, mask
    # the core: the mask less its one-pixel rim, where the shape blends with the background
    core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    pixels = rgb[core] if core.sum() >= 4 else rgb[mask]
    colour = pixels.mean(axis=0)
    r, g, b = (float(v) for v in colour.clip(0.0, 1.0))
    hue, saturation, value = colorsys.rgb_to_hsv(r, g, b)
    hue *= 360.0
    # soft coverage: each rim pixel counts by how far it sits from the background toward the
    # shape's colour, so a box-filtered edge gives the exact area
    contrast = colour - background
    near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    alpha = ((rgb[near] - background) @ contrast / max(float(contrast @ contrast), 1e-6)).clip(0, 1)
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = area / box
    shape = next(name for bound, name in _CLASS_BOUNDS if fill < bound)
    measurement = Measurement(
        found=True,
        hue=hue,
        saturation=saturation,
        value=value,
        warmth=warmth(hue),
        area=float(alpha.sum()) / (height * width),
        cx=(xs.mean() + 0.5) / width,
        cy=(ys.mean() + 0.5) / height,
        fill=fill,
        shape=shape,
        colour=colour_name(hue),
    )
    return measurement, mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
