"""The conditioning package: detectors, the resumable batch runner and `slider-cn preprocess`."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conditioning import run_batch
from conditioning.manifest import MANIFEST_NAME
from conditioning.registry import DETECTORS, params_hash, resolve_params
from slider_cn.cli import main
from slider_cn.config import ConfigError


def _samples() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _write_small_images(folder: Path, n: int, size: tuple[int, int] = (64, 48)) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        rel = f"{'sub/' if i % 2 else ''}img_{i}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        # Blocks, so that Canny finds edges.
        img = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST)
        Image.fromarray(img).save(folder / rel)
        names.append(rel)
    return sorted(names)


# --- canny is exactly cv2.Canny --------------------------------------------------------------
@pytest.mark.parametrize("thresholds", [None, (50, 150)])
def test_canny_is_cv2_canny_on_skimage_samples(tmp_path, thresholds):
    samples = _samples()
    src = tmp_path / "in"
    src.mkdir()
    for name, img in samples.items():
        Image.fromarray(img).save(src / f"{name}.png")
    low, high = thresholds or (100, 200)  # controlnet-aux's defaults
    params = {} if thresholds is None else {"low_threshold": low, "high_threshold": high}

    report = run_batch("canny", params, src, tmp_path / "out", progress=False)

    assert sorted(report.processed) == sorted(f"{n}.png" for n in samples) and report.ok
    for name, img in samples.items():
        out = _png(tmp_path / "out" / f"{name}.png")
        # One-channel 8-bit PNG at the source size (not controlnet-aux's 512), cv2.Canny's bits.
        assert np.array_equal(out, cv2.Canny(img, low, high)), name


def test_canny_resolution_keeps_aspect(tmp_path):
    coffee = _samples()["coffee"]  # 400 x 600
    (tmp_path / "in").mkdir()
    Image.fromarray(coffee).save(tmp_path / "in" / "coffee.png")
    run_batch("canny", {}, tmp_path / "in", tmp_path / "out", resolution=200, progress=False)
    out = _png(tmp_path / "out" / "coffee.png")
    assert out.shape == (200, 300)
    small = cv2.resize(coffee, (300, 200), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out, cv2.Canny(small, 100, 200))


# --- resumable ---------------------------------------------------------------------------------
def test_rerun_skips_up_to_date_and_redoes_what_changed(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    names = _write_small_images(src, 4)

    first = run_batch("canny", {}, src, out, progress=False)
    assert first.processed == names and not first.skipped
    assert all((out / n).is_file() for n in names)  # same relative paths, PNG
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entry = manifest["files"]["sub/img_1.png"]
    assert entry["detector"] == "canny"
    assert entry["params"] == {
        "low_threshold": 100,
        "high_threshold": 200,
        "detect_resolution": None,
    }

    second = run_batch("canny", {}, src, out, progress=False)
    assert second.processed == [] and second.skipped == names

    touched = src / names[1]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    third = run_batch("canny", {}, src, out, progress=False)
    assert third.processed == [names[1]] and len(third.skipped) == 3

    # Different parameters: everything is redone; the same ones again: nothing.
    assert run_batch("canny", {"low_threshold": 10}, src, out, progress=False).processed == names
    assert run_batch("canny", {"low_threshold": 10}, src, out, progress=False).processed == []

    # A deleted output is remade; a deleted source takes its output with it.
    (out / names[0]).unlink()
    (src / names[2]).unlink()
    fourth = run_batch("canny", {"low_threshold": 10}, src, out, progress=False)
    assert fourth.processed == [names[0]] and fourth.removed == [names[2]]
    assert not (out / names[2]).exists()


def test_workers_give_the_same_outputs(tmp_path):
    src = tmp_path / "in"
    names = _write_small_images(src, 12)
    one = run_batch("canny", {}, src, tmp_path / "one", workers=1, progress=False)
    two = run_batch("canny", {}, src, tmp_path / "two", workers=2, progress=False)
    assert one.processed == two.processed == names
    for n in names:
        assert np.array_equal(_png(tmp_path / "one" / n), _png(tmp_path / "two" / n))


def test_a_helper_process_makes_the_same_outputs(tmp_path):
    """The spawned helper path on its own (run_batch hands helpers work only once they are up,
    which a fast small batch may never wait for)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from conditioning import _worker

    src = tmp_path / "in"
    names = _write_small_images(src, 3)
    run_batch("canny", {}, src, tmp_path / "here", progress=False)
    params = resolve_params("canny", {})
    init = (True, "canny", params, None, None, src, tmp_path / "helper", None)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, ctx, _worker.init, init) as pool:
        results = pool.submit(_worker.work_chunk, names).result()
    assert results == [(n, None) for n in names]
    for n in names:
        assert np.array_equal(_png(tmp_path / "here" / n), _png(tmp_path / "helper" / n))


def test_sources_of_other_formats_become_png_and_captions_are_ignored(tmp_path):
    src = tmp_path / "in"
    _write_small_images(src, 1)
    Image.open(src / "img_0.png").convert("RGB").save(src / "photo.jpg")
    Image.open(src / "img_0.png").convert("RGBA").save(src / "cut.webp")
    (src / "img_0.txt").write_text("a caption")
    report = run_batch("canny", {}, src, tmp_path / "out", progress=False)
    assert sorted(report.processed) == ["cut.webp", "img_0.png", "photo.jpg"] and report.ok
    assert (tmp_path / "out" / "photo.png").is_file() and (tmp_path / "out" / "cut.png").is_file()

    Image.open(src / "img_0.png").save(src / "img_0.bmp")  # would also write img_0.png
    with pytest.raises(ConfigError, match="img_0.bmp and img_0.png"):
        run_batch("canny", {}, src, tmp_path / "out", progress=False)


def test_output_inside_input_is_refused(tmp_path):
    _write_small_images(tmp_path / "in", 1)
    with pytest.raises(ConfigError, match="inside the input folder"):
        run_batch("canny", {}, tmp_path / "in", tmp_path / "in" / "canny", progress=False)


def test_seeded_detectors_are_reproducible_and_lineart_standard_runs(tmp_path):
    src = tmp_path / "in"
    names = _write_small_images(src, 2)
    params = {"detect_resolution": 64, "f": 16}
    state = np.random.get_state()[1][0]
    run_batch("shuffle", params, src, tmp_path / "a", progress=False)
    run_batch("shuffle", params, src, tmp_path / "b", progress=False)
    run_batch("shuffle", {**params, "seed": 1}, src, tmp_path / "c", progress=False)
    a, b, c = (_png(tmp_path / d / names[0]) for d in "abc")
    assert np.random.get_state()[1][0] == state  # the global RNG is left as it was
    assert a.shape == (48, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)

    report = run_batch("lineart_standard", {"detect_resolution": 64}, src, tmp_path / "l")
    assert report.processed == names and _png(tmp_path / "l" / names[1]).shape == (48, 64)


# --- parameters and the registry ---------------------------------------------------------------
def test_params_are_validated_with_the_detector_named():
    assert resolve_params("canny", {"low_threshold": 20.0})["low_threshold"] == 20
    with pytest.raises(
        ConfigError, match="no parameter 'low_treshold'.*did you mean 'low_threshold'"
    ):
        resolve_params("canny", {"low_treshold": 1})
    with pytest.raises(ConfigError, match="'safe' must be true or false"):
        resolve_params("hed", {"safe": "yes"})
    with pytest.raises(ConfigError, match="must be >= 64"):
        resolve_params("hed", {"detect_resolution": 16})
    assert params_hash("canny", resolve_params("canny", {})) == params_hash(
        "canny", resolve_params("canny", {"low_threshold": 100})
    )


def test_registry_matches_installed_controlnet_aux():
    """Names, defaults and weight file names follow the installed controlnet-aux classes."""
    from conditioning._aux import aux_class

    for spec in DETECTORS.values():
        if spec.aux_module is None:
            continue
        try:
            cls = aux_class(spec.name, spec.aux_module, spec.aux_class, spec.requires)
        except ConfigError:
            assert spec.requires  # only a missing optional package may stop one
            continue
        call = inspect.signature(cls.__call__).parameters
        for param in spec.params:
            if param.name == "seed":
                continue
            aux_name = spec.call_names.get(param.name, param.name)
            assert aux_name in call, (spec.name, aux_name)
            # shuffle's f defaults to None there, meaning 256 inside the call.
            aux_default = None if (spec.name, param.name) == ("shuffle", "f") else param.default
            assert call[aux_name].default == aux_default, (spec.name, param.name)
        if spec.needs_weights:
            source = inspect.getsource(cls.from_pretrained) + str(spec.pretrained_kwargs)
            for filename in spec.weights:
                assert filename in source or filename in inspect.getsource(
                    sys.modules[cls.__module__]
                ), (spec.name, filename)


# --- weight-based detectors ------------------------------------------------------------------
@pytest.fixture
def hed_weights(tmp_path):
    """A folder with randomly initialised HED weights in controlnet-aux's layout."""
    import torch

    from conditioning._aux import aux_class

    aux_class("hed", "hed", "HEDdetector")
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    folder = tmp_path / "annotators"
    folder.mkdir()
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    return folder


def test_hed_runs_from_a_local_folder_offline(tmp_path, hed_weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "in"
    names = _write_small_images(src, 2)
    report = run_batch(
        "hed", {"detect_resolution": 64}, src, tmp_path / "out", annotator_path=str(hed_weights)
    )
    assert report.processed == names and report.ok

    # The same as calling controlnet-aux's detector with these weights directly (it works at
    # 64x64, 64-multiples; the runner shrinks that to the source's 64x48 by area averaging).
    from controlnet_aux.hed import HEDdetector

    direct = HEDdetector.from_pretrained(str(hed_weights))
    for n in names:
        img = _png(src / n)
        expected = direct(img, detect_resolution=64, image_resolution=64, output_type="np")
        expected = cv2.resize(expected, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
        assert np.array_equal(_png(tmp_path / "out" / n), expected[:, :, 0])  # gray PNG

    entry = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["files"][names[0]]
    assert entry["weights"] == str(hed_weights.resolve())
    # The CLI, too (a second run finds everything up to date).
    assert main(["preprocess", "--detector", "hed", "--input", str(src), "--output",
                 str(tmp_path / "out"), "--detect-resolution", "64",
                 "--annotator-path", str(hed_weights)]) == 0  # fmt: skip


def _random_weights(name: str, folder: Path) -> None:
    """Randomly initialised weights in the layout each controlnet-aux class loads."""
    import torch

    from conditioning._aux import aux_class

    spec = DETECTORS[name]
    aux_class(name, spec.aux_module, spec.aux_class)
    if name == "teed":
        from controlnet_aux.teed.ted import TED

        torch.save(TED().state_dict(), folder / "5_model.pth")
    elif name == "pidi":  # a training checkpoint: {"state_dict": {"module.<name>": ...}}
        from controlnet_aux.pidi.model import pidinet

        state = {f"module.{k}": v for k, v in pidinet().state_dict().items()}
        torch.save({"state_dict": state}, folder / "table5_pidinet.pth")
    elif name == "lineart":  # two networks: fine and coarse
        from controlnet_aux.lineart import Generator

        torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
        torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("teed", {"detect_resolution": 64}),
        ("pidi", {"detect_resolution": 64, "safe": True}),
        ("lineart", {"detect_resolution": 64, "coarse": True}),
    ],
)
def test_other_weight_based_detectors_from_local_folders(tmp_path, name, params, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    torch.manual_seed(0)
    weights = tmp_path / "w"
    weights.mkdir()
    _random_weights(name, weights)
    src = tmp_path / "in"
    names = _write_small_images(src, 1)
    report = run_batch(name, params, src, tmp_path / "out", annotator_path=str(weights))
    assert report.ok and report.processed == names
    assert _png(tmp_path / "out" / names[0]).shape == (48, 64)


def test_missing_weights_say_where_and_how(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "in"
    _write_small_images(src, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        run_batch("hed", {}, src, tmp_path / "out", annotator_path=str(empty))
    msg = str(err.value)
    assert str(empty) in msg and "ControlNetHED.pth" in msg and "hf download" in msg

    args = ["preprocess", "--detector", "lineart", "--input", str(src), "--output"]
    assert main([*args, str(tmp_path / "o2"), "--annotator-path", "no-such-org/no-such-repo"]) == 2
    err_text = capsys.readouterr().err
    assert "no-such-org/no-such-repo" in err_text and "sk_model.pth" in err_text


def test_one_missing_piece_leaves_the_others_working(tmp_path, monkeypatch):
    src = tmp_path / "in"
    _write_small_images(src, 1)
    from conditioning._aux import aux_class

    monkeypatch.setitem(sys.modules, "controlnet_aux.mlsd", None)  # as if it failed to import
    with pytest.raises(ConfigError, match="'mlsd' could not be imported"):
        aux_class("mlsd", "mlsd", "MLSDdetector")
    assert run_batch("lineart_standard", {"detect_resolution": 64}, src, tmp_path / "l").ok
    assert run_batch("canny", {}, src, tmp_path / "c").ok

    import importlib.util

    if importlib.util.find_spec("mediapipe") is None:
        with pytest.raises(ConfigError, match="needs the optional package 'mediapipe'"):
            run_batch("mediapipe_face", {}, src, tmp_path / "m")


# --- the CLI ---------------------------------------------------------------------------------
def test_corrupt_files_are_named_and_the_rest_processed(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    names = _write_small_images(src, 3)
    (src / "broken.png").write_text("not an image")
    good = (src / names[0]).read_bytes()
    (src / "sub" / "truncated.png").write_bytes(good[: len(good) // 2])

    code = main(["preprocess", "--detector", "canny", "--input", str(src), "--output", str(out),
                 "--workers", "1"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "sub/truncated.png" in err and "3 processed" in err
    assert all((out / n).is_file() for n in names)
    assert not (out / "broken.png").exists()


def test_unknown_detector_lists_the_known_ones(tmp_path, capsys):
    code = main(["preprocess", "--detector", "cany", "--input", str(tmp_path), "--output",
                 str(tmp_path / "o")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown detector 'cany'" in err and "did you mean 'canny'" in err
    assert all(name in err for name in DETECTORS)


def test_preprocess_rejects_unknown_and_foreign_options(tmp_path, capsys):
    _write_small_images(tmp_path / "in", 1)
    base = ["preprocess", "--detector", "canny", "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main([*base, "--learning_rate", "1"])
    assert exc.value.code == 2
    assert main([*base, "--scribble"]) == 2
    assert "--scribble does not apply to detector 'canny'" in capsys.readouterr().err
    assert main([*base, "--low-threshold", "250"]) == 2
    assert main(["preprocess", "--detector", "canny"]) == 2
    assert "needs --input, --output" in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path / "missing"), *base[5:]]) == 2
    assert "input folder not found" in capsys.readouterr().err


def test_preprocess_list(capsys):
    assert main(["preprocess", "--list"]) == 0
    out = capsys.readouterr().out
    for spec in DETECTORS.values():
        assert spec.name in out
        for filename in spec.weights:
            assert filename in out
    assert "canny" in out and "weights: no" in out and "weights: yes" in out


def test_preprocess_cli_thresholds_and_resolution(tmp_path, capsys):
    src = tmp_path / "in"
    names = _write_small_images(src, 2)
    code = main(["preprocess", "--detector", "canny", "--input", str(src), "--output",
                 str(tmp_path / "o"), "--low-threshold", "30", "--high-threshold", "60",
                 "--resolution", "24", "--workers", "1"])  # fmt: skip
    assert code == 0 and "2 processed" in capsys.readouterr().out
    img = _png(src / names[0])
    small = cv2.resize(img, (32, 24), interpolation=cv2.INTER_AREA)
    assert np.array_equal(_png(tmp_path / "o" / names[0]), cv2.Canny(small, 30, 60))
