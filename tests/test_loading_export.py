"""Sliders made by slider-cn in diffusers pipelines, at every strength, and the exports.

Two tiny runs are trained once per module (rank 4, alpha 2, so alpha != rank):
- base side: LoRA-only mode with a frozen ControlNet in the loop;
- ControlNet side: controlnet mode on a fresh ControlNet (saved to the run's controlnet/).
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from safetensors import safe_open

from slider_cn import export_slider, load_slider, load_slider_controlnet, set_slider_strength
from slider_cn.cli import main
from slider_cn.config import ConfigError, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import get_family
from slider_cn.train import train

STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.5)


def _train(root: Path, **overrides):
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    values = {
        "max_train_steps": "3",
        "checkpointing_steps": "100",
        "lora_rank": "4",
        "lora_alpha": "2",
        "learning_rate": "1e-2",  # big enough that strength visibly matters after 3 steps
        **{k: str(v) for k, v in overrides.items()},
    }
    result = train(load_config(paths["config"], values))
    for module in result.components.modules().values():
        module.eval()
    return result


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_run")
    # a ControlNet that exists on disk, frozen in the loop of a LoRA-only run
    family = get_family(load_config(None, {"seed": "0"}))
    controlnet = family.fresh_controlnet(family.load_components().denoiser)
    controlnet.save_pretrained(str(root / "frozen_controlnet"))
    return _train(root / "run", controlnet_model_name_or_path=root / "frozen_controlnet")


@pytest.fixture(scope="module")
def cn_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("cn_run"), training_mode="controlnet")


def frozen_controlnet(result) -> ControlNetModel:
    return ControlNetModel.from_pretrained(str(result.output_dir.parents[1] / "frozen_controlnet"))


def inputs(result):
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 8, 8, generator=generator)
    pixels = torch.rand(1, 3, 64, 64, generator=generator)
    cond = result.family.encode_prompts(result.components, ["a large circle"])
    return noisy, torch.tensor([500]), cond, pixels


@torch.no_grad()
def unet_out(result, denoiser=None, controlnet=None) -> torch.Tensor:
    """The denoiser's prediction with ControlNet residuals, as the training step computes it."""
    components = dataclasses.replace(
        result.components,
        denoiser=denoiser or result.components.denoiser,
        controlnet=controlnet or result.components.controlnet,
    )
    noisy, t, cond, pixels = inputs(result)
    residuals = result.family.controlnet_residuals(components, noisy, t, cond, pixels, 1.0)
    return result.family.predict(components, noisy, t, cond, residuals)


@torch.no_grad()
def controlnet_out(result, controlnet=None) -> torch.Tensor:
    noisy, t, cond, pixels = inputs(result)
    components = dataclasses.replace(
        result.components, controlnet=controlnet or result.components.controlnet
    )
    down, mid = result.family.controlnet_residuals(components, noisy, t, cond, pixels, 1.0).values()
    return torch.cat([r.flatten() for r in [*down, mid]])


def pipeline(run_dir: Path, controlnet) -> StableDiffusionControlNetPipeline:
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(run_dir / "base"), controlnet=controlnet
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_loads_base_slider_and_equals_training_at_each_strength(base_run):
    out = base_run.output_dir
    pipe = pipeline(out, frozen_controlnet(base_run))
    pipe.load_lora_weights(str(out), adapter_name="slider")
    for s in STRENGTHS:
        assert set_slider_strength(pipe, s) == ["unet"]
        with base_run.adapter.multiplier(s):
            expected = unet_out(base_run)
        got = unet_out(base_run, pipe.unet, pipe.controlnet)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the README's plain-diffusers line for a base-side slider sets the same scale
    pipe.set_adapters(["slider"], adapter_weights=[-0.5])
    with base_run.adapter.multiplier(-0.5):
        expected = unet_out(base_run)
    got = unet_out(base_run, pipe.unet, pipe.controlnet)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the equality is not trivial: the slider moves the output
    set_slider_strength(pipe, 0.0)
    at_zero = unet_out(base_run, pipe.unet, pipe.controlnet)
    set_slider_strength(pipe, 1.0)
    assert (unet_out(base_run, pipe.unet, pipe.controlnet) - at_zero).abs().max() > 1e-3


def test_kohya_export_loads_through_diffusers_kohya_path_like_the_peft_file(base_run, tmp_path):
    out = base_run.output_dir
    kohya = export_slider(out, "kohya", output=tmp_path / "slider_kohya.safetensors")
    with safe_open(str(kohya), framework="pt") as handle:
        keys = list(handle.keys())
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        ranks = {handle.get_tensor(k).shape[0] for k in keys if k.endswith(".lora_down.weight")}
    assert alphas == {2.0} and ranks == {4}  # the true alpha, not the rank
    assert all(k.startswith("lora_unet_") for k in keys)

    frozen = frozen_controlnet(base_run)
    peft_pipe, kohya_pipe = pipeline(out, frozen), pipeline(out, frozen)
    trained_kohya_pipe = pipeline(out, frozen)  # the kohya file training itself writes
    peft_pipe.load_lora_weights(str(out), adapter_name="slider")
    kohya_pipe.load_lora_weights(str(tmp_path), weight_name=kohya.name, adapter_name="slider")
    trained_kohya_pipe.load_lora_weights(
        str(out), weight_name="slider_kohya.safetensors", adapter_name="slider"
    )
    for s in (1.0, -0.5):
        for pipe in (peft_pipe, kohya_pipe, trained_kohya_pipe):
            set_slider_strength(pipe, s)
        expected = unet_out(base_run, peft_pipe.unet, frozen)
        for pipe in (kohya_pipe, trained_kohya_pipe):
            got = unet_out(base_run, pipe.unet, frozen)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # a baked strength: the file at 1 behaves like the slider at -0.5
    baked = export_slider(out, "kohya", strength=-0.5, output=tmp_path / "baked.safetensors")
    baked_pipe = pipeline(out, frozen)
    baked_pipe.load_lora_weights(str(tmp_path), weight_name=baked.name, adapter_name="slider")
    torch.testing.assert_close(
        unet_out(base_run, baked_pipe.unet, frozen),
        unet_out(base_run, peft_pipe.unet, frozen),
        rtol=0,
        atol=1e-5,
    )


def test_load_slider_keeps_other_adapters_and_scales_only_the_slider(base_run):
    out = base_run.output_dir
    pipe = pipeline(out, frozen_controlnet(base_run))
    pipe.load_lora_weights(str(out), adapter_name="style")  # any other LoRA the user has
    style_layer = next(m for m in pipe.unet.modules() if "style" in getattr(m, "scaling", {}))
    style_scale = style_layer.scaling["style"]
    assert load_slider(pipe, out, strength=-1.0) == ["unet"]
    assert style_layer.active_adapters == ["style", "slider"]
    # strength x alpha/r, where the file's alpha is r: its lora_B holds the trained alpha/r
    assert style_layer.scaling["slider"] == pytest.approx(-1.0)
    set_slider_strength(pipe, 0.25)
    assert style_layer.scaling["slider"] == pytest.approx(0.25)
    assert style_layer.scaling["style"] == style_scale
    with pytest.raises(ValueError, match="already has an adapter named 'slider'"):
        load_slider(pipe, out)


def test_controlnet_slider_loads_with_load_lora_adapter_prefix_none(cn_run):
    out = cn_run.output_dir
    controlnet = ControlNetModel.from_pretrained(str(out / "controlnet"))
    controlnet.load_lora_adapter(
        str(out / "controlnet_slider.safetensors"), prefix=None, adapter_name="slider"
    )
    for s in STRENGTHS:
        set_slider_strength(controlnet, s)
        with cn_run.adapter.multiplier(s):
            expected = controlnet_out(cn_run)
        torch.testing.assert_close(controlnet_out(cn_run, controlnet), expected, rtol=0, atol=1e-5)
    set_slider_strength(controlnet, 0.0)
    at_zero = controlnet_out(cn_run, controlnet)
    set_slider_strength(controlnet, 1.0)
    assert (controlnet_out(cn_run, controlnet) - at_zero).abs().max() > 1e-4
    # a file path drops the adapter metadata (alpha), a folder + weight_name reads it: the file
    # holds alpha/r in its weights, so both give the trained scale (alpha 2 != rank 4 here)
    other = ControlNetModel.from_pretrained(str(out / "controlnet"))
    other.load_lora_adapter(
        str(out), weight_name="controlnet_slider.safetensors", prefix=None, adapter_name="slider"
    )
    torch.testing.assert_close(
        controlnet_out(cn_run, other), controlnet_out(cn_run, controlnet), rtol=0, atol=1e-6
    )


def test_merged_controlnet_equals_the_controlnet_with_the_adapter(cn_run, tmp_path):
    out, s = cn_run.output_dir, -0.75
    assert (
        main(
            [
                "export",
                "--adapter",
                str(out),
                "--format",
                "merged-controlnet",
                "--strength",
                str(s),
                "--output",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = ControlNetModel.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with cn_run.adapter.multiplier(s):
        expected = controlnet_out(cn_run)
    torch.testing.assert_close(controlnet_out(cn_run, merged), expected, rtol=0, atol=1e-4)
    with cn_run.adapter.multiplier(0.0):
        assert (controlnet_out(cn_run, merged) - controlnet_out(cn_run)).abs().max() > 1e-3


def _image(pipe, **kwargs) -> torch.Tensor:
    from PIL import Image

    return pipe(
        "a large circle",
        image=Image.new("RGB", (64, 64), "white"),
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_strength_helper_reaches_the_controlnet_where_per_call_scale_does_not(cn_run):
    """docs/design.md §8.8: in SD ControlNet pipelines cross_attention_kwargs={"scale": s} reaches
    the UNet only. A ControlNet-side slider at strength 0 must give the plain ControlNet's image."""
    out = cn_run.output_dir
    plain = _image(pipeline(out, load_slider_controlnet(out)))
    pipe = pipeline(out, load_slider_controlnet(out))
    assert load_slider(pipe, out) == ["controlnet"]
    at_one = _image(pipe)
    assert (at_one - plain).abs().max() > 1e-4  # the slider is in the image

    # diffusers' per-call scale leaves the ControlNet's slider at full strength
    torch.testing.assert_close(_image(pipe, cross_attention_kwargs={"scale": 0.0}), at_one)
    # the helper reaches it: strength 0 is exactly the plain ControlNet
    assert set_slider_strength(pipe, 0.0) == ["controlnet"]
    torch.testing.assert_close(_image(pipe), plain, rtol=0, atol=1e-6)
    # the README's plain-diffusers line for the ControlNet does the same
    pipe.controlnet.set_adapters(["slider"], [0.0])
    torch.testing.assert_close(_image(pipe), plain, rtol=0, atol=1e-6)
    set_slider_strength(pipe, -1.0)  # negative strengths reach it too
    at_minus = _image(pipe)
    assert (at_minus - plain).abs().max() > 1e-4 and (at_minus - at_one).abs().max() > 1e-4


def test_export_formats_and_refusals(base_run, cn_run, tmp_path, capsys):
    out = base_run.output_dir
    path = export_slider(out, "diffusers", strength=0.5, output=tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["slider_cn.exported_strength"] == "0.5"
        assert "lora_adapter_metadata" in handle.metadata()  # rank/alpha for diffusers
    with pytest.raises(ConfigError, match="ControlNet-side slider.*merged-controlnet"):
        export_slider(cn_run.output_dir, "kohya")
    with pytest.raises(ConfigError, match="base-side slider"):
        export_slider(out, "merged-controlnet")
    assert main(["export", "--adapter", str(tmp_path / "nowhere"), "--format", "kohya"]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_lycoris_slider_loads_into_a_pipeline_and_rebuilds_from_its_file(tmp_path):
    from diffusers import StableDiffusionPipeline

    from slider_cn.validate import rebuild_run

    lokr = Path(__file__).parents[1] / "configs" / "lycoris_config.json"
    result = _train(tmp_path, lora_type="lycoris", lycoris_config=lokr)
    out = result.output_dir
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "base"))
    assert load_slider(pipe, out) == ["unet"]
    rebuilt = rebuild_run(
        load_config(out.parent / "config.json", {"lycoris_config": str(lokr)}), out
    )
    noisy, t, cond, _ = inputs(result)

    @torch.no_grad()
    def predict(denoiser):
        components = dataclasses.replace(result.components, denoiser=denoiser)
        return result.family.predict(components, noisy, t, cond)

    for s in (-1.0, 0.5):
        set_slider_strength(pipe, s)
        with result.adapter.multiplier(s):
            expected = predict(result.components.denoiser)
        torch.testing.assert_close(predict(pipe.unet), expected, rtol=0, atol=1e-5)
        with rebuilt.adapter.multiplier(s):
            torch.testing.assert_close(
                predict(rebuilt.components.denoiser), expected, rtol=0, atol=1e-5
            )
    with pytest.raises(ConfigError, match="LyCORIS slider"):
        export_slider(out, "merged-controlnet")
