"""Slider targets resolved on tiny instances of the real diffusers classes."""

import pytest
import torch
from tiny_models import CONTROLNET_ARCHS, DENOISER_ARCH, DENOISERS, controlnet_for

from slider_cn.config import ConfigError
from slider_cn.targets import (
    GUIDE_GENERAL,
    adaptable_modules,
    architectures,
    controlnet_output_projections,
    get_architecture,
    matches,
    resolve_targets,
)

# Written independently of slider_cn.targets.NEVER_SLIDER: module-path components that belong
# to cross-attention or to a text/context stream in some diffusers class.
TEXT_OR_CROSS_COMPONENTS = {
    "attn2",
    "cross_attention",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "context_embedder",
    "context_refiner",
    "caption_projection",
    "caption_embedder",
    "cap_embedder",
    "text_embedder",
    "ff_context",
    "norm1_context",
    "add_embedding",
    "kv_mapper",
    "to_q_t",
    "to_k_t",
    "to_v_t",
    "to_out_t",
    "ff_t",
    "p_embedder",
    "pooled_text_embeddings",
    "text_embeddings",
    "image_embedder",
    "clip_txt_mapper",
    "clip_txt_pooled_mapper",
}


def text_or_cross(name: str) -> bool:
    parts = name.split(".")
    return any(p in TEXT_OR_CROSS_COMPONENTS or p.startswith(("txt_", "text_")) for p in parts)


# One self-attention projection each slider list must contain (by name suffix).
SELF_ATTENTION = {
    "sd1x": "attn1.to_q",
    "sdxl": "attn1.to_q",
    "sd3": "attn.to_q",
    "flux": "single_transformer_blocks.0.attn.to_q",
    "flux2": "attn.to_qkv_mlp_proj",
    "chroma": "transformer_blocks.0.attn.to_q",
    "auraflow": "single_transformer_blocks.0.attn.to_q",
    "lumina2": "layers.0.attn.to_q",
    "wan": "attn1.to_q",
    "hidream": "double_stream_blocks.0.block.attn1.to_q",
    "ltxvideo": "attn1.to_q",
    "qwenimage": "attn.to_q",
    "cosmos": "attn1.to_q",
    "stable_cascade": "attention.to_q",
    "kandinsky5": "visual_transformer_blocks.0.self_attention.to_query",
    "zimage": "layers.0.attention.to_q",
    "sana": "attn1.to_q",
    "pixart": "attn1.to_q",
}

ISSUE_ARCHITECTURES = {
    "sd1x",
    "sdxl",
    "sd3",
    "flux",
    "flux2",
    "chroma",
    "auraflow",
    "lumina2",
    "wan",
    "hidream",
    "ltxvideo",
    "qwenimage",
    "cosmos",
    "stable_cascade",
    "kandinsky5",
    "zimage",
    "sana",
    "pixart",
}


def test_registry_covers_every_architecture_and_each_has_a_tiny_model():
    assert set(architectures()) == ISSUE_ARCHITECTURES
    tested = {DENOISER_ARCH.get(key, key) for key in DENOISERS}
    assert tested == ISSUE_ARCHITECTURES
    with_controlnet = {name for name, arch in architectures().items() if arch.has_controlnet}
    assert with_controlnet == set(CONTROLNET_ARCHS)
    assert with_controlnet == {"sd1x", "sdxl", "sd3", "flux", "qwenimage", "sana", "zimage"}


def test_families_map_to_architectures():
    from slider_cn.families import family_class, family_names

    for family in family_names():
        # a family's own file holds its lists, under the family's name and classes
        arch = get_architecture(family)
        cls = family_class(family)
        assert arch.name == family and arch.slider == cls.targets.slider
        assert arch.denoiser_classes == (cls.denoiser_model_class.__name__,)
        expected = (cls.controlnet_model_class.__name__,) if cls.has_controlnet() else ()
        assert arch.controlnet_classes == expected
    with pytest.raises(ConfigError, match="did you mean 'kandinsky5'"):
        get_architecture("kandinsky")


def test_pattern_matching_is_per_path_component():
    assert matches("attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert matches("attn1.to_q", "attn1.to_q")
    assert not matches("attn1.to_q", "blocks.0.attn1.to_q_t")
    assert not matches("to_q", "blocks.0.attn.add_to_q")
    assert not matches("x_embedder", "controlnet_x_embedder")
    assert matches("all_x_embedder.*", "all_x_embedder.2-1")
    assert matches("mapper_*", "down_blocks.0.1.mapper_sca")
    assert not matches("mapper_*", "down_blocks.0.2.kv_mapper.1")
    assert matches("^out_layer.out_layer", "out_layer.out_layer")
    assert not matches("^embedding.1", "blocks.embedding.1")


def _check_slider_list(names: list[str], model: torch.nn.Module) -> None:
    assert names, "empty slider list"
    layers = dict(adaptable_modules(model))
    for name in names:
        assert name in layers, f"{name} is not an adaptable layer of the model"
        assert not text_or_cross(name), f"slider list contains text/cross-attention {name}"


@pytest.mark.parametrize("key", list(DENOISERS))
def test_denoiser_slider_targets(key):
    model = DENOISERS[key]()
    arch = DENOISER_ARCH.get(key, key)
    slider = resolve_targets(model, arch)
    ordinary = resolve_targets(model, arch, slider=False)

    _check_slider_list(slider.names, model)
    assert slider.model_class == type(model).__name__
    # Every pattern of the registry fits a real module name of this class.
    assert slider.unmatched_patterns == [], slider.unmatched_patterns
    assert any(name.endswith(SELF_ATTENTION[arch]) for name in slider.names)
    assert all(slider.matched[name] in slider.patterns for name in slider.names)

    # The ordinary list is a different list, and it is the one that touches text.
    assert set(slider.names) != set(ordinary.names)
    assert any(text_or_cross(name) for name in ordinary.names), ordinary.names
    assert tuple(slider.patterns) != tuple(ordinary.patterns)


@pytest.mark.parametrize("arch", CONTROLNET_ARCHS)
def test_controlnet_slider_targets_and_output_projections(arch):
    controlnet, denoiser = controlnet_for(arch)
    slider = resolve_targets(controlnet, arch, side="controlnet", exclude_shared_with=denoiser)
    ordinary = resolve_targets(
        controlnet, arch, side="controlnet", slider=False, exclude_shared_with=denoiser
    )
    outputs = controlnet_output_projections(controlnet, arch)

    _check_slider_list(slider.names, controlnet)
    assert slider.unmatched_patterns == [], slider.unmatched_patterns
    assert set(slider.names) != set(ordinary.names)

    # The output projections are exactly the zero-initialised layers of the fresh ControlNet,
    # and no adapter list (slider or ordinary) contains one.
    layers = dict(adaptable_modules(controlnet))
    zero = {n for n, layer in layers.items() if not layer.weight.detach().any()}
    assert outputs and set(outputs) == zero
    assert not set(outputs) & set(slider.names)
    assert not set(outputs) & set(ordinary.names)


def test_zimage_controlnet_leaves_modules_shared_with_the_transformer_alone():
    controlnet, transformer = controlnet_for("zimage")
    shared = {id(m) for m in transformer.modules()}
    for slider in (True, False):
        res = resolve_targets(
            controlnet, "zimage", side="controlnet", slider=slider, exclude_shared_with=transformer
        )
        layers = dict(adaptable_modules(controlnet))
        assert all(id(layers[name]) not in shared for name in res.names)
        assert all(name.startswith("control_") for name in res.names)
    # Ordinary patterns (to_q, ...) also match the shared refiners: they are skipped, not adapted.
    ordinary = resolve_targets(
        controlnet, "zimage", side="controlnet", slider=False, exclude_shared_with=transformer
    )
    assert "noise_refiner.0.attention.to_q" in ordinary.skipped
    unshared = resolve_targets(controlnet, "zimage", side="controlnet", slider=False)
    assert "noise_refiner.0.attention.to_q" in unshared.names


def test_patterns_that_match_nothing_name_model_and_patterns():
    model = DENOISERS["flux"]()
    with pytest.raises(ConfigError) as err:
        resolve_targets(model, "kandinsky5")
    message = str(err.value)
    assert "FluxTransformer2DModel" in message and "self_attention.to_query" in message


def test_controlnet_side_needs_a_controlnet_class():
    with pytest.raises(ConfigError, match="no ControlNet class"):
        resolve_targets(DENOISERS["wan"](), "wan", side="controlnet")


@pytest.mark.parametrize("key", ["zimage", "kandinsky5", "lumina2", "stable_cascade"])
def test_guide_general_list_misses_the_self_attention_of(key):
    # Why these architectures need their own lists (their registry notes say so).
    model = DENOISERS[key]()
    names = [n for n, _ in adaptable_modules(model)]
    hits = [n for n in names if any(matches(p, n) for p in GUIDE_GENERAL)]
    assert not any(h.endswith(SELF_ATTENTION[key].split(".")[-1]) for h in hits)
    assert architectures()[key].note
