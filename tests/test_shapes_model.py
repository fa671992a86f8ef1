"""The shipped `shapes` / `shapes-canny` models: loading, size, and that they draw."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slider_cn.config import ConfigError, load_config
from slider_cn.shapes.measure import mask_iou, measure, shape_mask
from slider_cn.shapes.world import COLOURS, SHAPES, render, sample_spec


def specs(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_spec(rng) for _ in range(count)]


# --- the built-in models -----------------------------------------------------------------
def test_shapes_config_defaults_to_its_native_resolution():
    assert load_config(None, {"pretrained_model_name_or_path": "shapes"}).resolution == 32
    explicit = load_config(None, {"pretrained_model_name_or_path": "shapes", "resolution": "64"})
    assert explicit.resolution == 64
    assert load_config(None, {"pretrained_model_name_or_path": "org/sd15"}).resolution == 512
    with pytest.raises(ConfigError, match="sd1x"):
        load_config(None, {"pretrained_model_name_or_path": "shapes", "model_family": "sdxl"})


def test_shipped_weights_are_small_fp16_safetensors_with_their_settings():
    from safetensors import safe_open

    from slider_cn.shapes import WEIGHTS

    files = sorted([*WEIGHTS.glob("base/*/*.safetensors"), *WEIGHTS.glob("canny/*.safetensors")])
    assert {f.parent.name for f in files} >= {"unet", "vae", "text_encoder"}
    assert any(f.parent.name == "canny" for f in files)
    shipped = [*WEIGHTS.glob("*.json"), *WEIGHTS.glob("base/**/*"), *WEIGHTS.glob("canny/*")]
    total = sum(f.stat().st_size for f in shipped if f.is_file())
    assert total < 30 * 2**20
    for f in files:
        with safe_open(str(f), "pt") as handle:
            settings = json.loads(handle.metadata()["slider_cn.shapes.settings"])
            assert settings["seed"] == 0
            assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16


def test_shapes_loads_the_real_classes_in_fp32():
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    from slider_cn.families import get_family

    config = load_config(
        None,
        {
            "pretrained_model_name_or_path": "shapes",
            "controlnet_model_name_or_path": "shapes-canny",
        },
    )
    components = get_family(config).load_components()
    assert isinstance(components.denoiser, UNet2DConditionModel)
    assert isinstance(components.vae, AutoencoderKL)
    assert isinstance(components.text_encoders[0], CLIPTextModel)
    assert isinstance(components.controlnet, ControlNetModel)
    assert not components.controlnet_is_fresh
    for module in components.modules().values():
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_missing_shapes_weights_are_a_clear_error(monkeypatch, tmp_path):
    from slider_cn import shapes
    from slider_cn.families import get_family

    monkeypatch.setitem(shapes.BUILTIN_MODELS, "shapes", tmp_path / "nowhere")
    config = load_config(None, {"pretrained_model_name_or_path": "shapes"})
    with pytest.raises(ConfigError, match="slider_cn.shapes.pretrain"):
        get_family(config).load_components()


@pytest.fixture(scope="module")
def shapes_pipeline():
    from slider_cn.families import get_family

    config = load_config(None, {"pretrained_model_name_or_path": "shapes"})
    family = get_family(config)
    components = family.load_components(with_controlnet=False)
    pipe = family.validation_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_base_draws_what_its_caption_names(shapes_pipeline):
    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    images = shapes_pipeline(
        prompts,
        height=32,
        width=32,
        num_inference_steps=20,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    measured = [measure(image) for image in images]
    found = np.mean([m.found for m in measured])
    colour = np.mean([m.colour == p.split()[1] for m, p in zip(measured, prompts, strict=True)])
    shape = np.mean([m.shape == p.split()[2] for m, p in zip(measured, prompts, strict=True)])
    assert found == 1.0
    # chance is 1/8 for the colour and 1/3 for the shape
    assert colour >= COLOUR_ACCURACY_BOUND, colour
    assert shape >= SHAPE_ACCURACY_BOUND, shape


def test_the_canny_controlnet_holds_the_outline():
    from diffusers import StableDiffusionControlNetPipeline

    from slider_cn.families import get_family
    from slider_cn.shapes.models import canny_map

    config = load_config(
        None,
        {
            "pretrained_model_name_or_path": "shapes",
            "controlnet_model_name_or_path": "shapes-canny",
        },
    )
    family = get_family(config)
    pipe = family.validation_pipeline(family.load_components())
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    pipe.set_progress_bar_config(disable=True)
    chosen = specs(8, seed=11)
    maps = []
    for spec in chosen:
        maps.append(torch.from_numpy(np.stack([canny_map(render(spec))] * 3)).float() / 255)
    images = pipe(
        [spec.caption(("shape",)) for spec in chosen],
        image=torch.stack(maps),
        height=32,
        width=32,
        num_inference_steps=20,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    ious = [
        mask_iou(shape_mask(image), shape_mask(render(spec)))
        for image, spec in zip(images, chosen, strict=True)
    ]
    assert np.mean(ious) >= CONTROLNET_IOU_BOUND, ious


# The shipped weights measured 100 % colour and 98.6 % shape accuracy over 72 samples and a
# ControlNet outline IoU of 0.885 (slider_cn/shapes/weights/pretrain_report.json); the bounds
# leave a margin, and a base that ignores its captions (chance: 1/8 colour, 1/3 shape) or a
# ControlNet that ignores its edges fails them.
COLOUR_ACCURACY_BOUND = 0.85
SHAPE_ACCURACY_BOUND = 0.85
CONTROLNET_IOU_BOUND = 0.75


@pytest.mark.slow
def test_pretrain_script_writes_loadable_folders_and_resumes_by_stage(tmp_path):
    """The command that made the shipped weights, at a few steps: the same kind of output."""
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from safetensors import safe_open

    from slider_cn.shapes.pretrain import main

    small = ["--vae-steps", "3", "--pool-size", "128", "--unet-steps", "3"]
    small += ["--controlnet-steps", "3", "--eval-seeds", "1", "--eval-steps", "2"]
    assert main(["--output", str(tmp_path), "--device", "cpu", *small]) == 0
    report = json.loads((tmp_path / "pretrain_report.json").read_text())
    assert {"colour_accuracy", "shape_accuracy", "controlnet_mask_iou_mean"} <= set(report)
    assert report["settings"]["unet_steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipe.unet.config.addition_embed_type == "text"
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer("a red circle").input_ids
    ControlNetModel.from_pretrained(tmp_path / "canny")
    with safe_open(str(tmp_path / "canny" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["slider_cn.shapes.settings"])["controlnet_steps"] == 3

    assert report["trained_now"] == {"vae": True, "base": True, "controlnet": True}

    # a rerun continues from the saved stages; a changed setting retrains what depends on it
    stages = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    assert set(stages) == {"vae.safetensors", "base.safetensors", "controlnet.safetensors"}
    assert main(["--output", str(tmp_path), "--device", "cpu", *small]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()} == stages
    report = json.loads((tmp_path / "pretrain_report.json").read_text())
    assert report["trained_now"] == {"vae": False, "base": False, "controlnet": False}
    small[small.index("--controlnet-steps") + 1] = "2"
    assert main(["--output", str(tmp_path), "--device", "cpu", *small]) == 0
    report = json.loads((tmp_path / "pretrain_report.json").read_text())
    assert report["trained_now"] == {"vae": False, "base": False, "controlnet": True}
