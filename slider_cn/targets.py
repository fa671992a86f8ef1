"""Which modules a slider adapts, per architecture, and their resolution on a loaded model.

The registry is data: one ``ArchitectureTargets`` per diffusers architecture, with

- ``slider``: the slider targets of the denoiser (Concept Sliders' "leave text alone" rule:
  self-attention, conv/proj and time-embedding layers; never cross-attention, never a
  text/context stream),
- ``ordinary``: the family's usual LoRA targets, used when ``slider_lora_target`` is false
  (these may include cross-attention and text modules),
- ``controlnet_slider``: the slider targets on the architecture's ControlNet,
- ``controlnet_outputs``: the ControlNet layers a fresh ControlNet initialises to zero. They are
  never given to the slider adapter: in controlnet mode they are trained in full instead
  (docs/design.md §8.1: an adapter on a frozen zero layer keeps the residuals at zero).

Pattern syntax: a dotted module path matched against the *end* of a module name, one path
component at a time (``attn1.to_q`` matches ``down_blocks.0.attentions.0.transformer_blocks.0.
attn1.to_q`` but not ``...attn1.to_q_t``). ``*`` is one whole component (``all_x_embedder.*``)
or part of one (``mapper_*``); a leading ``^`` anchors the pattern at the model's root.
Exclusion patterns (``NEVER_SLIDER``, ``exclude``) also exclude everything below the module
they match.

Every list here was checked against the real diffusers 0.42.1 module names on tiny instances
of each class (tests/test_targets.py). Where the guide's list (docs/design.md §9) does not fit the
real names, the entry's ``note`` says what was changed and why.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field

from torch import nn

from slider_cn.errors import ConfigError, suggest

log = logging.getLogger(__name__)

# Layers an adapter can wrap (PEFT LoRA and LyCORIS both handle these).
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Never adapted by a slider, on any architecture or side: cross-attention and every module
# that reads or writes only the text/context stream. A safety net under the per-architecture
# lists, which are written not to match these in the first place.
NEVER_SLIDER: tuple[str, ...] = (
    "attn2",  # cross-attention in UNets, Sana, PixArt, Wan, LTX, Cosmos (SD3.5: see its note)
    "cross_attention",  # Kandinsky 5
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "context_embedder",
    "context_refiner",
    "caption_projection",
    "caption_embedder",
    "cap_embedder",
    "text_embedder",  # pooled-text embedding inside time_text_embed
    "txt_*",  # Qwen-Image's text stream: txt_in, txt_mod, txt_mlp
    "text_*",  # Kandinsky 5's text blocks and embeddings
    "ff_context",
    "norm1_context",
    "add_embedding",  # SDXL: pooled text + micro-conditioning
    "kv_mapper",  # Stable Cascade: maps the text conditioning to keys/values
)


@dataclass(frozen=True)
class ArchitectureTargets:
    """The target patterns of one diffusers architecture."""

    name: str
    description: str
    denoiser_classes: tuple[str, ...]
    slider: tuple[str, ...]
    ordinary: tuple[str, ...]
    controlnet_classes: tuple[str, ...] = ()
    controlnet_slider: tuple[str, ...] = ()
    controlnet_outputs: tuple[str, ...] = ()
    # Extra slider exclusions for this architecture (text modules with unusual names).
    exclude: tuple[str, ...] = ()
    # Where and why the lists differ from the guide's defaults.
    note: str = ""

    @property
    def has_controlnet(self) -> bool:
        return bool(self.controlnet_classes)


# --- the guide's lists (docs/design.md §9), kept as written for comparison -------------------
GUIDE_GENERAL = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn1.to_qkv",
    "to_qkv",
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
)

_SELF_ATTN1 = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_QKVO = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

_UNET_SLIDER = (
    *_SELF_ATTN1,
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
)
_CONTROLNET_MODEL_SLIDER = (
    *_SELF_ATTN1,
    "proj_in",
    "proj_out",
    "conv_in",  # the input conv and the conditioning embedding's first conv
    "controlnet_cond_embedding.blocks.*",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
)
_CONTROLNET_MODEL_OUTPUTS = (
    "controlnet_down_blocks.*",
    "controlnet_mid_block",
    "controlnet_cond_embedding.conv_out",
)

ARCHITECTURES: dict[str, ArchitectureTargets] = {}


def _register(*entries: ArchitectureTargets) -> None:
    for entry in entries:
        ARCHITECTURES[entry.name] = entry


_register(
    ArchitectureTargets(
        name="sd1x",
        description="Stable Diffusion 1.x / 2.x (UNet2DConditionModel)",
        denoiser_classes=("UNet2DConditionModel",),
        slider=_UNET_SLIDER,
        ordinary=_QKVO,  # diffusers' LoRA default: self- and cross-attention
        controlnet_classes=("ControlNetModel",),
        controlnet_slider=_CONTROLNET_MODEL_SLIDER,
        controlnet_outputs=_CONTROLNET_MODEL_OUTPUTS,
        note="The guide's general list, less the fused `to_qkv` names (only present after "
        "fuse_qkv_projections()).",
    ),
    ArchitectureTargets(
        name="sdxl",
        description="Stable Diffusion XL (UNet2DConditionModel with text_time embedding)",
        denoiser_classes=("UNet2DConditionModel",),
        slider=_UNET_SLIDER,
        ordinary=_QKVO,
        controlnet_classes=("ControlNetModel",),
        controlnet_slider=_CONTROLNET_MODEL_SLIDER,
        controlnet_outputs=_CONTROLNET_MODEL_OUTPUTS,
        note="As sd1x; `add_embedding` (pooled text + micro-conditioning) is never adapted.",
    ),
    ArchitectureTargets(
        name="sd3",
        description="Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, MMDiT)",
        denoiser_classes=("SD3Transformer2DModel",),
        slider=(
            *_ATTN,
            "pos_embed.proj",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(*_QKVO, *_JOINT_TEXT),
        controlnet_classes=("SD3ControlNetModel",),
        controlnet_slider=(
            *_ATTN,
            "pos_embed.proj",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "pos_embed_input.proj"),
        note="MMDiT names the image stream's attention `attn.*` (the guide's `attn1.*` matches "
        "nothing); patch embedding and timestep MLP stand in for conv_in and time_embedding. "
        "SD3.5's `attn2` is a second image self-attention, left out so that `attn2` is never "
        "adapted anywhere.",
    ),
    ArchitectureTargets(
        name="flux",
        description="Flux.1 (FluxTransformer2DModel)",
        denoiser_classes=("FluxTransformer2DModel",),
        slider=(
            *_ATTN,
            "proj_out",  # single blocks' attention+MLP output, and the final projection
            "x_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        ordinary=(*_QKVO, *_JOINT_TEXT),
        controlnet_classes=("FluxControlNetModel",),
        controlnet_slider=(
            *_ATTN,
            "proj_out",
            "x_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=(
            "controlnet_blocks.*",
            "controlnet_single_blocks.*",
            "controlnet_x_embedder",
            "input_hint_block.conv_out",  # only when built with conditioning_embedding_channels
        ),
        note="Single-stream blocks have no `to_out`: their attention and MLP leave through "
        "`proj_out`, which replaces the guide's `to_out.0` there.",
    ),
    ArchitectureTargets(
        name="flux2",
        description="Flux.2 (Flux2Transformer2DModel)",
        denoiser_classes=("Flux2Transformer2DModel",),
        slider=(
            *_ATTN,
            "attn.to_qkv_mlp_proj",  # single blocks: fused q/k/v + MLP input
            "single_transformer_blocks.*.attn.to_out",  # single blocks: a Linear, no `.0`
            "x_embedder",
            "time_guidance_embed.timestep_embedder.linear_1",
            "time_guidance_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(
            *_QKVO,
            *_JOINT_TEXT,
            "to_qkv_mlp_proj",
            "single_transformer_blocks.*.attn.to_out",
        ),
        note="Double blocks use `attn.to_q/k/v/to_out.0`; single blocks fuse q/k/v and the MLP "
        "input into `attn.to_qkv_mlp_proj` and project out with `attn.to_out` (no `.0`).",
    ),
    ArchitectureTargets(
        name="chroma",
        description="Chroma (ChromaTransformer2DModel)",
        denoiser_classes=("ChromaTransformer2DModel",),
        slider=(
            *_ATTN,
            "proj_out",
            "x_embedder",
            "distilled_guidance_layer.in_proj",
            "distilled_guidance_layer.out_proj",
        ),
        ordinary=(*_QKVO, *_JOINT_TEXT),
        note="As flux; Chroma has no pooled text: its timestep/guidance embedding is the "
        "`distilled_guidance_layer` approximator.",
    ),
    ArchitectureTargets(
        name="auraflow",
        description="AuraFlow (AuraFlowTransformer2DModel)",
        denoiser_classes=("AuraFlowTransformer2DModel",),
        slider=(
            *_ATTN,
            "pos_embed.proj",
            "time_step_proj.linear_1",
            "time_step_proj.linear_2",
            "proj_out",
        ),
        ordinary=(*_QKVO, *_JOINT_TEXT),
        note="Joint and single blocks both name their image attention `attn.*`.",
    ),
    ArchitectureTargets(
        name="lumina2",
        description="Lumina-Image 2.0 (Lumina2Transformer2DModel)",
        denoiser_classes=("Lumina2Transformer2DModel",),
        slider=(
            *_ATTN,
            "x_embedder",
            "time_caption_embed.timestep_embedder.linear_1",
            "time_caption_embed.timestep_embedder.linear_2",
            "norm_out.linear_2",  # the final projection to latent patches
        ),
        ordinary=_QKVO,
        note="The guide's general list matches nothing here: attention is `attn.*` in the "
        "main layers and the noise refiner (the caption's `context_refiner` is never adapted), "
        "there is no proj/conv in/out and the timestep MLP lives in `time_caption_embed`.",
    ),
    ArchitectureTargets(
        name="wan",
        description="Wan 2.x (WanTransformer3DModel)",
        denoiser_classes=("WanTransformer3DModel",),
        slider=(
            *_SELF_ATTN1,
            "patch_embedding",
            "condition_embedder.time_embedder.linear_1",
            "condition_embedder.time_embedder.linear_2",
            "condition_embedder.time_proj",
            "proj_out",
        ),
        ordinary=(*_QKVO, "add_k_proj", "add_v_proj"),
        exclude=("image_embedder",),  # image-to-video CLIP context, fed to cross-attention
        note="Self-attention is `attn1`; patch embedding and `condition_embedder.time_*` stand "
        "in for conv_in and time_embedding.",
    ),
    ArchitectureTargets(
        name="hidream",
        description="HiDream-I1 (HiDreamImageTransformer2DModel)",
        denoiser_classes=("HiDreamImageTransformer2DModel",),
        slider=(
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out",  # a Linear here, no `.0`
            "x_embedder.proj",
            "t_embedder.timestep_embedder.linear_1",
            "t_embedder.timestep_embedder.linear_2",
            "final_layer.linear",
        ),
        ordinary=("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"),
        exclude=("to_q_t", "to_k_t", "to_v_t", "to_out_t", "ff_t", "p_embedder"),
        note="`attn1.to_out` is a Linear (no `.0`); the text stream of the double blocks is "
        "`to_*_t` / `ff_t`, the pooled text `p_embedder`.",
    ),
    ArchitectureTargets(
        name="ltxvideo",
        description="LTX-Video (LTXVideoTransformer3DModel)",
        denoiser_classes=("LTXVideoTransformer3DModel",),
        slider=(
            *_SELF_ATTN1,
            "proj_in",
            "proj_out",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
        ),
        ordinary=_QKVO,
        note="The guide's general list fits, with the timestep MLP under `time_embed.emb`.",
    ),
    ArchitectureTargets(
        name="qwenimage",
        description="Qwen-Image (QwenImageTransformer2DModel)",
        denoiser_classes=("QwenImageTransformer2DModel",),
        slider=(
            *_ATTN,
            "img_in",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(*_QKVO, *_JOINT_TEXT),
        controlnet_classes=("QwenImageControlNetModel",),
        controlnet_slider=(
            *_ATTN,
            "img_in",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "controlnet_x_embedder"),
        note="The guide's general list matches only `proj_out`: the image stream is `attn.*`, "
        "`img_in`, and the text stream (`txt_*`, `add_*`) is never adapted.",
    ),
    ArchitectureTargets(
        name="cosmos",
        description="Cosmos (CosmosTransformer3DModel)",
        denoiser_classes=("CosmosTransformer3DModel",),
        slider=(
            *_SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.t_embedder.linear_1",
            "time_embed.t_embedder.linear_2",
            "proj_out",
        ),
        ordinary=_QKVO,
        note="Self-attention is `attn1`; patch embedding and `time_embed.t_embedder` stand in "
        "for conv_in and time_embedding.",
    ),
    ArchitectureTargets(
        name="stable_cascade",
        description="Stable Cascade (StableCascadeUNet)",
        denoiser_classes=("StableCascadeUNet",),
        slider=(
            # Self-attention over [image; text] tokens, like a single-stream block; the text
            # enters through kv_mapper, which is never adapted.
            "attention.to_q",
            "attention.to_k",
            "attention.to_v",
            "attention.to_out.0",
            "^embedding.1",  # the input conv
            "^clf.1",  # the output conv
            "mapper",  # timestep-ratio embedding of each block
            "mapper_*",  # extra timestep conditionings (sca, crp)
        ),
        ordinary=(*_QKVO, "kv_mapper.1"),  # the whole attention block, text mapper included
        exclude=("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper"),
        note="The guide's general list matches nothing: attention is `attention.*`, the input "
        "and output convs are `embedding.1` / `clf.1`, the timestep blocks' `mapper*`.",
    ),
    ArchitectureTargets(
        name="kandinsky5",
        description="Kandinsky 5 (Kandinsky5Transformer3DModel)",
        denoiser_classes=("Kandinsky5Transformer3DModel",),
        slider=(
            "visual_transformer_blocks.*.self_attention.to_query",
            "visual_transformer_blocks.*.self_attention.to_key",
            "visual_transformer_blocks.*.self_attention.to_value",
            "visual_transformer_blocks.*.self_attention.out_layer",
            "visual_embeddings.in_layer",
            "time_embeddings.in_layer",
            "time_embeddings.out_layer",
            "^out_layer.out_layer",
        ),
        ordinary=("to_query", "to_key", "to_value"),  # text and cross-attention included
        exclude=("pooled_text_embeddings",),
        note="The guide's Kandinsky 5 list (`attn1.to_query`, `conv_in`, `time_embedding.*`) "
        "matches nothing: self-attention is `self_attention.*` in the visual blocks, "
        "embeddings are `visual_embeddings` / `time_embeddings`, the output `out_layer`.",
    ),
    ArchitectureTargets(
        name="zimage",
        description="Z-Image (ZImageTransformer2DModel)",
        denoiser_classes=("ZImageTransformer2DModel",),
        slider=(
            "attention.to_q",
            "attention.to_k",
            "attention.to_v",
            "attention.to_out.0",
            "all_x_embedder.*",
            "t_embedder.mlp.0",
            "t_embedder.mlp.2",
            "all_final_layer.*.linear",
        ),
        ordinary=_QKVO,
        controlnet_classes=("ZImageControlNetModel",),
        controlnet_slider=(
            "control_layers.*.attention.to_q",
            "control_layers.*.attention.to_k",
            "control_layers.*.attention.to_v",
            "control_layers.*.attention.to_out.0",
            "control_noise_refiner.*.attention.to_q",
            "control_noise_refiner.*.attention.to_k",
            "control_noise_refiner.*.attention.to_v",
            "control_noise_refiner.*.attention.to_out.0",
            "control_all_x_embedder.*",
        ),
        controlnet_outputs=("before_proj", "after_proj"),
        note="Attention is `attention.*` (the guide's `attn1.*` matches nothing) in the main "
        "layers and the noise refiner; the caption's `context_refiner` is never adapted. The "
        "ControlNet shares the transformer's embedders and refiners: only its own `control_*` "
        "modules are adapted.",
    ),
    ArchitectureTargets(
        name="sana",
        description="Sana (SanaTransformer2DModel)",
        denoiser_classes=("SanaTransformer2DModel",),
        slider=(
            *_SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=_QKVO,
        controlnet_classes=("SanaControlNetModel",),
        controlnet_slider=(
            *_SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "input_block"),
        note="Self-attention is `attn1`; patch embedding and the timestep MLP under "
        "`time_embed.emb` stand in for conv_in and time_embedding.",
    ),
    ArchitectureTargets(
        name="pixart",
        description="PixArt-α / Σ (PixArtTransformer2DModel)",
        denoiser_classes=("PixArtTransformer2DModel",),
        slider=(
            *_SELF_ATTN1,
            "pos_embed.proj",
            "adaln_single.emb.timestep_embedder.linear_1",
            "adaln_single.emb.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=_QKVO,
        note="Self-attention is `attn1`; the timestep MLP is under `adaln_single.emb`.",
    ),
)

# slider-cn model families -> architectures. Families registered later (sd3, flux, zimage)
# map to the architecture of the same name.
FAMILY_ARCHITECTURES: dict[str, str] = {
    "sd1x": "sd1x",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
    "zimage": "zimage",
}


def get_architecture(name: str) -> ArchitectureTargets:
    """An architecture by its name or by a slider-cn family name."""
    arch = ARCHITECTURES.get(FAMILY_ARCHITECTURES.get(name, name))
    if arch is None:
        names = sorted(ARCHITECTURES)
        raise ConfigError(
            f"no slider targets registered for {name!r}; known architectures: "
            f"{', '.join(names)}{suggest(name, names)}"
        )
    return arch


# --- pattern matching --------------------------------------------------------------------
def _pattern_body(pattern: str) -> tuple[bool, str]:
    anchored = pattern.startswith("^")
    parts = pattern.removeprefix("^").split(".")
    body = r"\.".join(
        "[^.]+" if part == "*" else re.escape(part).replace(r"\*", "[^.]*") for part in parts
    )
    return anchored, body


@functools.lru_cache(maxsize=1024)
def _target_regex(pattern: str) -> re.Pattern[str]:
    anchored, body = _pattern_body(pattern)
    return re.compile(("^" if anchored else r"^(?:.*\.)?") + body + "$")


@functools.lru_cache(maxsize=1024)
def _exclude_regex(pattern: str) -> re.Pattern[str]:
    # Also matches everything below the module: "attn2" excludes "...attn2.to_q".
    anchored, body = _pattern_body(pattern)
    return re.compile(("^" if anchored else r"^(?:.*\.)?") + body + r"(?:\..*)?$")


def matches(pattern: str, name: str) -> bool:
    """Whether a target pattern matches a module name (see the module docstring)."""
    return _target_regex(pattern).match(name) is not None


def excluded_by(patterns: tuple[str, ...] | list[str], name: str) -> str | None:
    """The first exclusion pattern that covers ``name`` (the module or an ancestor), if any."""
    for pattern in patterns:
        if _exclude_regex(pattern).match(name):
            return pattern
    return None


# --- walking a model ---------------------------------------------------------------------
def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every Linear/Conv layer of a model, as the base model names them.

    A layer already wrapped by PEFT (an assistant adapter) is reported under its own name with
    its base layer, and the adapter's inner layers (lora_A, lora_B, base_layer) are skipped.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: list[tuple[str, nn.Module]] = []
    skip_below: list[str] = []
    for name, module in model.named_modules():
        if skip_below and (name == skip_below[-1] or name.startswith(skip_below[-1] + ".")):
            continue
        if isinstance(module, BaseTunerLayer):
            skip_below.append(name)
            base = module.get_base_layer()
            if isinstance(base, ADAPTABLE_TYPES):
                found.append((name, base))
            continue
        if isinstance(module, ADAPTABLE_TYPES) and name:
            found.append((name, module))
    return found


@dataclass(frozen=True)
class AdaptedModule:
    """One resolved target: its name, the pattern that matched, its layer type and shape."""

    name: str
    pattern: str
    layer_type: str
    shape: tuple[int, ...]


@dataclass
class TargetResolution:
    """Patterns resolved to the exact module names of one loaded model."""

    architecture: str
    side: str
    slider: bool
    model_class: str
    patterns: tuple[str, ...]
    modules: list[AdaptedModule]
    # Names a pattern matched but that were left out, with the reason.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def matched(self) -> dict[str, str]:
        """module name -> the pattern that matched it."""
        return {m.name: m.pattern for m in self.modules}

    @property
    def unmatched_patterns(self) -> list[str]:
        used = {m.pattern for m in self.modules}
        return [p for p in self.patterns if p not in used]

    def counts_by_pattern(self) -> dict[str, int]:
        counts = dict.fromkeys(self.patterns, 0)
        for module in self.modules:
            counts[module.pattern] += 1
        return counts


def _describe(layer: nn.Module) -> tuple[str, tuple[int, ...]]:
    # LyCORIS `full` takes the weight off the layer it adapts.
    weight = getattr(layer, "weight", None)
    return type(layer).__name__, tuple(weight.shape) if weight is not None else ()


def _shared_module_ids(model: nn.Module, other: nn.Module) -> set[int]:
    # A shared block's layers are modules of both models, so comparing layers is enough.
    own = {id(m) for m in model.modules()}
    return {id(m) for m in other.modules() if id(m) in own}


def resolve_targets(
    model: nn.Module,
    arch_name: str,
    side: str = "denoiser",
    slider: bool = True,
    exclude_shared_with: nn.Module | None = None,
) -> TargetResolution:
    """Resolve an architecture's patterns to the exact module names of ``model``.

    ``side`` is "denoiser" or "controlnet" (``model`` is then the ControlNet). ``slider``
    picks the slider patterns (cross-attention and text modules are always left out) or the
    family's ordinary LoRA patterns. On the ControlNet side the zero-initialised output
    projections are never returned (they are trained in full), and with
    ``exclude_shared_with=denoiser`` modules the ControlNet shares with the denoiser (Z-Image)
    are left out. Raises ConfigError when nothing resolves.
    """
    arch = get_architecture(arch_name)
    model_class = type(model).__name__
    if side == "denoiser":
        patterns = arch.slider if slider else arch.ordinary
        expected = arch.denoiser_classes
        excludes: tuple[str, ...] = ()
    elif side == "controlnet":
        if not arch.has_controlnet:
            raise ConfigError(
                f"architecture {arch.name!r} has no ControlNet class in diffusers, so there is "
                "nothing to adapt on the ControlNet side; use training_mode 'lora'"
            )
        patterns = arch.controlnet_slider if slider else arch.ordinary
        expected = arch.controlnet_classes
        excludes = arch.controlnet_outputs
    else:
        raise ConfigError(f"side must be 'denoiser' or 'controlnet' (got {side!r})")
    if slider:
        excludes = (*excludes, *NEVER_SLIDER, *arch.exclude)
    if model_class not in expected:
        log.warning(
            "%s targets are written for %s, but the model is a %s",
            arch.name,
            " / ".join(expected),
            model_class,
        )

    shared = _shared_module_ids(model, exclude_shared_with) if exclude_shared_with else set()
    modules: list[AdaptedModule] = []
    skipped: dict[str, str] = {}
    for name, layer in adaptable_modules(model):
        pattern = next((p for p in patterns if matches(p, name)), None)
        if pattern is None:
            continue
        reason = excluded_by(excludes, name)
        if reason is not None:
            skipped[name] = f"excluded by {reason!r}"
            continue
        if id(layer) in shared:
            skipped[name] = "shared with the denoiser"
            continue
        layer_type, shape = _describe(layer)
        modules.append(AdaptedModule(name, pattern, layer_type, shape))

    if not modules:
        what = "slider" if slider else "ordinary LoRA"
        raise ConfigError(
            f"the {what} target patterns of {arch.name!r} ({side} side) match no adaptable "
            f"module of {model_class}: patterns {list(patterns)}"
        )
    return TargetResolution(arch.name, side, slider, model_class, tuple(patterns), modules, skipped)


def controlnet_output_projections(controlnet: nn.Module, arch_name: str) -> list[str]:
    """Names of the layers a fresh ControlNet initialises to zero (trained in full)."""
    arch = get_architecture(arch_name)
    if not arch.has_controlnet:
        raise ConfigError(f"architecture {arch.name!r} has no ControlNet class in diffusers")
    names = [
        name
        for name, _ in adaptable_modules(controlnet)
        if any(matches(p, name) for p in arch.controlnet_outputs)
    ]
    if not names:
        raise ConfigError(
            f"no ControlNet output projection of {arch.name!r} found in "
            f"{type(controlnet).__name__}: patterns {list(arch.controlnet_outputs)}"
        )
    return names
