"""Inline conditioning: `"conditioning": [...]` on a backend made into a linked, cached folder."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from conditioning.inline import prepare_inline_conditioning
from conditioning.registry import params_hash, resolve_params
from slider_cn.config import ConfigError
from slider_cn.data.config import load_backend_configs


def _dataloader(demo, conditioning, **extra):
    entries = json.loads(demo["dataloader"].read_text())
    entries[0]["conditioning"] = conditioning
    entries[0].update(extra)
    demo["dataloader"].write_text(json.dumps(entries))
    return load_backend_configs(demo["dataloader"])


def test_inline_canny_is_generated_cached_and_linked(demo, tmp_path):
    backends = _dataloader(demo, [{"type": "canny", "params": {"low_threshold": 50}}])
    before = [b.model_copy(deep=True) for b in backends]
    cache = tmp_path / "cache"

    result = prepare_inline_conditioning(backends, cache, progress=False)

    assert backends == before  # the input list is left alone
    digest = params_hash("canny", resolve_params("canny", {"low_threshold": 50}))
    folder = cache / "circle-plus" / f"canny-{digest}"
    assert [b.id for b in result] == [
        "circle-plus",
        "circle-plus-canny",
        "circle-minus",
        "neutral",
    ]
    plus, cond = result[0], result[1]
    assert plus.conditioning_data == "circle-plus-canny" and plus.conditioning is None
    assert cond.dataset_type == "conditioning" and cond.instance_data_dir == str(folder)
    assert result[2:] == backends[1:]

    # Paired by relative path with the training images, made with the spec's parameters.
    for source in sorted(demo["plus"].glob("*.png")):
        out = np.asarray(Image.open(folder / source.name))
        expected = cv2.Canny(np.asarray(Image.open(source).convert("RGB")), 50, 200)
        assert np.array_equal(out, expected)

    # A second preparation reuses the cache (nothing rewritten) and gives the same list.
    mtimes = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    again = prepare_inline_conditioning(backends, cache, progress=False)
    assert again == result
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.png")} == mtimes

    # The result is a valid dataloader config (the link resolves to a conditioning backend),
    # and preparing it again changes nothing.
    resolved = tmp_path / "resolved.json"
    resolved.write_text(json.dumps([b.model_dump() for b in result]))
    assert [b.id for b in load_backend_configs(resolved)] == [b.id for b in result]
    assert prepare_inline_conditioning(result, cache, progress=False) == result


def test_other_params_use_another_cache_folder(demo, tmp_path):
    cache = tmp_path / "cache"
    a = prepare_inline_conditioning(_dataloader(demo, [{"type": "canny"}]), cache, progress=False)
    b = prepare_inline_conditioning(
        _dataloader(demo, [{"type": "canny", "params": {"high_threshold": 150}}]),
        cache,
        progress=False,
    )
    assert a[1].instance_data_dir != b[1].instance_data_dir


def test_inline_errors_name_the_backend(demo, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="backend 'circle-plus'.*unknown detector 'edges'"):
        prepare_inline_conditioning(_dataloader(demo, [{"type": "edges"}]), cache)
    with pytest.raises(ConfigError, match="backend 'circle-plus'.*no parameter 'low'"):
        prepare_inline_conditioning(
            _dataloader(demo, [{"type": "canny", "params": {"low": 1}}]), cache
        )
    with pytest.raises(ConfigError, match="lists 2 entries"):
        prepare_inline_conditioning(_dataloader(demo, [{"type": "canny"}] * 2), cache)

    (demo["plus"] / "broken.png").write_text("not an image")
    with pytest.raises(ConfigError, match="circle-plus.*broken.png"):
        prepare_inline_conditioning(_dataloader(demo, [{"type": "canny"}]), cache, progress=False)


def test_weights_for_inline_detectors_come_from_params(demo, tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    spec = [{"type": "hed", "params": {"annotator_path": str(empty)}}]
    with pytest.raises(ConfigError, match=f"circle-plus.*looked in {empty}.*ControlNetHED.pth"):
        prepare_inline_conditioning(_dataloader(demo, spec), tmp_path / "cache", progress=False)
