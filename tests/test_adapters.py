"""The slider adapter's scale control, assistant adapters, and LyCORIS presets on a tiny UNet."""

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from tiny_models import controlnet_for, unet_sd1x

from slider_cn.adapters import (
    ASSISTANT_ADAPTER,
    SLIDER_ADAPTER,
    attach_slider_adapter,
    load_assistant_adapter,
)
from slider_cn.config import ConfigError, TrainConfig
from slider_cn.families import family_class
from slider_cn.targets import matches, resolve_targets

ROOT = Path(__file__).parents[1]
GUIDE_PRESET = ROOT / "configs" / "lycoris_config.json"
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # slider and assistant
STRENGTH = 0.7
# the family whose LoRA loader reads the kohya files (the tiny UNet is an SD1.x one)
SD1X = family_class("sd1x")(TrainConfig())


def unet_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
    }


@torch.no_grad()
def run(model) -> torch.Tensor:
    return model(**unet_inputs()).sample


def randomise(params, seed: int = 3) -> None:
    # Adapters start as the identity (one factor zero); give them weights to see.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def slider_config(**extra) -> TrainConfig:
    return TrainConfig(lora_rank=4, lora_alpha=2, **extra)


def with_slider(model, config: TrainConfig | None = None):
    names = resolve_targets(model, "sd1x").names
    adapter = attach_slider_adapter(model, names, config or slider_config())
    randomise(adapter.trainable_parameters())
    return adapter


@pytest.fixture(scope="module")
def assistant_files(tmp_path_factory):
    """The same random LoRA written as diffusers/PEFT and as kohya files, and its reference
    output on the tiny UNet at STRENGTH."""
    folder = tmp_path_factory.mktemp("assistant")
    source = unet_sd1x().eval()
    source.add_adapter(
        LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        adapter_name="default",
    )
    randomise([p for n, p in source.named_parameters() if "lora_" in n], seed=7)
    source.save_lora_adapter(folder / "diffusers")  # bare keys, config in the metadata
    kohya = {}
    for key, value in get_peft_model_state_dict(source, adapter_name="default").items():
        module, kind = key.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(2.0)  # true alpha, not the rank
    save_file(kohya, str(folder / "kohya.safetensors"))
    for layer in source.modules():
        if hasattr(layer, "set_scale"):
            layer.set_scale("default", STRENGTH)
    return {
        "diffusers": folder / "diffusers",
        "kohya": folder / "kohya.safetensors",
        "reference": run(source),
        "base": run(unet_sd1x().eval()),
    }


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_assistant_loads_diffusers_and_kohya_files_at_its_strength(assistant_files, fmt):
    model = unet_sd1x().eval()
    assistant = load_assistant_adapter(model, assistant_files[fmt], STRENGTH, family=SD1X)
    assert assistant.layers and assistant.strength == STRENGTH
    out = run(model)
    torch.testing.assert_close(out, assistant_files["reference"], rtol=0, atol=1e-6)
    assert not torch.allclose(out, assistant_files["base"])
    assert not any(p.requires_grad for p in assistant.parameters())


def test_peft_scale_control_is_symmetric_spares_the_assistant_and_restores_exactly(
    assistant_files,
):
    model = unet_sd1x().eval()
    assistant = load_assistant_adapter(model, assistant_files["diffusers"], STRENGTH, family=SD1X)
    slider = with_slider(model)
    assert slider.kind == "peft" and slider.rank == 4 and slider.alpha == 2.0
    layer = model.get_submodule(LAYER)
    assert set(layer.active_adapters) == {ASSISTANT_ADAPTER, SLIDER_ADAPTER}
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))

    def layer_out() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    assistant_scale = layer.scaling[ASSISTANT_ADAPTER]
    with slider.multiplier(0.0):
        base = layer_out()
    for s in (0.5, 1.0, 2.5):
        with slider.multiplier(s):
            plus = layer_out()
            assert layer.scaling[ASSISTANT_ADAPTER] == assistant_scale
        with slider.multiplier(-s):
            minus = layer_out()
            assert layer.scaling[ASSISTANT_ADAPTER] == assistant_scale
        assert (plus - base).abs().max() > 1e-4
        torch.testing.assert_close(plus - base, -(minus - base), rtol=0, atol=1e-6)

    # With the slider at 0 the model is exactly base + assistant: scaling never touched it.
    with slider.multiplier(0.0):
        assistant_only = unet_sd1x().eval()
        load_assistant_adapter(assistant_only, assistant_files["diffusers"], STRENGTH, family=SD1X)
        assert torch.equal(run(model), run(assistant_only))

    # The previous scale comes back bit-exactly, PEFT's alpha/r included, even nested.
    before = [dict(m.scaling) for m in slider.layers]
    out_before = run(model)
    slider.set_multiplier(0.3)
    with slider.multiplier(-1.7):
        with slider.multiplier(2.0):
            assert slider.get_multiplier() == 2.0
        assert slider.get_multiplier() == -1.7
    assert slider.get_multiplier() == 0.3
    slider.set_multiplier(1.0)
    assert [dict(m.scaling) for m in slider.layers] == before
    assert torch.equal(run(model), out_before)
    assert assistant.strength == STRENGTH


def test_slider_and_assistant_in_either_order(assistant_files):
    # Slider first, assistant second: both stay active, only the slider trains.
    model = unet_sd1x().eval()
    slider = with_slider(model)
    slider_only = run(model)
    assistant = load_assistant_adapter(model, assistant_files["kohya"], STRENGTH, family=SD1X)
    assert not torch.allclose(run(model), slider_only)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in slider.trainable_parameters()}
    assert not any(p.requires_grad for p in assistant.parameters())

    # The slider's state dict holds only slider weights.
    state = slider.state_dict()
    assert len(state) == 2 * len(slider.target_names)
    assistant_ptrs = {p.data_ptr() for p in assistant.parameters()}
    assert not any(t.data_ptr() in assistant_ptrs for t in state.values())

    # Validation may move the assistant's strength; the context restores it.
    with assistant.strength_as(0.0):
        with slider.multiplier(1.0):
            torch.testing.assert_close(run(model), slider_only, rtol=0, atol=1e-6)
    assert assistant.strength == STRENGTH


def test_peft_targets_are_exact_names():
    # "conv_in" must not also adapt controlnet_cond_embedding.conv_in (PEFT matches suffixes
    # when given a list).
    controlnet, _ = controlnet_for("sd1x")
    adapter = attach_slider_adapter(controlnet, ["conv_in"], slider_config())
    assert len(adapter.layers) == 1
    assert not hasattr(controlnet.controlnet_cond_embedding.conv_in, "lora_A")


@pytest.mark.parametrize("lora_type", ["standard", "lycoris"])
def test_slider_state_dict_round_trip(lora_type):
    config = (
        slider_config()
        if lora_type == "standard"
        else TrainConfig(lora_type="lycoris", lycoris_config=str(GUIDE_PRESET))
    )
    first = unet_sd1x().eval()
    adapter = with_slider(first, config)
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    second = unet_sd1x().eval()
    other = attach_slider_adapter(second, resolve_targets(second, "sd1x").names, config)
    assert not torch.allclose(run(first), run(second))
    other.load_state_dict(state)
    torch.testing.assert_close(run(first), run(second), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({"nope": torch.zeros(1)})


# --- LyCORIS -----------------------------------------------------------------------------
def _guide_names(names: list[str]) -> list[str]:
    preset = json.loads(GUIDE_PRESET.read_text())["apply_preset"]["target_module"]
    return [n for n in names if any(matches(p, n) for p in preset)]


def test_guide_lokr_preset_adapts_the_intended_modules(caplog):
    from lycoris import LycorisNetwork, create_lycoris

    preset = json.loads(GUIDE_PRESET.read_text())
    assert preset["algo"] == "lokr" and preset["linear_dim"] == 4 and preset["linear_alpha"] == 1

    # As written, the guide's preset puts module paths in a class-name field: LyCORIS on its
    # own adapts nothing (docs/design.md §8.5).
    raw = unet_sd1x()
    LycorisNetwork.apply_preset(preset["apply_preset"])
    try:
        assert len(create_lycoris(raw, 1.0, 4, 1, algo="lokr", factor=16).loras) == 0
    finally:
        from slider_cn.adapters import reset_lycoris_preset_state

        reset_lycoris_preset_state()

    model = unet_sd1x().eval()
    slider_names = resolve_targets(model, "sd1x").names
    config = TrainConfig(lora_type="lycoris", lycoris_config=str(GUIDE_PRESET))
    with caplog.at_level(logging.WARNING, logger="slider_cn.adapters"):
        adapter = attach_slider_adapter(model, slider_names, config)
    assert "Moved to apply_preset.target_name" in caplog.text
    intended = _guide_names(slider_names)
    assert len(intended) == 20  # 16 self-attention projections, conv in/out, time MLP
    assert adapter.target_names == intended
    assert len(adapter.network.loras) == len(intended)
    assert {type(lora).__name__ for lora in adapter.network.loras} == {"LokrModule"}
    assert adapter.kind == "lycoris" and adapter.algo == "lokr"
    assert (adapter.rank, adapter.alpha) == (4, 1.0)
    assert adapter.trainable_parameters()
    # The class-level preset did not leak out of the build.
    assert LycorisNetwork.TARGET_REPLACE_NAME == [] and LycorisNetwork.TARGET_REPLACE_MODULE == []

    # Without resolved names the preset alone decides, with the same result here; with a
    # smaller target list the adapter is restricted to it.
    alone = attach_slider_adapter(unet_sd1x(), None, config)
    assert alone.target_names == intended
    subset = [n for n in slider_names if n.endswith("attn1.to_q")]
    assert attach_slider_adapter(unet_sd1x(), subset, config).target_names == subset


def test_lycoris_scale_control_with_an_assistant(assistant_files):
    model = unet_sd1x().eval()
    load_assistant_adapter(model, assistant_files["diffusers"], STRENGTH, family=SD1X)
    config = TrainConfig(lora_type="lycoris", lycoris_config=str(GUIDE_PRESET))
    slider = with_slider(model, config)
    assert LAYER in slider.target_names
    layer = model.get_submodule(LAYER)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))

    def layer_out() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    assistant_scale = layer.scaling[ASSISTANT_ADAPTER]
    with slider.multiplier(0.0):
        base = layer_out()
        assistant_only = unet_sd1x().eval()
        load_assistant_adapter(assistant_only, assistant_files["diffusers"], STRENGTH, family=SD1X)
        assert torch.equal(run(model), run(assistant_only))
    for s in (0.5, 2.0):
        with slider.multiplier(s):
            plus = layer_out()
        with slider.multiplier(-s):
            minus = layer_out()
        assert layer.scaling[ASSISTANT_ADAPTER] == assistant_scale
        assert (plus - base).abs().max() > 1e-4
        torch.testing.assert_close(plus - base, -(minus - base), rtol=0, atol=1e-5)

    before = [lora.multiplier for lora in slider.network.loras]
    out_before = run(model)
    with slider.multiplier(-1.25):
        pass
    assert [lora.multiplier for lora in slider.network.loras] == before
    assert torch.equal(run(model), out_before)
    # State dict keys do not depend on the assistant having wrapped the layer first.
    assert not any("base_layer" in key for key in slider.state_dict())


def test_lycoris_full_algorithm(tmp_path):
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"algo": "full"}))
    model = unet_sd1x().eval()
    names = resolve_targets(model, "sd1x").names
    adapter = attach_slider_adapter(
        model, names, TrainConfig(lora_type="lycoris", lycoris_config=str(path))
    )
    assert adapter.algo == "full" and adapter.rank is None
    assert adapter.target_names == names  # no apply_preset: every resolved target
    layer = model.get_submodule(LAYER)
    with torch.no_grad():
        adapter.network.loras[names.index(LAYER)].weight.add_(0.05)
    x = torch.randn(3, 32)
    with torch.no_grad(), adapter.multiplier(0.0):
        base = layer(x)
    with torch.no_grad(), adapter.multiplier(1.5):
        plus = layer(x)
    with torch.no_grad(), adapter.multiplier(-1.5):
        minus = layer(x)
    assert (plus - base).abs().max() > 1e-3
    torch.testing.assert_close(plus - base, -(minus - base), rtol=0, atol=1e-5)


def test_lycoris_config_errors(tmp_path):
    def config_for(content: dict) -> TrainConfig:
        path = tmp_path / "lyco.json"
        path.write_text(json.dumps(content))
        return TrainConfig(lora_type="lycoris", lycoris_config=str(path))

    model = unet_sd1x()
    names = resolve_targets(model, "sd1x").names
    with pytest.raises(ConfigError, match="unknown key 'linear_dimm'.*did you mean 'linear_dim'"):
        attach_slider_adapter(model, names, config_for({"algo": "lokr", "linear_dimm": 4}))
    with pytest.raises(ConfigError, match="unknown LyCORIS algorithm 'lokrr'"):
        attach_slider_adapter(model, names, config_for({"algo": "lokrr"}))
    with pytest.raises(ConfigError, match="selects none"):
        attach_slider_adapter(
            model, names, config_for({"algo": "lokr", "apply_preset": {"target_name": ["^nope$"]}})
        )


@pytest.mark.parametrize("lora_type", ["standard", "lycoris"])
def test_backward_reaches_the_slider_and_not_the_assistant(assistant_files, lora_type):
    config = (
        slider_config()
        if lora_type == "standard"
        else TrainConfig(lora_type="lycoris", lycoris_config=str(GUIDE_PRESET))
    )
    model = unet_sd1x().train()
    assistant = load_assistant_adapter(model, assistant_files["diffusers"], STRENGTH, family=SD1X)
    slider = with_slider(model, config)
    with slider.multiplier(-0.5):
        model(**unet_inputs()).sample.square().mean().backward()
    grads = [p.grad for p in slider.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in assistant.parameters())
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)


def test_switched_off_skips_slider_layers_keeps_the_assistant_and_restores(assistant_files):
    """The preserve step's frozen-base forward: the same output as multiplier 0, but layers
    that carry only the slider do not compute it; layers shared with an assistant do."""
    model = unet_sd1x().eval()
    assistant = load_assistant_adapter(model, assistant_files["diffusers"], STRENGTH, family=SD1X)
    slider = with_slider(model)
    ran: list[int] = []
    for layer in slider.layers:
        layer.lora_A[SLIDER_ADAPTER].register_forward_hook(lambda m, *_: ran.append(id(m)))
    shared = {
        id(layer.lora_A[SLIDER_ADAPTER])
        for layer in slider.layers
        if ASSISTANT_ADAPTER in layer.lora_A
    }
    assert 0 < len(shared) < len(slider.layers)
    trainable = [p.requires_grad for p in model.parameters()]
    with slider.multiplier(0.0):
        expected = run(model)
    assert len(ran) == len(slider.layers)  # multiplier 0 alone still computes every layer

    ran.clear()
    slider.set_multiplier(0.5)
    with slider.switched_off():
        assert slider.get_multiplier() == 0.0
        out = run(model)
    assert set(ran) == shared
    assert torch.equal(out, expected)
    assistant_only = unet_sd1x().eval()
    load_assistant_adapter(assistant_only, assistant_files["diffusers"], STRENGTH, family=SD1X)
    assert torch.equal(out, run(assistant_only))
    assert assistant.strength == STRENGTH

    # Everything comes back, also when the block fails; gradients still reach the slider.
    with pytest.raises(RuntimeError), slider.switched_off():
        raise RuntimeError("inside")
    assert slider.get_multiplier() == 0.5
    assert not any(layer._disable_adapters for layer in slider.layers)
    assert [p.requires_grad for p in model.parameters()] == trainable
    model(**unet_inputs()).sample.square().mean().backward()
    assert all(p.grad is not None for p in slider.trainable_parameters())


def test_switched_off_without_assistant_is_the_base_model(assistant_files):
    model = unet_sd1x().eval()
    slider = with_slider(model)
    ran: list[int] = []
    for layer in slider.layers:
        layer.lora_A[SLIDER_ADAPTER].register_forward_hook(lambda m, *_: ran.append(1))
    with slider.switched_off():
        out = run(model)
    assert not ran
    assert torch.equal(out, assistant_files["base"])
    assert not torch.equal(run(model), out)
