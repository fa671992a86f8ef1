"""The recipe's pieces: Trainables (checkpoint keys, round trip) and SliderRecipe's steps."""

import json
import logging
from pathlib import Path

import pytest
import torch

from slider_cn.config import load_config
from slider_cn.demo_data import write_demo_dataset
from slider_cn.recipe import SliderRecipe
from slider_cn.trainables import Trainables


def make_config(root: Path, **overrides):
    paths = write_demo_dataset(root, images_per_group=2, resolution=64, conditioning="folders")
    values = {"max_train_steps": "3", "checkpointing_steps": "100"}
    return load_config(paths["config"], {**values, **{k: str(v) for k, v in overrides.items()}})


def fresh_controlnet_trainables(config) -> Trainables:
    """A slider on a fresh ControlNet, with its output projections, as training builds it."""
    from slider_cn.adapters import attach_slider_adapter
    from slider_cn.families import get_family
    from slider_cn.targets import controlnet_output_projections, resolve_targets

    family = get_family(config)
    components = family.load_components()
    controlnet = components.controlnet
    assert components.controlnet_is_fresh
    names = resolve_targets(
        controlnet, family.name, side="controlnet", exclude_shared_with=components.denoiser
    ).names
    torch.manual_seed(0)
    adapter = attach_slider_adapter(controlnet, names, config)
    projections = controlnet_output_projections(controlnet, family.name)
    return Trainables(adapter, controlnet, projections)


def test_trainables_keys_are_the_checkpoint_keys(tmp_path):
    config = make_config(tmp_path / "run", training_mode="controlnet")
    trainables = fresh_controlnet_trainables(config)
    state = trainables.state_dict()
    # the layout checkpoints have always had: adapter.<its key>, projection.<layer>.<parameter>
    modules = dict(trainables.model.named_modules())
    expected = {f"adapter.{k}" for k in trainables.adapter.state_dict()} | {
        f"projection.{name}.{pname}"
        for name in trainables.projection_names
        for pname, _ in modules[name].named_parameters()
    }
    assert set(state) == expected
    assert any(k.startswith("projection.") for k in state)
    # the projections train in full, after the adapter's parameters
    params = trainables.parameters()
    adapter_params = trainables.adapter.trainable_parameters()
    assert params[: len(adapter_params)] == adapter_params
    assert len(params) > len(adapter_params) and all(p.requires_grad for p in params)


def test_trainables_state_dict_round_trip(tmp_path):
    config = make_config(tmp_path / "run", training_mode="controlnet")
    source = fresh_controlnet_trainables(config)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.1)
    saved = {k: v.detach().clone() for k, v in source.state_dict().items()}

    target = fresh_controlnet_trainables(config)
    assert any(not torch.equal(saved[k], v) for k, v in target.state_dict().items())
    target.load_state_dict(saved)
    loaded = target.state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key

    with pytest.raises(KeyError):  # a projection missing
        target.load_state_dict({k: v for k, v in saved.items() if not k.startswith("projection.")})
    with pytest.raises(ValueError, match="unexpected"):  # weights of another run
        target.load_state_dict({**saved, "projection.elsewhere.weight": torch.zeros(1)})


def test_recipe_setup_then_one_micro_batch(tmp_path, caplog):
    """What the benchmarks use: setup, then train_micro_batch on the sampler's first plan."""
    config = make_config(tmp_path / "run")
    recipe = SliderRecipe(config)
    with caplog.at_level(logging.INFO, logger="slider_cn.train"):
        recipe.setup()
    assert "mixed_precision no (auto) on cpu" in caplog.text
    assert recipe.max_steps == 3 and recipe.global_step == 0
    plan, step, inputs = next(recipe._micro_batches())
    before = [p.detach().clone() for p in recipe.params]
    record = recipe.train_micro_batch(plan, step, inputs)
    assert record["step"] == 1 and record["backend"] == plan.backend
    assert record["files"] == [str(f) for f in plan.files]
    json.dumps(record)  # a train_log line
    assert any(not torch.equal(a, b) for a, b in zip(before, recipe.params, strict=True))
    recipe.cleanup()


def test_recipe_train_and_save(tmp_path):
    config = make_config(tmp_path / "run", max_train_steps=2, checkpointing_steps=1)
    recipe = SliderRecipe(config)
    try:
        recipe.setup()
        recipe.train()
        result = recipe.save()
    finally:
        recipe.cleanup()
    assert result.steps == 2 and recipe.global_step == 2
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert result.files and all(Path(p).exists() for p in result.files.values())
