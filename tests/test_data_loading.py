"""Plans to tensors: resize + center crop, value ranges, conditioning pairs travelling with
their images, and unreadable images named in the error."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from slider_cn.config import ConfigError, load_config
from slider_cn.data.backends import build_backends
from slider_cn.data.loading import load_batch
from slider_cn.data.sampler import SliderSampler


def stripes(size, colours):
    """Vertical stripes of equal width, one per colour."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        array[:, i * width // len(colours) : (i + 1) * width // len(colours)] = colour
    return Image.fromarray(array)


def write_config(tmp_path, backends, **extra):
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    (tmp_path / "config.json").write_text(
        json.dumps({"data_backend_config": "backends.json", "resolution": 32, **extra})
    )
    return load_config(tmp_path / "config.json")


def test_pixels_are_cropped_to_the_center_and_conditioning_follows(tmp_path):
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    (tmp_path / "img").mkdir()
    (tmp_path / "cond").mkdir()
    # 96x64 landscape: shorter side 64 -> 32, width 48, the central 32 columns are kept,
    # i.e. original columns 16..80: a bit of red, all of green, a bit of blue.
    stripes((96, 64), [red, green, blue]).save(tmp_path / "img/wide.png")
    # The conditioning image is half the size: it is aligned to the image before cropping.
    stripes((48, 32), [(255, 255, 255), (0, 0, 0), (128, 128, 128)]).save(
        tmp_path / "cond/wide.jpg"
    )
    config = write_config(
        tmp_path,
        [
            {"id": "img", "instance_data_dir": "img", "conditioning_data": "cond"},
            {"id": "cond", "instance_data_dir": "cond", "dataset_type": "conditioning"},
        ],
    )
    (plan,) = SliderSampler(build_backends(config), 1, seed=0)
    batch = load_batch(plan)
    assert batch.pixels.shape == (1, 3, 32, 32) and batch.pixels.dtype == torch.float32
    assert batch.pixels.min() >= -1.0 and batch.pixels.max() <= 1.0
    assert batch.conditioning_pixels.shape == (1, 3, 32, 32)
    assert batch.conditioning_pixels.min() >= 0.0 and batch.conditioning_pixels.max() <= 1.0
    px, cond = batch.pixels[0], batch.conditioning_pixels[0]
    # Crop columns 0..5 come from red, 6..26 from green, 27..31 from blue (in the crop's pixels).
    assert px[:, 16, 2].tolist() == pytest.approx([1.0, -1.0, -1.0], abs=0.05)
    assert px[:, 16, 16].tolist() == pytest.approx([-1.0, 1.0, -1.0], abs=0.05)
    assert px[:, 16, 30].tolist() == pytest.approx([-1.0, -1.0, 1.0], abs=0.05)
    assert cond[:, 16, 2].tolist() == pytest.approx([1.0] * 3, abs=0.1)
    assert cond[:, 16, 16].tolist() == pytest.approx([0.0] * 3, abs=0.1)
    assert cond[:, 16, 30].tolist() == pytest.approx([128 / 255] * 3, abs=0.1)
    assert batch.captions == ["wide"] and batch.backend == "img" and batch.sign == "0"


def test_conditioning_pairs_stay_with_their_images_across_batches_and_ranks(tmp_path):
    # Image i is a solid red of level 20*i; its conditioning is a solid grey of the same level,
    # in another format, in a nested folder.
    backends = []
    for sign, strength in (("plus", 0.5), ("minus", -0.5)):
        for i in range(8):
            level = 20 * i + (5 if sign == "minus" else 0)
            sub = "deep/" if i % 2 else ""
            path = tmp_path / sign / f"{sub}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (level, 0, 0)).save(path)
            cond = tmp_path / f"{sign}_cond/{sub}{i}.jpg"
            cond.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (level, level, level)).save(cond, quality=100)
        backends += [
            {
                "id": sign,
                "instance_data_dir": sign,
                "slider_strength": strength,
                "conditioning_data": f"{sign}_cond",
            },
            {
                "id": f"{sign}_cond",
                "instance_data_dir": f"{sign}_cond",
                "dataset_type": "conditioning",
            },
        ]
    config = write_config(tmp_path, backends)
    built = build_backends(config)
    checked = 0
    for rank in (0, 1):
        sampler = SliderSampler(built, 2, seed=1, rank=rank, world_size=2)
        for plan in sampler:
            batch = load_batch(plan)
            assert batch.pixels.shape[0] == batch.conditioning_pixels.shape[0] == 2
            for j, sample in enumerate(plan.samples):
                image_key = sample.path.relative_to(tmp_path / plan.backend).with_suffix("")
                cond_root = tmp_path / f"{plan.backend}_cond"
                assert sample.conditioning.relative_to(cond_root).with_suffix("") == image_key
                image_level = (batch.pixels[j, 0].mean() + 1) / 2
                cond_level = batch.conditioning_pixels[j].mean()
                assert abs(image_level - cond_level) < 2 / 255
                checked += 1
    assert checked == 16


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/bad.png").write_bytes(b"this is not a png")
    config = write_config(tmp_path, [{"id": "img", "instance_data_dir": "img"}])
    (plan,) = SliderSampler(build_backends(config), 1, seed=0)
    with pytest.raises(ConfigError, match=r"cannot read image .*img/bad\.png"):
        load_batch(plan)

    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    data = good.read_bytes()
    (tmp_path / "img/bad.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"cannot read image .*img/bad\.png"):
        load_batch(plan)


def test_load_without_pixels_keeps_captions_and_conditioning(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img/a_cat.png")
    config = write_config(tmp_path, [{"id": "img", "instance_data_dir": "img"}])
    (plan,) = SliderSampler(build_backends(config), 1, seed=0)
    batch = load_batch(plan, pixels=False)
    assert batch.pixels is None and batch.conditioning_pixels is None
    assert batch.captions == ["a cat"]


def _numbered_images(tmp_path, count: int, bad: int | None = None):
    (tmp_path / "img").mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(tmp_path / f"img/{i:02d}.png")
    if bad is not None:
        (tmp_path / f"img/{bad:02d}.png").write_bytes(b"not a png")
    config = write_config(tmp_path, [{"id": "img", "instance_data_dir": "img"}])
    return SliderSampler(build_backends(config), 1, seed=0)


def test_prefetch_gives_what_load_batch_gives_reading_one_ahead(tmp_path, monkeypatch):
    import threading

    from slider_cn.data import loading

    sampler = _numbered_images(tmp_path, 5)
    expected = [(plan, load_batch(plan)) for plan in sampler]
    sampler.set_epoch(1)
    sampler.set_epoch(0)  # back to the start of epoch 0

    started: dict[int, threading.Event] = {i: threading.Event() for i in range(5)}
    threads = set()

    def recording_load(plan, **kwargs):
        threads.add(threading.current_thread().name)
        started[plan.index].set()
        return load_batch(plan, **kwargs)

    monkeypatch.setattr(loading, "load_batch", recording_load)
    got = []
    for plan, batch in loading.prefetch_batches(sampler):
        # While this batch is in use, the next one is already being read.
        if plan.index + 1 < 5:
            assert started[plan.index + 1].wait(timeout=10)
        got.append((plan, batch))
    assert [p for p, _ in got] == [p for p, _ in expected]
    for (_, batch), (_, want) in zip(got, expected, strict=True):
        assert torch.equal(batch.pixels, want.pixels) and batch.captions == want.captions
    assert threads and all(name.startswith("slider-cn-load") for name in threads)
    assert sampler.state_dict()["index"] == len(sampler)


def test_prefetch_raises_in_order_and_stops_its_thread(tmp_path):
    import threading

    from slider_cn.data.loading import prefetch_batches

    sampler = _numbered_images(tmp_path, 4, bad=2)
    order = [plan.samples[0].path.name for plan in sampler]
    sampler.set_epoch(1)
    sampler.set_epoch(0)
    seen = []
    with pytest.raises(ConfigError, match=r"cannot read image .*02\.png"):
        for plan, _ in prefetch_batches(sampler):
            seen.append(plan.samples[0].path.name)
    assert seen == order[: order.index("02.png")]

    # (file headers are read even without pixels: the placement needs the image's size)
    good = _numbered_images(tmp_path / "good", 4)
    batches = prefetch_batches(SliderSampler(good.backends, 1, seed=5), pixels=False)
    next(batches)
    batches.close()  # an early break: the reader thread ends with it
    assert not any(t.name.startswith("slider-cn-load") for t in threading.enumerate())


def test_training_and_preprocessing_see_the_same_pixels(tmp_path):
    """A transparent PNG, a 16-bit grey PNG and a .bmp: training's decoder and the conditioning
    runner's reader give identical RGB pixels, and both list the same files."""
    import numpy as np
    from PIL import Image

    from conditioning.images import list_images, load_rgb
    from slider_cn.data.backends import scan_images
    from slider_cn.data.loading import decode_image

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "b.png")  # mode I;16
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c.bmp")
    (tmp_path / "notes.txt").write_text("not an image")

    listed = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert listed == list_images(tmp_path) == ["a.png", "b.png", "c.bmp"]
    for name in listed:
        trained = np.asarray(decode_image(tmp_path / name))
        assert np.array_equal(trained, load_rgb(tmp_path / name)), name
    transparent = np.asarray(decode_image(tmp_path / "a.png"))
    assert (transparent[:, :4] == 255).all()  # composited on white, not black
    assert (transparent[:, 4:] == [200, 0, 0]).all()
    sixteen = np.asarray(decode_image(tmp_path / "b.png"))
    assert sixteen[7, 7, 0] == (63 * 1000) >> 8  # the high byte, not clipped to 255
