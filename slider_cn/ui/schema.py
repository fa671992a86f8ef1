"""The form the page draws, made from the training config's own pydantic schema.

The fields, their types, choices, bounds, defaults and descriptions come from
`slider_cn.config.TrainConfig` (and the dataloader's `BackendConfig`), the same models the CLI
validates with, so the form and the command line cannot disagree. This module only decides
which tab a key sits in and a few labels; a key it does not place goes to the Training tab, so
a new config key shows up in the UI without a change here.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from slider_cn.config import PATH_KEYS, TrainConfig
from slider_cn.data.config import BackendConfig

TABS = ("Model", "LoRA", "Data", "Training", "Validation")
_TAB_KEYS = {
    "Model": (
        "model_family",
        "pretrained_model_name_or_path",
        "training_mode",
        "controlnet",
        "controlnet_model_name_or_path",
        "controlnet_conditioning_scale",
        "base_model_precision",
        "text_encoder_precision",
        "offload_text_encoders",
        "assistant_lora_path",
        "assistant_lora_strength",
        "assistant_lora_inference_strength",
    ),
    "LoRA": (
        "slider_lora_target",
        "lora_type",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lycoris_config",
        "slider_neutral_mode",
    ),
    "Data": (
        "data_backend_config",
        "resolution",
        "cache_dir",
        "caption_dropout_probability",
        "slider_prompts",
        "slider_allow_unbalanced",
    ),
    "Validation": (
        "validation_prompt",
        "user_prompt_library",
        "validation_steps",
        "validation_adapter_strength",
        "validation_conditioning_image",
        "validation_num_inference_steps",
        "validation_guidance",
        "validation_seed",
        "validation_resolution",
        "validation_guidance_rescale",
    ),
}
TAB_OF = {key: tab for tab, keys in _TAB_KEYS.items() for key in keys}
# The guide's name for the toggle; other labels are the key itself.
LABELS = {"slider_lora_target": "Slider LoRA Targeting"}
# Keys the UI itself sets when it starts or resumes a run (shown, but the buttons decide).
RUN_KEYS = ("resume_from_checkpoint",)


def _kind(annotation: Any) -> tuple[str, list[Any] | None, bool]:
    """(kind, choices, optional) of a field's annotation: kind is bool, int, float, str, enum
    or json (anything that takes a list or an object)."""
    optional = False
    args = [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
    if any(typing.get_origin(a) in (list, dict) or a in (list, dict) for a in args):
        return "json", None, optional
    if len(args) > 1:
        return "str", None, optional
    arg = args[0]
    if typing.get_origin(arg) is Literal:
        return "enum", list(typing.get_args(arg)), optional
    for kind in (bool, int, float, str):
        if arg is kind:
            return kind.__name__, None, optional
    return "json", None, optional


def _bounds(field: FieldInfo) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in field.metadata:
        for name in ("ge", "gt", "le", "lt"):
            value = getattr(item, name, None)
            if value is not None and math.isfinite(value):
                bounds[name] = value
    return bounds


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else None


def describe_fields(model: type[BaseModel]) -> list[dict[str, Any]]:
    """One entry per field of a pydantic model, in the model's order."""
    fields = []
    for name, field in model.model_fields.items():
        kind, choices, optional = _kind(field.annotation)
        fields.append(
            {
                "name": name,
                "label": LABELS.get(name, name),
                "kind": kind,
                "choices": choices,
                "optional": optional,
                "required": field.is_required(),
                "default": None if field.is_required() else _jsonable(field.default),
                "description": field.description or "",
                "bounds": _bounds(field),
                "path": name in PATH_KEYS,
            }
        )
    return fields


def form_schema() -> dict[str, Any]:
    """What the page needs to draw the config form and the dataloader editor."""
    from conditioning.registry import DETECTORS
    from slider_cn.families import family_names

    tabs: dict[str, list[dict[str, Any]]] = {tab: [] for tab in TABS}
    for field in describe_fields(TrainConfig):
        if field["name"] == "model_family":
            field["kind"], field["choices"] = "enum", family_names()
        field["tab"] = TAB_OF.get(field["name"], "Training")
        field["run_key"] = field["name"] in RUN_KEYS
        tabs[field["tab"]].append(field)
    return {
        "tabs": [{"name": tab, "fields": tabs[tab]} for tab in TABS],
        "backend_fields": describe_fields(BackendConfig),
        "detectors": [
            {
                "name": spec.name,
                "summary": spec.summary,
                "needs_weights": spec.needs_weights,
                "params": [
                    {
                        "name": p.name,
                        "type": p.type.__name__,
                        "default": _jsonable(p.default),
                        "help": p.help,
                    }
                    for p in spec.params
                ],
            }
            for spec in DETECTORS.values()
        ],
    }
