"""The shapes world and its measuring function."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from slider_cn.shapes.measure import mask_iou, measure, shape_mask
from slider_cn.shapes.world import (
    COLOURS,
    ShapeSpec,
    colour_name,
    hue_distance,
    render,
    sample_spec,
    warmth,
    with_hue,
)


def specs(count: int, seed: int = 0) -> list[ShapeSpec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(count)]


def test_generator_is_seeded_and_captions_name_the_attributes():
    assert specs(5, seed=3) == specs(5, seed=3)
    assert specs(5, seed=3) != specs(5, seed=4)
    spec = sample_spec(np.random.default_rng(0), shape="square", colour="blue", size="small")
    assert spec.caption() == "a small blue square"
    assert spec.caption(("colour", "shape")) == "a blue square"
    assert spec.caption(("shape",)) == "a square"
    assert np.array_equal(np.asarray(render(spec)), np.asarray(render(spec)))


def test_measure_recovers_the_drawn_attributes():
    for spec in specs(200):
        m = measure(render(spec))
        assert m.found
        assert m.shape == spec.shape
        assert hue_distance(m.hue, spec.hue) < 1.0
        assert abs(m.value - spec.value) < 0.01
        assert abs(m.saturation - spec.saturation) < 0.02
        assert abs(m.area - spec.area) / spec.area < 0.12
        assert abs(m.cx - spec.centroid[0]) < 0.02 and abs(m.cy - spec.centroid[1]) < 0.02
        assert abs(m.warmth - warmth(spec.hue)) < 0.02


def test_measure_is_robust_to_noise_and_blur():
    rng = np.random.default_rng(1)
    hits = 0
    chosen = specs(60, seed=2)
    for spec in chosen:
        image = render(spec).filter(ImageFilter.GaussianBlur(0.6))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (32, 32, 3))
        m = measure(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
        hits += m.shape == spec.shape and hue_distance(m.hue, spec.hue) < 10
    assert hits >= 0.9 * len(chosen)


def test_blank_picture_has_no_shape_and_masks_compare_by_iou():
    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    m = measure(blank)
    assert not m.found and np.isnan(m.hue)
    spec = specs(1)[0]
    mask = shape_mask(render(spec))
    assert mask_iou(mask, mask) == 1.0
    assert mask_iou(mask, shape_mask(render(with_hue(spec, spec.hue + 180)))) > 0.95
    moved = ShapeSpec(**{**spec.__dict__, "cx": 1.0 - spec.cx, "cy": 1.0 - spec.cy})
    assert mask_iou(mask, shape_mask(render(moved))) < mask_iou(mask, mask)


def test_colour_names_and_warmth():
    for name, hue in COLOURS.items():
        assert colour_name(hue) == name
    assert warmth(30) == pytest.approx(1.0)
    assert warmth(210) == pytest.approx(-1.0)
    assert warmth(0) > 0.8 and warmth(235) < -0.9
