"""Backends from the dataloader config: scanning, captions, conditioning pairs, balance, and
the bad inputs of issue 4 (each a ConfigError naming what to fix)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from slider_cn.config import ConfigError, load_config
from slider_cn.data.backends import build_backends
from slider_cn.data.config import load_backend_configs
from slider_cn.image_files import scan_images


def image(path: Path, colour=(200, 10, 10), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def setup(tmp_path, backends, **config):
    """Write a dataloader and a training config; return the loaded TrainConfig."""
    dataloader = tmp_path / "backends.json"
    dataloader.write_text(json.dumps(backends))
    train = tmp_path / "config.json"
    train.write_text(json.dumps({"data_backend_config": "backends.json", **config}))
    return load_config(train)


def test_scan_is_recursive_sorted_and_filters(tmp_path):
    root = tmp_path / "d"
    for name in ("b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.webp"):
        image(root / name)
    (root / "notes.txt").write_text("x")
    image(root / ".hidden.png")
    image(root / ".thumbs/e.png")
    found = [p.relative_to(root).as_posix() for p in scan_images(root)]
    assert found == ["a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.webp"]


def test_caption_strategies(tmp_path):
    image(tmp_path / "fn/a_big-circle.png")
    image(tmp_path / "tf/x.png")
    (tmp_path / "tf/x.txt").write_text("  a caption from a file \n")
    image(tmp_path / "tf/y.png")  # no .txt: falls back to instance_prompt
    image(tmp_path / "ip/z.png")
    config = setup(
        tmp_path,
        [
            {"id": "fn", "instance_data_dir": "fn"},
            {
                "id": "tf",
                "instance_data_dir": "tf",
                "caption_strategy": "textfile",
                "instance_prompt": "fallback",
            },
            {
                "id": "ip",
                "instance_data_dir": "ip",
                "caption_strategy": "instanceprompt",
                "instance_prompt": "the prompt",
            },
        ],
    )
    captions = {b.id: [s.caption for s in b.samples] for b in build_backends(config)}
    assert captions == {
        "fn": ["a big circle"],
        "tf": ["a caption from a file", "fallback"],
        "ip": ["the prompt"],
    }


def test_textfile_without_caption_or_fallback_names_the_file(tmp_path):
    image(tmp_path / "tf/lonely.png")
    config = setup(
        tmp_path, [{"id": "tf", "instance_data_dir": "tf", "caption_strategy": "textfile"}]
    )
    with pytest.raises(
        ConfigError, match=r"lonely\.png has no caption file lonely\.txt.*instance_prompt"
    ):
        build_backends(config)


def test_backend_fields_resolution_and_sign(tmp_path):
    for d in ("p", "m", "n"):
        image(tmp_path / d / "a.png")
    config = setup(
        tmp_path,
        [
            {"id": "p", "instance_data_dir": "p", "slider_strength": 0.5, "resolution": 128},
            {"id": "m", "instance_data_dir": "m", "slider_strength": -0.5, "probability": 2},
            {"id": "n", "instance_data_dir": "n", "slider_strength": 0},
            {"id": "off", "instance_data_dir": "missing", "disabled": True},
        ],
        resolution=64,
    )
    backends = {b.id: b for b in build_backends(config)}
    assert set(backends) == {"p", "m", "n"}
    assert [backends[i].sign for i in "pmn"] == ["+", "-", "0"]
    assert backends["p"].resolution == 128 and backends["m"].resolution == 64
    assert backends["m"].probability == 2.0


def test_nested_backend_folder_is_not_scanned_twice(tmp_path):
    image(tmp_path / "plus/a.png")
    image(tmp_path / "plus/canny/a.png", colour=(255, 255, 255))
    config = setup(
        tmp_path,
        [
            {"id": "plus", "instance_data_dir": "plus", "conditioning_data": "plus-canny"},
            {"id": "plus-canny", "instance_data_dir": "plus/canny", "dataset_type": "conditioning"},
        ],
    )
    (plus,) = build_backends(config)
    assert [s.key for s in plus.samples] == ["a"]
    assert plus.samples[0].conditioning == tmp_path / "plus/canny/a.png"


def test_conditioning_pairs_by_relative_path_with_any_extension(tmp_path):
    for name in ("one.png", "sub/two.jpg", "sub/three.webp"):
        image(tmp_path / "img" / name)
    for name in ("one.jpg", "sub/two.png", "sub/three.png", "extra.png"):
        image(tmp_path / "cond" / name)
    config = setup(
        tmp_path,
        [
            {"id": "img", "instance_data_dir": "img", "conditioning_data": "cond"},
            {"id": "cond", "instance_data_dir": "cond", "dataset_type": "conditioning"},
        ],
    )
    (img,) = build_backends(config)
    pairs = {
        s.path.relative_to(tmp_path).as_posix(): s.conditioning.relative_to(tmp_path).as_posix()
        for s in img.samples
    }
    assert pairs == {
        "img/one.png": "cond/one.jpg",
        "img/sub/two.jpg": "cond/sub/two.png",
        "img/sub/three.webp": "cond/sub/three.png",
    }
    assert img.has_conditioning


def test_unpaired_images_listed_first_20_and_a_count_per_backend(tmp_path):
    for i in range(25):
        image(tmp_path / f"a/img_{i:02d}.png")
    image(tmp_path / "ca/img_00.png")
    image(tmp_path / "b/solo.png")
    image(tmp_path / "cb/other.png")
    config = setup(
        tmp_path,
        [
            {"id": "a", "instance_data_dir": "a", "conditioning_data": "ca"},
            {"id": "ca", "instance_data_dir": "ca", "dataset_type": "conditioning"},
            {"id": "b", "instance_data_dir": "b", "conditioning_data": "cb"},
            {"id": "cb", "instance_data_dir": "cb", "dataset_type": "conditioning"},
        ],
        slider_allow_unbalanced=True,
    )
    with pytest.raises(ConfigError) as info:
        build_backends(config)
    message = str(info.value)
    line_a, line_b = message.splitlines()
    assert "backend 'a': 24 of 25 training images have no conditioning image in 'ca'" in line_a
    assert "img_01.png" in line_a and "img_20.png" in line_a and "img_21.png" not in line_a
    assert line_a.endswith("(and 4 more)")
    assert "backend 'b': 1 of 1" in line_b and "solo.png" in line_b


def test_ambiguous_conditioning_is_an_error(tmp_path):
    image(tmp_path / "img/a.png")
    image(tmp_path / "cond/a.png")
    image(tmp_path / "cond/a.jpg")
    config = setup(
        tmp_path,
        [
            {"id": "img", "instance_data_dir": "img", "conditioning_data": "cond"},
            {"id": "cond", "instance_data_dir": "cond", "dataset_type": "conditioning"},
        ],
    )
    with pytest.raises(ConfigError, match=r"'cond'.*share a relative path.*a\.jpg / a\.png"):
        build_backends(config)


def test_inline_conditioning_is_generated_and_paired(tmp_path):
    from slider_cn.data.backends import training_backends

    image(tmp_path / "img/a.png")
    image(tmp_path / "img/sub/b.png")
    backends = [{"id": "img", "instance_data_dir": "img", "conditioning": [{"type": "canny"}]}]
    config = setup(tmp_path, backends, output_dir="out")
    (img,) = build_backends(config)  # without generation (as --plan): accepted, unpaired
    assert [s.conditioning for s in img.samples] == [None, None]

    (img,) = training_backends(config, progress=False)
    generated = [s.conditioning for s in img.samples]
    assert all(p is not None and p.is_file() for p in generated)
    assert [p.relative_to(config.cache_path / "conditioning").parts[0] for p in generated] == [
        "img",
        "img",
    ]
    assert [p.stem for p in generated] == ["a", "b"]


def test_balance_counts_repeats(tmp_path):
    for i in range(4):
        image(tmp_path / f"p/{i}.png")
    for i in range(2):
        image(tmp_path / f"m/{i}.png")
    backends = [
        {"id": "p", "instance_data_dir": "p", "slider_strength": 1},
        {"id": "m", "instance_data_dir": "m", "slider_strength": -1},
    ]
    with pytest.raises(ConfigError) as info:
        build_backends(setup(tmp_path, backends))
    message = str(info.value)
    assert "positive group holds 4 samples (p: 4 images x 1 passes)" in message
    assert "negative group holds 2 (m: 2 images x 1 passes)" in message
    assert "slider_allow_unbalanced: true" in message
    # Unbalanced allowed on request.
    assert len(build_backends(setup(tmp_path, backends, slider_allow_unbalanced=True))) == 2
    # repeats 1 doubles the negative side: balanced.
    backends[1]["repeats"] = 1
    assert len(build_backends(setup(tmp_path, backends))) == 2


# --- bad input, each a clear ConfigError -------------------------------------------------
def test_empty_backend(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    config = setup(tmp_path, [{"id": "e", "instance_data_dir": "empty"}])
    with pytest.raises(ConfigError, match=r"backend 'e': no images \(.*png.*\) found in .*empty"):
        build_backends(config)


def test_missing_directory(tmp_path):
    dataloader = tmp_path / "b.json"
    dataloader.write_text(json.dumps([{"id": "x", "instance_data_dir": "nowhere"}]))
    with pytest.raises(ConfigError, match=r"backend 'x': instance_data_dir not found: .*nowhere"):
        load_backend_configs(dataloader)


def test_duplicate_ids(tmp_path):
    (tmp_path / "d").mkdir()
    dataloader = tmp_path / "b.json"
    dataloader.write_text(
        json.dumps([{"id": "x", "instance_data_dir": "d"}, {"id": "x", "instance_data_dir": "d"}])
    )
    with pytest.raises(ConfigError, match="backend ids must be unique; repeated: x"):
        load_backend_configs(dataloader)


def test_unknown_conditioning_data_id(tmp_path):
    (tmp_path / "d").mkdir()
    dataloader = tmp_path / "b.json"
    dataloader.write_text(
        json.dumps(
            [
                {"id": "x", "instance_data_dir": "d", "conditioning_data": "x-cany"},
                {"id": "x-canny", "instance_data_dir": "d", "dataset_type": "conditioning"},
            ]
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"conditioning_data 'x-cany' is not a backend id \(did you mean 'x-canny'",
    ):
        load_backend_configs(dataloader)


@pytest.mark.parametrize(
    "value,pattern",
    [
        ("strong", "valid number"),
        (True, "must be a number, not true"),
        ([0.5], "valid number"),
    ],
)
def test_non_numeric_slider_strength(tmp_path, value, pattern):
    (tmp_path / "d").mkdir()
    dataloader = tmp_path / "b.json"
    dataloader.write_text(
        json.dumps([{"id": "x", "instance_data_dir": "d", "slider_strength": value}])
    )
    with pytest.raises(
        ConfigError, match=rf"b\.json: backend #0 \('x'\): key 'slider_strength': .*{pattern}"
    ):
        load_backend_configs(dataloader)


@pytest.mark.parametrize(
    "entry,pattern",
    [
        ({"probability": 0}, "key 'probability': Input should be greater than 0"),
        ({"resolution": 100}, "key 'resolution': must be a multiple of 8"),
        (
            {"conditioning_data": "c", "conditioning": [{"type": "canny"}]},
            "either conditioning_data .* or conditioning",
        ),
    ],
)
def test_other_bad_backend_values(tmp_path, entry, pattern):
    (tmp_path / "d").mkdir()
    dataloader = tmp_path / "b.json"
    dataloader.write_text(
        json.dumps(
            [
                {"id": "x", "instance_data_dir": "d", **entry},
                {"id": "c", "instance_data_dir": "d", "dataset_type": "conditioning"},
            ]
        )
    )
    with pytest.raises(ConfigError, match=pattern):
        load_backend_configs(dataloader)


def test_cache_dir_defaults_under_output_dir_and_resolves_relative(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"output_dir": "out"}))
    assert load_config(tmp_path / "c.json").cache_path == tmp_path / "out" / "cache"
    (tmp_path / "c.json").write_text(json.dumps({"output_dir": "out", "cache_dir": "shared"}))
    assert load_config(tmp_path / "c.json").cache_path == tmp_path / "shared"
