"""What a slider target list is: the data every family and the catalog write (no torch here).

One ``ArchitectureTargets`` per diffusers architecture, with

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

Every list was checked against the real diffusers 0.42.1 module names on tiny instances of each
class (tests/test_targets.py). Where the guide's list (docs/design.md §9) does not fit the real
names, the entry's ``note`` says what was changed and why.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    slider: tuple[str, ...]
    ordinary: tuple[str, ...]
    # A family's entry leaves these four empty: its family class fills them in.
    name: str = ""
    description: str = ""
    denoiser_classes: tuple[str, ...] = ()
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

SELF_ATTN1 = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
QKVO = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

UNET_SLIDER = (
    *SELF_ATTN1,
    "proj_in",
    "proj_out",
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
)
CONTROLNET_MODEL_SLIDER = (
    *SELF_ATTN1,
    "proj_in",
    "proj_out",
    "conv_in",  # the input conv and the conditioning embedding's first conv
    "controlnet_cond_embedding.blocks.*",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
)
CONTROLNET_MODEL_OUTPUTS = (
    "controlnet_down_blocks.*",
    "controlnet_mid_block",
    "controlnet_cond_embedding.conv_out",
)
