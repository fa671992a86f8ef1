"""Aspect-ratio buckets (slider_cn/data/buckets.py, docs/design.md §4.1): the bucket maths in
SimpleTuner's units, micro-batches of one bucket, an image and its conditioning image under
the same crop (on pixels), the latent cache keyed by placement, SDXL's micro-conditioning with
the real sizes, `--plan` naming each line's bucket, and exact resume mid-epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slider_cn.config import ConfigError, load_config
from slider_cn.data.backends import build_backends
from slider_cn.data.buckets import BucketSpec, place
from slider_cn.data.loading import load_batch
from slider_cn.data.sampler import SliderSampler

SIZES = {"wide": (96, 64), "tall": (64, 96), "square": (80, 80)}


def pattern(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth picture whose every region differs (so a shifted crop is visible)."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    phase = seed * 0.7
    rgb = np.stack(
        [np.sin(6 * x + phase) * 0.5 + 0.5, np.cos(5 * y + phase) * 0.5 + 0.5, x * y], axis=-1
    )
    return Image.fromarray((rgb * 255).astype(np.uint8))


def write_data(root: Path, per_shape: int = 2, conditioning: bool = False) -> dict[str, Path]:
    """plus/ and minus/ with images of three aspect ratios (and their conditioning images at
    twice the size, when asked)."""
    for group in ("plus", "minus"):
        for shape, size in SIZES.items():
            for i in range(per_shape):
                name = f"{group}_{shape}_{i}.png"
                seed = hash((group, shape, i)) % 100
                (root / group).mkdir(parents=True, exist_ok=True)
                pattern(size, seed).save(root / group / name)
                if conditioning:
                    (root / f"{group}_cond").mkdir(parents=True, exist_ok=True)
                    big = (size[0] * 2, size[1] * 2)
                    pattern(big, seed).save(root / f"{group}_cond" / name)
    return {"plus": root / "plus", "minus": root / "minus"}


def write_config(root: Path, *, conditioning: bool = False, backend_keys=None, **config) -> Path:
    backends = []
    for group, strength in (("plus", 1.0), ("minus", -1.0)):
        entry = {"id": group, "instance_data_dir": group, "slider_strength": strength}
        if conditioning:
            entry["conditioning_data"] = f"{group}_cond"
            backends.append(
                {
                    "id": f"{group}_cond",
                    "instance_data_dir": f"{group}_cond",
                    "dataset_type": "conditioning",
                }
            )
        backends.append({**entry, **(backend_keys or {})})
    (root / "dataloader.json").write_text(json.dumps(backends))
    values = {
        "model_family": "sd1x",
        "pretrained_model_name_or_path": "tiny",
        "data_backend_config": "dataloader.json",
        "output_dir": "out",
        "resolution": 64,
        **config,
    }
    (root / "config.json").write_text(json.dumps(values))
    return root / "config.json"


# --- the maths ---------------------------------------------------------------------------------
def test_bucket_sizes_follow_simpletuner_units():
    wide = (1500, 1000)
    # pixel: the shorter edge is the resolution
    assert BucketSpec(512, "pixel", crop=False).bucket(wide) == (768, 512)
    # pixel_area: the area of a square of that side; area: megapixels
    w, h = BucketSpec(512, "pixel_area", crop=False).bucket(wide)
    assert abs(w * h - 512**2) / 512**2 < 0.05 and abs(w / h - 1.5) < 0.05
    w, h = BucketSpec(0.25, "area", crop=False).bucket(wide)
    assert abs(w * h - 250_000) / 250_000 < 0.05
    # multiples of the family's step; a square crop ignores the aspect
    assert all(
        v % 16 == 0 for v in BucketSpec(500, "pixel_area", crop=False, multiple=16).bucket(wide)
    )
    assert BucketSpec(512, "pixel_area", crop=True, crop_aspect="square").bucket(wide) == (512, 512)
    # closest: the listed aspect nearest the image's
    spec = BucketSpec(
        512, "pixel", crop=True, crop_aspect="closest", crop_aspect_buckets=(1.0, 1.33)
    )
    assert spec.bucket(wide) == (680, 512)


def test_crop_styles_and_the_downsample_keys():
    spec = BucketSpec(64, "pixel", crop=True, crop_aspect="square", crop_style="center")
    centre = place(spec, (200, 100))
    assert centre.resized == (128, 64) and (centre.left, centre.top) == (32, 0)
    corner = place(BucketSpec(64, "pixel", crop=True, crop_style="corner"), (200, 100))
    assert (corner.left, corner.top) == (0, 0)
    random = BucketSpec(64, "pixel", crop=True, crop_style="random", seed=3)
    lefts = {place(random, (200, 100), f"img{i}").left for i in range(20)}
    assert len(lefts) > 5 and all(0 <= v <= 64 for v in lefts)
    assert place(random, (200, 100), "a") == place(random, (200, 100), "a")  # kept per image
    # crop=false keeps the whole picture but the rounding
    whole = place(BucketSpec(64, "pixel", crop=False), (200, 100))
    assert whole.bucket == (128, 64) and whole.resized == (128, 64)
    # larger than maximum_image_size: brought to target_downsample_size, cropped from there
    zoomed = place(
        BucketSpec(64, "pixel", crop=True, maximum_image_size=128, target_downsample_size=96),
        (400, 200),
    )
    assert zoomed.resized == (192, 96) and zoomed.bucket == (64, 64)
    assert BucketSpec(64, "pixel", minimum_image_size=100).exclusion((300, 90)) is not None
    assert BucketSpec(64, "pixel", minimum_image_size=100).exclusion((300, 120)) is None


# --- batches -----------------------------------------------------------------------------------
def test_three_aspect_ratios_give_three_buckets_and_no_micro_batch_mixes_them(tmp_path):
    write_data(tmp_path, per_shape=2)
    config = load_config(
        write_config(tmp_path, resolution_type="pixel_area", crop=False, train_batch_size=2)
    )
    backends = build_backends(config)
    sampler = SliderSampler(backends, batch_size=2, seed=0)
    buckets = set()
    plans = list(sampler)
    assert len(plans) == 6  # 2 groups x 3 buckets x (2 images / batch of 2)
    for plan in plans:
        inside = {s.placement.bucket for s in plan.samples}
        assert len(inside) == 1
        batch = load_batch(plan)
        width, height = plan.bucket
        assert batch.pixels.shape == (2, 3, height, width)
        buckets.add(plan.bucket)
    assert len(buckets) == 3
    assert {w > h for w, h in buckets} == {True, False}
    # the same config without bucket keys: one square bucket, as before
    square = load_config(write_config(tmp_path, train_batch_size=2))
    plans = list(SliderSampler(build_backends(square), batch_size=2, seed=0))
    assert {p.bucket for p in plans} == {(64, 64)}


def test_a_bucket_too_small_for_a_batch_is_left_out_and_an_all_too_small_backend_is_an_error(
    tmp_path,
):
    write_data(tmp_path, per_shape=1)
    config = load_config(write_config(tmp_path, resolution_type="pixel_area", crop=False))
    with pytest.raises(ConfigError, match="largest of its 3 buckets 1 images"):
        SliderSampler(build_backends(config), batch_size=2, seed=0)


def test_an_image_and_its_conditioning_image_get_the_same_crop_box(tmp_path):
    write_data(tmp_path, per_shape=2, conditioning=True)
    config = load_config(
        write_config(
            tmp_path,
            conditioning=True,
            resolution_type="pixel",
            crop=True,
            crop_aspect="square",
            crop_style="random",
            resolution=48,
        )
    )
    backends = build_backends(config)
    checked = 0
    for plan in SliderSampler(backends, batch_size=1, seed=0):
        batch = load_batch(plan)
        image = (batch.pixels[0] + 1) / 2
        cond = batch.conditioning_pixels[0]
        placement = batch.placements[0]
        assert cond.shape == image.shape
        # the conditioning image is the same picture at twice the size: under the same box
        # it matches; a box moved by a few pixels would not
        assert (cond - image).abs().mean() < 0.02
        spare = placement.resized[0] - placement.bucket[0] or placement.resized[1] - 48
        if spare >= 8:
            shifted = torch.roll(image, shifts=4, dims=-1 if placement.resized[0] > 48 else -2)
            assert (cond - shifted).abs().mean() > 0.02
        checked += 1
    assert checked == 12


def test_latent_cache_keys_the_placement(tmp_path):
    from slider_cn.data.cache import EncodedCache
    from slider_cn.families import get_family

    write_data(tmp_path, per_shape=1)
    config = load_config(write_config(tmp_path))
    family = get_family(config)
    cache = EncodedCache(tmp_path / "cache", family, family.load_components())
    path = tmp_path / "plus" / "plus_wide_0.png"
    square = place(BucketSpec(64), (96, 64))
    wide = place(BucketSpec(64, "pixel", crop=False), (96, 64))
    moved = place(BucketSpec(64, crop_style="corner"), (96, 64))
    keys = {cache.latent_key(path, p) for p in (square, wide, moved)}
    assert len(keys) == 3
    assert cache.latent_key(path, square) == cache.latent_key(path, place(BucketSpec(64), (96, 64)))


# --- training ----------------------------------------------------------------------------------
def test_plan_names_each_lines_bucket(tmp_path, capsys):
    from slider_cn.cli import main

    write_data(tmp_path, per_shape=1)
    path = write_config(tmp_path, resolution_type="pixel_area", crop=False)
    assert main(["train", "--config", str(path), "--dry-run", "--plan", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"step"' in line]
    assert len(lines) == 6
    assert {line["bucket"] for line in lines} == {"80x56", "56x80", "64x64"}


def test_sdxl_micro_conditioning_gets_each_images_size_and_crop(tmp_path):
    from slider_cn.train import train

    write_data(tmp_path, per_shape=1)
    config = load_config(
        write_config(
            tmp_path,
            model_family="sdxl",
            resolution_type="pixel",
            resolution=48,
            crop=True,
            crop_aspect="square",
            crop_style="corner",
            max_train_steps=2,
        )
    )
    seen: list[torch.Tensor] = []
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())
        return original(self, *args, **kwargs)

    UNet2DConditionModel.forward = spy
    try:
        result = train(config)
    finally:
        UNet2DConditionModel.forward = original
    lines = [json.loads(line) for line in (Path(result.output_dir) / "train_log.jsonl").open()]
    sizes = {f"{g}_{s}_0.png": SIZES[s] for g in ("plus", "minus") for s in SIZES}
    expected = {
        tuple(float(v) for v in (h, w, 0, 0, 48, 48))
        for line in lines
        for w, h in [sizes[Path(line["files"][0]).name]]
    }
    got = {tuple(row.tolist()) for ids in seen for row in ids.float()}
    assert expected <= got  # each trained image's own original size, crop origin and target
    assert all(row[0] != 48 or row[1] != 48 for row in expected)  # not the constant default


def test_resume_mid_epoch_with_buckets_gives_the_uninterrupted_losses(tmp_path):
    from slider_cn.train import train

    def run(folder: Path, steps: int, resume: bool = False) -> list[float]:
        if not resume:
            write_data(folder, per_shape=2)
        values = {
            "max_train_steps": str(steps),
            "checkpointing_steps": "2",
            "learning_rate": "1e-2",
        }
        if resume:
            values["resume_from_checkpoint"] = "latest"
        config = load_config(
            write_config(folder, resolution_type="pixel_area", crop=False, resolution=48), values
        )
        train(config)
        log = Path(config.output_dir) / "train_log.jsonl"
        return [json.loads(line)["loss"] for line in log.open()]

    full = run(tmp_path / "full", 5)
    run(tmp_path / "part", 3)
    resumed = run(tmp_path / "part", 5, resume=True)
    assert len(full) == 5
    assert resumed == pytest.approx(full, rel=1e-5, abs=1e-7)


def test_without_bucket_keys_the_pixels_are_the_old_square_centre_crop():
    """torchvision's resize-then-centre-crop, as slider-cn trained before buckets existed."""
    from torchvision.transforms import functional as TF

    from slider_cn.data.buckets import square_crop
    from slider_cn.data.loading import resize_and_crop

    rng = np.random.default_rng(0)
    for w, h, r in [(4000, 3000, 512), (1000, 1501, 512), (97, 64, 64), (64, 97, 48)]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        old = TF.center_crop(
            TF.resize(image, r, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [r, r]
        )
        assert np.array_equal(
            np.array(resize_and_crop(image, square_crop((w, h), r))), np.array(old)
        )


def test_sizes_keep_the_unit_of_the_config_they_come_from(tmp_path):
    from slider_cn.data.backends import bucket_spec
    from slider_cn.data.config import BackendConfig

    write_data(tmp_path, per_shape=1)
    config = load_config(write_config(tmp_path, resolution_type="area", resolution=0.004))
    assert config.resolution_type == "pixel_area" and config.resolution == 64
    # a backend in megapixels under the training config's area: read as megapixels
    spec = bucket_spec(BackendConfig(id="b", instance_data_dir=".", resolution=0.0025), config)
    assert spec.resolution == pytest.approx(50.0)
    # a backend in area with its own minimum: the inherited resolution becomes megapixels
    own = BackendConfig(
        id="c", instance_data_dir=".", resolution_type="area", minimum_image_size=0.003
    )
    spec = bucket_spec(own, config)
    assert spec.resolution == pytest.approx(0.004096) and spec.minimum_image_size == 0.003
    assert spec.exclusion((40, 40)) is not None and spec.exclusion((64, 64)) is None
    # no bucket keys: a resolution below 8 pixels is a mistake, not an 8 px square
    plain = load_config(write_config(tmp_path))
    with pytest.raises(ConfigError, match="megapixel count"):
        bucket_spec(BackendConfig(id="d", instance_data_dir=".", resolution=1.0), plain)
