"""Aspect-ratio buckets: the size an image trains at, and how it is resized and cropped to it.

docs/design.md §4.1. A `BucketSpec` holds one backend's settings, under SimpleTuner's key names
(`resolution_type`, `crop`, `crop_style`, `crop_aspect`, `minimum_image_size`, ...);
`place(spec, size, key)` turns an image's upright (width, height) into a `Placement`: the bucket
(the trained width x height, multiples of the family's size step), the size the image is resized
to (covering the bucket), and the crop box inside it. Nothing here opens an image: `--plan`
reads only file headers. The same placement serves the training image and its conditioning
image, so both get the same resize and crop.

Units of `resolution`, `minimum_image_size`, `maximum_image_size`, `target_downsample_size`:
`pixel` measures an image by its shorter edge, `pixel_area` by the side of the square of its
area (sqrt(w * h)), `area` by its area in megapixels (1.0 = 1,000,000 pixels).

The default spec (no bucket key set anywhere) is slider-cn's square centre crop: shorter side to
`resolution`, the central square.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

ResolutionType = Literal["pixel", "area", "pixel_area"]
CropStyle = Literal["center", "centre", "random", "corner"]
CropAspect = Literal["square", "preserve", "closest", "random"]
MEGAPIXEL = 1_000_000

# The keys of a spec, as a config (training or dataloader) names them.
BUCKET_KEYS = (
    "resolution_type",
    "crop",
    "crop_style",
    "crop_aspect",
    "crop_aspect_buckets",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "minimum_aspect_ratio",
    "maximum_aspect_ratio",
    "aspect_bucket_rounding",
)


@dataclass(frozen=True)
class Placement:
    """Where one image trains: its bucket and the resize and crop that produce it."""

    source: tuple[int, int]  # upright (width, height) of the file
    resized: tuple[int, int]  # (width, height) it is resized to
    left: int  # crop box origin in the resized image
    top: int
    bucket: tuple[int, int]  # (width, height) trained: the crop box's size

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the resized image."""
        return (self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1])

    def describe(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}"


@dataclass(frozen=True)
class BucketSpec:
    """One backend's bucket settings (see the module docstring)."""

    resolution: float
    resolution_type: ResolutionType = "pixel"
    crop: bool = True
    crop_style: CropStyle = "center"
    crop_aspect: CropAspect = "square"
    crop_aspect_buckets: tuple[float, ...] = ()
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    aspect_bucket_rounding: int = 2
    multiple: int = 8  # buckets are multiples of this (the family's VAE x patch factor)
    seed: int = 0  # random crops and random crop aspects are drawn per image from it

    # --- what an image measures in the spec's units ------------------------------------
    def measure(self, width: float, height: float) -> float:
        if self.resolution_type == "pixel":
            return min(width, height)
        if self.resolution_type == "pixel_area":
            return math.sqrt(width * height)
        return width * height / MEGAPIXEL

    def _scale_to(self, width: float, height: float, size: float) -> float:
        """The factor that brings an image of (width, height) to measure ``size``."""
        if self.resolution_type == "area":
            return math.sqrt(size * MEGAPIXEL / (width * height))
        return size / self.measure(width, height)

    @property
    def is_square(self) -> bool:
        """Every image gets the same square bucket (known without reading any image)."""
        return self.crop and self.crop_aspect == "square"

    @property
    def reads_sizes(self) -> bool:
        """Whether building the backend must read image sizes (buckets or size filters)."""
        return not self.is_square or any(
            v is not None
            for v in (self.minimum_image_size, self.minimum_aspect_ratio, self.maximum_aspect_ratio)
        )

    def _round(self, value: float) -> int:
        return max(self.multiple, int(round(value / self.multiple)) * self.multiple)

    def square_side(self) -> int:
        if self.resolution_type == "area":
            return self._round(math.sqrt(self.resolution * MEGAPIXEL))
        return self._round(self.resolution)

    # --- filters -------------------------------------------------------------------------
    def exclusion(self, size: tuple[int, int]) -> str | None:
        """Why an image of this size is left out, or None to keep it."""
        width, height = size
        if self.minimum_image_size is not None:
            if self.measure(width, height) < self.minimum_image_size:
                return "below minimum_image_size"
        aspect = width / height
        if self.minimum_aspect_ratio is not None and aspect < self.minimum_aspect_ratio:
            return "below minimum_aspect_ratio"
        if self.maximum_aspect_ratio is not None and aspect > self.maximum_aspect_ratio:
            return "above maximum_aspect_ratio"
        return None

    # --- the bucket ----------------------------------------------------------------------
    def _aspect(self, width: int, height: int, key: str) -> float:
        natural = width / height
        if not self.crop or self.crop_aspect == "preserve" or not self.crop_aspect_buckets:
            return round(natural, self.aspect_bucket_rounding) or natural
        if self.crop_aspect == "closest":
            return min(self.crop_aspect_buckets, key=lambda a: abs(math.log(a / natural)))
        rng = _rng(self.seed, key, 1)  # crop_aspect "random": one draw per image, kept
        return float(self.crop_aspect_buckets[int(rng.integers(len(self.crop_aspect_buckets)))])

    def bucket(self, size: tuple[int, int], key: str = "") -> tuple[int, int]:
        """(width, height) an image of ``size`` trains at."""
        if self.is_square:
            side = self.square_side()
            return side, side
        aspect = self._aspect(*size, key)
        if self.resolution_type == "pixel":
            short = self.resolution
            width, height = (short * aspect, short) if aspect >= 1 else (short, short / aspect)
        else:
            area = (
                self.resolution * MEGAPIXEL
                if self.resolution_type == "area"
                else self.resolution**2
            )
            width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
        return self._round(width), self._round(height)


def place(spec: BucketSpec, size: tuple[int, int], key: str = "") -> Placement:
    """The bucket, resize and crop of an image of upright ``size`` (see the module docstring).

    The image is resized to cover its bucket, keeping its aspect ratio, and cropped to it. With
    `crop` and both `maximum_image_size` and `target_downsample_size` set, an image larger than
    the maximum is first brought to `target_downsample_size` and cropped from that size, as
    SimpleTuner does (more of the picture stays out of the crop the smaller that size is).
    """
    width, height = size
    bucket_w, bucket_h = spec.bucket(size, key)
    scale = max(bucket_w / width, bucket_h / height)  # the smallest size that covers the bucket
    if (
        spec.crop
        and spec.maximum_image_size is not None
        and spec.target_downsample_size is not None
        and spec.measure(width, height) > spec.maximum_image_size
    ):
        scale = max(scale, spec._scale_to(width, height, spec.target_downsample_size))
    resized_w = max(bucket_w, int(round(width * scale)))
    resized_h = max(bucket_h, int(round(height * scale)))
    spare_w, spare_h = resized_w - bucket_w, resized_h - bucket_h
    style = spec.crop_style if spec.crop else "center"
    if style == "corner":
        left, top = 0, 0
    elif style == "random":
        rng = _rng(spec.seed, key, 0)
        left, top = int(rng.integers(spare_w + 1)), int(rng.integers(spare_h + 1))
    else:
        left, top = spare_w // 2, spare_h // 2
    return Placement((width, height), (resized_w, resized_h), left, top, (bucket_w, bucket_h))


def square_crop(size: tuple[int, int], resolution: int) -> Placement:
    """slider-cn's default without bucket keys, exactly as before buckets existed (torchvision's
    `resize(image, R)` then `center_crop(R)`): the longer side is cut down to a whole pixel and
    the crop offset is rounded, so caches and runs of old configs see the same pixels."""
    width, height = size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    resized = (resolution, new_long) if width <= height else (new_long, resolution)
    left = int(round((resized[0] - resolution) / 2.0))
    top = int(round((resized[1] - resolution) / 2.0))
    return Placement((width, height), resized, left, top, (resolution, resolution))


def _rng(seed: int, key: str, stream: int) -> np.random.Generator:
    # per image, stable across runs and processes, independent of dataset order
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), stream])
