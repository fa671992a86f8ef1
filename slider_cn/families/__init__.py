"""The model-family registry: one line per family, its class and what a config needs of it.

A family's code is its own module beside this file (docs/design.md §7.1). The registry line
names that class by import path and carries the few facts config validation needs (defaults and
family-only keys), so that reading or checking a config — `--plan`, the dry run's first stage,
the web UI — never imports torch, diffusers or transformers. Adding a family is its module plus
one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig
    from slider_cn.families.base import ModelFamily

# Config keys of the flow-matching objective (slider_cn/families/flow.py reads them).
FLOW_OPTIONS = frozenset(
    {
        "flow_use_uniform_schedule",
        "flow_sigmoid_scale",
        "flow_schedule_shift",
        "flow_schedule_auto_shift",
        "flow_loss_weighting",
    }
)


@dataclass(frozen=True)
class FamilyCard:
    """A registry line: where the family's class is, and its defaults."""

    path: str  # "module:Class"
    # training resolution when the config sets none (the family's native size)
    resolution: int
    # validation guidance when the config sets none (the pipeline's usual value) ...
    guidance: float
    # ... except for models whose name contains one of these (e.g. guidance-distilled ones)
    guidance_by_model: tuple[tuple[str, float], ...] = ()
    # the family-only config keys (config.FAMILY_OPTIONS) it reads; setting another warns
    options: frozenset[str] = frozenset()
    # False for families diffusers has no ControlNet for: LoRA mode without a ControlNet only
    controlnet: bool = True
    # aspect buckets are multiples of this many pixels (VAE factor x patch size)
    bucket_multiple: int = 16

    def validation_guidance(self, model: str) -> float:
        for marker, guidance in self.guidance_by_model:
            if marker in model.lower():
                return guidance
        return self.guidance


FAMILIES: dict[str, FamilyCard] = {
    # guidance: each pipeline's own default
    "sd1x": FamilyCard(
        "slider_cn.families.sd1x:SD1xFamily", resolution=512, guidance=7.5, bucket_multiple=8
    ),
    "sdxl": FamilyCard(
        "slider_cn.families.sdxl:SDXLFamily", resolution=1024, guidance=5.0, bucket_multiple=8
    ),
    "sd3": FamilyCard(
        "slider_cn.families.sd3:SD3Family", resolution=1024, guidance=7.0, options=FLOW_OPTIONS
    ),
    # Flux.1-dev's distilled guidance input (schnell has none and ignores it)
    "flux": FamilyCard(
        "slider_cn.families.flux:FluxFamily",
        resolution=1024,
        guidance=3.5,
        options=FLOW_OPTIONS | {"flux_guidance_value"},
    ),
    # Z-Image Turbo is guidance-distilled: its model card samples without CFG
    "zimage": FamilyCard(
        "slider_cn.families.zimage:ZImageFamily",
        resolution=1024,
        guidance=5.0,
        guidance_by_model=(("turbo", 0.0),),
        options=FLOW_OPTIONS,
    ),
    # true_cfg_scale (CFG against a blank negative prompt); Lightning-distilled ones sample at 1
    "qwenimage": FamilyCard(
        "slider_cn.families.qwenimage:QwenImageFamily",
        resolution=1024,
        guidance=4.0,
        guidance_by_model=(("lightning", 1.0),),
        options=FLOW_OPTIONS,
    ),
    # FLUX.2 [dev]'s distilled guidance input (flux_guidance_value in training)
    "flux2": FamilyCard(
        "slider_cn.families.flux2:Flux2Family",
        resolution=1024,
        guidance=4.0,
        options=FLOW_OPTIONS | {"flux_guidance_value"},
        controlnet=False,
    ),
    # ChromaPipeline's guidance is real classifier-free guidance
    "chroma": FamilyCard(
        "slider_cn.families.chroma:ChromaFamily",
        resolution=1024,
        guidance=5.0,
        options=FLOW_OPTIONS,
        controlnet=False,
    ),
    "lumina2": FamilyCard(
        "slider_cn.families.lumina2:Lumina2Family",
        resolution=1024,
        guidance=4.0,
        options=FLOW_OPTIONS,
        controlnet=False,
    ),
    "auraflow": FamilyCard(
        "slider_cn.families.auraflow:AuraFlowFamily",
        resolution=1024,
        guidance=3.5,
        options=FLOW_OPTIONS,
        controlnet=False,
    ),
    "sana": FamilyCard(
        "slider_cn.families.sana:SanaFamily",
        resolution=1024,
        guidance=4.5,
        options=FLOW_OPTIONS,
        bucket_multiple=32,  # DC-AE's 32x latents
    ),
    # HiDream-I1-Dev / -Fast are guidance-distilled: their model cards sample without CFG
    "hidream": FamilyCard(
        "slider_cn.families.hidream:HiDreamFamily",
        resolution=1024,
        guidance=5.0,
        guidance_by_model=(("i1-dev", 0.0), ("i1-fast", 0.0)),
        options=FLOW_OPTIONS,
        controlnet=False,
    ),
    "pixart": FamilyCard(
        "slider_cn.families.pixart:PixArtFamily", resolution=1024, guidance=4.5, controlnet=False
    ),
    # Cosmos2TextToImagePipeline's default guidance_scale
    "cosmos": FamilyCard(
        "slider_cn.families.cosmos:CosmosFamily",
        resolution=1024,
        guidance=7.0,
        options=FLOW_OPTIONS,
        controlnet=False,
    ),
    # Kandinsky5T2IPipeline's default guidance_scale
    "kandinsky5": FamilyCard(
        "slider_cn.families.kandinsky5:Kandinsky5Family",
        resolution=1024,
        guidance=3.5,
        options=FLOW_OPTIONS,
        controlnet=False,
    ),
}


# Architectures the guide names that slider-cn refuses, and why (config validation says so).
REFUSED: dict[str, str] = {
    "stable_cascade": "Stable Cascade is two models (a prior that makes image embeddings and a "
    "decoder that draws from them) with no single denoiser a slider could steer; slider-cn "
    "trains one denoiser per run",
    "wan": "Wan is a video model: video datasets and frame-aware sampling come with a later "
    "release",
    "ltxvideo": "LTX-Video is a video model: video datasets and frame-aware sampling come with "
    "a later release",
}


def family_names() -> list[str]:
    return sorted(FAMILIES)


def family_card(name: str) -> FamilyCard:
    return FAMILIES[name]


def family_class(name: str) -> type[ModelFamily]:
    module_name, class_name = FAMILIES[name].path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_family(config: TrainConfig) -> ModelFamily:
    """The family object for a validated config."""
    return family_class(config.model_family)(config)
