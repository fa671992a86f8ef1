"""Validation: the prompt library, images and strength-sweep grids, scales restored afterwards."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image

from slider_cn.adapters import attach_slider_adapter, load_assistant_adapter
from slider_cn.cli import main
from slider_cn.config import ConfigError, load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.families import get_family
from slider_cn.targets import resolve_targets
from slider_cn.train import train
from slider_cn.validate import (
    DEFAULT_STRENGTHS,
    ValidationPrompt,
    check_validation_config,
    parse_strengths,
    prompt_library,
    run_validation,
)

TILE = 64


def write_library(path: Path, library) -> Path:
    path.write_text(json.dumps(library), encoding="utf-8")
    return path


def tiles(grid_path: Path, count: int) -> list[np.ndarray]:
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    band = grid.shape[0] - TILE
    assert grid.shape[1] == count * TILE and band > 0  # one tile per strength, labels above
    return [grid[band:, i * TILE : (i + 1) * TILE] for i in range(count)]


def randomise_slider(adapter, std: float = 0.3, seed: int = 1) -> None:
    """Give the slider weights a visible effect (a fresh adapter's lora_B is zero)."""
    generator = torch.Generator().manual_seed(seed)
    for p in adapter.trainable_parameters():
        p.data = torch.randn(p.shape, generator=generator) * std


def open_controlnet(family, components) -> None:
    """A fresh ControlNet's output projections are zero (no residuals at all): open them."""
    from slider_cn.targets import controlnet_output_projections

    modules = dict(components.controlnet.named_modules())
    generator = torch.Generator().manual_seed(2)
    for name in controlnet_output_projections(components.controlnet, family.name):
        for p in modules[name].parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.1


def scales(adapter) -> list[float]:
    return [layer.scaling["slider"] for layer in adapter.layers]


# --- the prompt library ------------------------------------------------------------------
def test_prompt_library_strings_objects_and_default_strength(tmp_path):
    lib = write_library(
        tmp_path / "lib.json",
        {"smile": "a smiling face", "strong": {"prompt": "a face", "adapter_strength": 1.2}},
    )
    config = load_config(
        None, {"user_prompt_library": str(lib), "validation_adapter_strength": "0.8"}
    )
    assert prompt_library(config) == [
        ValidationPrompt("smile", "a smiling face", 0.8),
        ValidationPrompt("strong", "a face", 1.2),
    ]
    only = load_config(None, {"validation_prompt": "a cat"})
    assert prompt_library(only) == [ValidationPrompt("validation", "a cat", 1.0)]


@pytest.mark.parametrize(
    "library,message",
    [
        ([], "must be a non-empty JSON object"),
        ({"a": {"prompt": "x", "adapter_strenght": 1}}, "did you mean 'adapter_strength'"),
        ({"a": {"prompt": "x", "adapter_strength": "high"}}, "adapter_strength must be a number"),
        ({"a": {"adapter_strength": 1}}, 'needs a non-empty "prompt"'),
        ({"a": 3}, "expected a prompt string"),
    ],
)
def test_malformed_prompt_library_is_a_clear_error(tmp_path, library, message):
    lib = write_library(tmp_path / "lib.json", library)
    with pytest.raises(ConfigError, match=message) as info:
        prompt_library(load_config(None, {"user_prompt_library": str(lib)}))
    assert str(lib) in str(info.value)


def test_no_prompt_and_bad_strengths_are_clear_errors():
    with pytest.raises(ConfigError, match="user_prompt_library.*validation_prompt"):
        prompt_library(load_config(None, {}))
    assert parse_strengths("-1, 0,0.5") == [-1.0, 0.0, 0.5]
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_strengths("low,high")


def test_controlnet_validation_without_conditioning_image_fails_before_training(tmp_path):
    paths = write_demo_dataset(tmp_path, images_per_group=1, conditioning="folders")
    config = load_config(
        paths["config"],
        {"training_mode": "controlnet", "validation_steps": "1", "validation_prompt": "x"},
    )
    with pytest.raises(ConfigError, match="validation_conditioning_image"):
        check_validation_config(config)


# --- images, grids and scales ------------------------------------------------------------
@pytest.mark.parametrize("side", ["denoiser", "controlnet"])
def test_validation_writes_images_and_sweeps_and_restores_the_multiplier(tmp_path, side):
    paths = write_demo_dataset(tmp_path / "data", images_per_group=1, conditioning="folders")
    lib = write_library(
        tmp_path / "lib.json",
        {"big circle": "a large circle", "square": {"prompt": "a square", "adapter_strength": 0.7}},
    )
    config = load_config(
        paths["config"],
        {
            "training_mode": "controlnet" if side == "controlnet" else "lora",
            "user_prompt_library": str(lib),
            "validation_num_inference_steps": "2",
            "validation_conditioning_image": str(paths["plus_edges"] / "plus_000.png"),
        },
    )
    family = get_family(config)
    components = family.load_components()
    trainable = components.controlnet if side == "controlnet" else components.denoiser
    names = resolve_targets(
        trainable,
        family.name,
        side=side,
        exclude_shared_with=components.denoiser if side == "controlnet" else None,
    ).names
    adapter = attach_slider_adapter(trainable, names, config)
    randomise_slider(adapter)
    if side == "controlnet":
        open_controlnet(family, components)
    trainable.train()
    adapter.set_multiplier(0.3)  # as if training had left it anywhere but 1
    before = scales(adapter)

    result = run_validation(family, components, adapter, config, tmp_path / "val")

    assert adapter.get_multiplier() == 0.3 and scales(adapter) == before  # bit for bit
    assert trainable.training
    assert set(result.images) == set(result.grids) == {"big circle", "square"}
    for name in result.images:
        assert result.images[name].is_file() and result.grids[name].is_file()
        sweep = tiles(result.grids[name], len(DEFAULT_STRENGTHS))
        for left, right in zip(sweep, sweep[1:], strict=False):
            assert np.abs(left.astype(int) - right.astype(int)).max() > 0  # the slider is seen
    # same seed at every strength: the prompt's own image is its tile in the sweep
    big = np.asarray(Image.open(result.images["big circle"]).convert("RGB"))
    assert np.array_equal(big, tiles(result.grids["big circle"], 5)[DEFAULT_STRENGTHS.index(1.0)])
    square = np.asarray(Image.open(result.images["square"]).convert("RGB"))
    assert not any(np.array_equal(square, t) for t in tiles(result.grids["square"], 5))
    index = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert [p["adapter_strength"] for p in index["prompts"]] == [1.0, 0.7]


def _assistant_file(family, folder: Path) -> Path:
    source = family.load_components().denoiser
    source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(5)
    for name, p in source.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    source.save_lora_adapter(str(folder))
    return folder


def test_assistant_runs_at_its_inference_strength_and_comes_back(tmp_path):
    config = load_config(
        None,
        {
            "validation_prompt": "a large circle",
            "validation_num_inference_steps": "2",
            "resolution": "64",
            "assistant_lora_inference_strength": "0",
        },
    )
    family = get_family(config)
    assistant_dir = _assistant_file(family, tmp_path / "assistant")

    def slider_model(with_assistant: bool):
        components = family.load_components()
        assistant = None
        if with_assistant:
            assistant = load_assistant_adapter(
                components.denoiser, assistant_dir, 1.0, family=family
            )
        names = resolve_targets(components.denoiser, family.name).names
        adapter = attach_slider_adapter(components.denoiser, names, config)
        randomise_slider(adapter)
        return components, adapter, assistant

    components, adapter, assistant = slider_model(True)
    assistant_scales = [layer.scaling["assistant"] for layer in assistant.layers]
    with_it = run_validation(
        family, components, adapter, config, tmp_path / "a", strengths=[-1, 1], assistant=assistant
    )
    assert assistant.strength == 1.0
    assert [layer.scaling["assistant"] for layer in assistant.layers] == assistant_scales

    components, adapter, _ = slider_model(False)
    without = run_validation(family, components, adapter, config, tmp_path / "b", strengths=[-1, 1])
    # assistant at 0 during validation: the images are the slider's alone
    for name in with_it.grids:
        a = np.asarray(Image.open(with_it.grids[name]))
        b = np.asarray(Image.open(without.grids[name]))
        assert np.array_equal(a, b)


# --- during training and from the command line -------------------------------------------
def test_validation_during_training_leaves_training_unchanged_and_cli_reproduces_it(tmp_path):
    """docs/design.md §8.6: after validating at strengths other than 1, training goes on exactly as
    a run without validation does."""
    paths = write_demo_dataset(tmp_path / "data", images_per_group=2)
    common = {
        "max_train_steps": "2",
        "checkpointing_steps": "100",
        "learning_rate": "1e-2",
        "validation_prompt": "a large circle",
        "validation_num_inference_steps": "2",
    }
    plain = load_config(paths["config"], {**common, "output_dir": str(tmp_path / "plain")})
    validated = load_config(
        paths["config"],
        {**common, "output_dir": str(tmp_path / "validated"), "validation_steps": "1"},
    )
    train(plain)
    result = train(validated)

    def losses(config):
        lines = (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses(validated) == losses(plain)
    for step in (1, 2):
        folder = result.output_dir / "validation" / f"step-{step:06d}"
        assert (folder / "validation.png").is_file()
        assert (folder / "validation_sweep.png").is_file()

    # slider-cn validate rebuilds the run from its files and draws the same images
    args = ["validate", "--config", str(paths["config"]), "--adapter", str(result.output_dir)]
    overrides = ["--validation_prompt", "a large circle", "--validation_num_inference_steps", "2"]
    assert main([*args, *overrides, "--output", str(tmp_path / "cli")]) == 0
    final = result.output_dir / "validation" / "step-000002"
    for name in ("validation.png", "validation_sweep.png"):
        assert np.array_equal(
            np.asarray(Image.open(final / name)), np.asarray(Image.open(tmp_path / "cli" / name))
        )
    assert main([*args, *overrides, "--strengths", "up,down"]) == 2


def test_sdxl_controlnet_validation(tmp_path):
    paths = write_demo_dataset(tmp_path / "data", images_per_group=1, conditioning="folders")
    config = load_config(
        paths["config"],
        {
            "model_family": "sdxl",
            "training_mode": "controlnet",
            "validation_prompt": "a large circle",
            "validation_num_inference_steps": "2",
            "validation_conditioning_image": str(paths["plus_edges"] / "plus_000.png"),
        },
    )
    family = get_family(config)
    components = family.load_components()
    names = resolve_targets(
        components.controlnet,
        family.name,
        side="controlnet",
        exclude_shared_with=components.denoiser,
    ).names
    adapter = attach_slider_adapter(components.controlnet, names, config)
    randomise_slider(adapter)
    open_controlnet(family, components)
    result = run_validation(family, components, adapter, config, tmp_path / "v", strengths=[0, 1])
    left, right = tiles(result.grids["validation"], 2)
    assert np.abs(left.astype(int) - right.astype(int)).max() > 0
