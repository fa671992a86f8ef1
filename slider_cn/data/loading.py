"""Turning a batch plan into tensors.

`load_batch(plan)` returns a `Batch`:

- ``pixels``: float32 (B, 3, H, W) in [-1, 1], (W, H) the micro-batch's bucket: each image
  (EXIF orientation applied, RGB) resized to cover its bucket (bicubic, antialiased) and
  cropped to it, by its `Placement` (slider_cn/data/buckets.py; by default the shorter side to
  the backend's resolution and the central square). ``None`` with ``pixels=False`` (the
  latent cache loads the pixels of cache misses itself).
- ``conditioning_pixels``: float32 (B, 3, H, W) in [0, 1], the paired conditioning images
  under the same placement (a conditioning image of another size is resized straight to the
  size its training image is resized to, bilinear, and the same box is cropped), or ``None``
  when the backend has no conditioning.
- ``captions``, ``placements``, and the plan's ``backend``, ``slider_strength`` and ``sign``.

An unreadable or corrupt image is a ConfigError naming the file.

`decode_all(backends)` decodes every training and conditioning image once, in parallel (the
dry run's check).

`prefetch_batches(plans)` yields ``(plan, load_batch(plan))`` with the next plan's files read
in a background thread while the caller trains on the current one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from slider_cn.data.backends import Sample
from slider_cn.data.buckets import Placement, place, square_crop
from slider_cn.data.sampler import BatchPlan
from slider_cn.errors import ConfigError
from slider_cn.image_files import open_rgb


def load_image(path: Path) -> Image.Image:
    """An RGB image, upright by its EXIF orientation; any read failure names the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return decode_image(path)


def decode_image(path: Path) -> Image.Image:
    """`load_image` without touching the warning filters (they are process-wide, not
    thread-safe): callers that decode on several threads set the filter once around them."""
    try:
        return open_rgb(path)
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header without decoding."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            # EXIF orientations 5-8 rotate by 90 degrees.
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    return width, height


def resize_and_crop(
    image: Image.Image,
    placement: Placement,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
) -> Image.Image:
    """Resize to the placement's size, then crop its bucket (slider_cn/data/buckets.py)."""
    width, height = placement.resized
    if image.size != (width, height):
        image = TF.resize(image, [height, width], interpolation=interpolation, antialias=True)
    return image.crop(placement.box)


def square_placement(path: Path, resolution: int, key: str = "") -> Placement:
    """The default placement: shorter side to ``resolution``, the central square."""
    return square_crop(upright_size(path), resolution)


def sample_placement(sample: Sample, plan: BatchPlan) -> Placement:
    """Where a training image of ``plan`` trains (placed now under the default square crop)."""
    if sample.placement is not None:
        return sample.placement
    if plan.spec is None:
        return square_crop(upright_size(sample.path), plan.resolution)
    return place(plan.spec, upright_size(sample.path), sample.key)


def image_pixels(path: Path, where: Placement | int) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]; ``where`` a placement or a square resolution."""
    placement = where if isinstance(where, Placement) else square_placement(path, where)
    return TF.to_tensor(resize_and_crop(load_image(path), placement)) * 2.0 - 1.0


def conditioning_pixels(
    path: Path, image_path: Path | None, where: Placement | int
) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] under its training image's placement: resized to the size
    the training image is resized to (whatever its own size), then the same box is cropped.
    A text slider's conditioning image has no training image: it is placed as it is."""
    if isinstance(where, Placement):
        placement = where
    else:
        placement = square_placement(image_path if image_path is not None else path, where)
    conditioning = load_image(path)
    return TF.to_tensor(resize_and_crop(conditioning, placement, InterpolationMode.BILINEAR))


@dataclass
class Batch:
    """A loaded micro-batch (see the module docstring)."""

    plan: BatchPlan
    pixels: torch.Tensor | None
    conditioning_pixels: torch.Tensor | None
    captions: list[str]
    # each training image's placement (None for a text slider's micro-batch)
    placements: list[Placement] | None = None

    def geometry(self) -> torch.Tensor | None:
        """(B, 6): original height and width, crop top and left, target height and width —
        SDXL's micro-conditioning, as its training scripts compute it."""
        if self.placements is None:
            return None
        return torch.tensor(
            [
                [p.source[1], p.source[0], p.top, p.left, p.bucket[1], p.bucket[0]]
                for p in self.placements
            ],
            dtype=torch.float32,
        )

    @property
    def backend(self) -> str:
        return self.plan.backend

    @property
    def slider_strength(self) -> float:
        return self.plan.slider_strength

    @property
    def sign(self) -> str:
        return self.plan.sign

    @property
    def files(self) -> list[str]:
        return self.plan.files


def load_batch(plan: BatchPlan, *, pixels: bool = True, conditioning: bool = True) -> Batch:
    """Load a plan's images (``pixels``) and conditioning images (``conditioning``)."""
    samples = plan.samples
    # a text slider's micro-batch has no training images: its x_t is generated
    placements = None if plan.prompt is not None else [sample_placement(s, plan) for s in samples]
    pixels = pixels and placements is not None
    image_tensor = (
        torch.stack([image_pixels(s.path, p) for s, p in zip(samples, placements, strict=True)])
        if pixels
        else None
    )
    cond_tensor = None
    paired = [s.conditioning is not None for s in samples]
    if conditioning and any(paired):
        if not all(paired):
            missing = [str(s.path or s.key) for s in samples if s.conditioning is None]
            raise ConfigError(
                f"backend '{plan.backend}': no conditioning image for {', '.join(missing)}"
            )
        where = placements or [plan.resolution] * len(samples)
        cond_tensor = torch.stack(
            [
                conditioning_pixels(s.conditioning, s.path, p)
                for s, p in zip(samples, where, strict=True)
            ]
        )
    return Batch(plan, image_tensor, cond_tensor, [s.caption for s in samples], placements)


def prefetch_batches(
    plans: Iterable[BatchPlan], *, pixels: bool = True, conditioning: bool = True
) -> Iterator[tuple[BatchPlan, Batch]]:
    """``(plan, load_batch(plan))`` for each plan, the next one read while this one trains.

    Image decoding releases the GIL, so one thread hides it behind the training step: on a GPU
    the step's last sync (``loss.item()``) would otherwise leave the device idle while the next
    conditioning images are decoded (about 20 ms per 512 px PNG). The batches and any error
    (a ConfigError naming an unreadable file) come out in plan order, exactly as
    `load_batch` would give them. ``plans`` is drawn one ahead: a stateful sampler is then one
    plan further on, so take resume positions from the plan (``state_dict(after=plan)``).
    """
    plans = iter(plans)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slider-cn-load")

    def submit(plan: BatchPlan):
        return pool.submit(load_batch, plan, pixels=pixels, conditioning=conditioning)

    try:
        plan = next(plans, None)
        future = submit(plan) if plan is not None else None
        while plan is not None:
            batch = future.result()
            following = next(plans, None)
            if following is not None:
                future = submit(following)
            yield plan, batch
            plan = following
    finally:
        # Also on an early break or an error: drop what was not started, wait for the rest.
        pool.shutdown(wait=True, cancel_futures=True)


def decode_all(backends: Iterable, *, progress: bool = True, workers: int = 8) -> None:
    """Decode every training and conditioning image once, in parallel; all unreadable files
    are one ConfigError (the dry run's promise: exit 0 means no image will stop the run)."""
    from slider_cn.data.backends import MAX_LISTED

    files = sorted(
        {
            str(path)
            for backend in backends
            for sample in backend.samples
            for path in (sample.path, sample.conditioning)
            if path is not None
        }
    )

    def check(path: str) -> str | None:
        try:
            decode_image(Path(path))
        except ConfigError as exc:
            return str(exc)
        return None

    # the warning filter is set once around the threads (catch_warnings is not thread-safe)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        results = list(
            tqdm(pool.map(check, files), total=len(files), desc="decode", disable=not progress)
        )
    bad = [message for message in results if message is not None]
    if bad:
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise ConfigError(
            f"{len(bad)} of {len(files)} images cannot be read{more}:\n"
            + "\n".join(bad[:MAX_LISTED])
        )
