"""The slider adapter (PEFT LoRA or LyCORIS) on resolved module names, its scale, and assistants.

- ``attach_slider_adapter(model, target_names, config)`` puts the trainable slider adapter on
  exactly the given modules and returns a ``SliderAdapter``: its multiplier is the slider
  strength, and it scales only the slider (never an assistant adapter).
- ``load_assistant_adapter(model, path, strength, family=...)`` loads a LoRA file
  (diffusers/PEFT or kohya keys) as a second, frozen PEFT adapter at a fixed strength. It is
  never scaled by the slider and never part of the slider's state dict.

A model may carry both: PEFT runs every adapter in its active list, and both are kept active.
Order does not matter for PEFT sliders; with a LyCORIS slider, load the assistant first when
the algorithm is ``full`` (it takes the original weight off the layer).

One module per kind, one registry (``ATTACH``) from ``lora_type`` to its builder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from slider_cn.adapters.assistant import AssistantAdapter, load_assistant_adapter
from slider_cn.adapters.base import ASSISTANT_ADAPTER, SLIDER_ADAPTER, SliderAdapter
from slider_cn.adapters.lycoris import (
    LYCORIS_KEYS,
    LycorisSliderAdapter,
    attach_lycoris,
    read_lycoris_config,
    reset_lycoris_preset_state,
)
from slider_cn.adapters.peft import PeftSliderAdapter, attach_peft

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig

# lora_type -> the builder of its slider adapter
ATTACH: dict[str, Callable[[nn.Module, list[str] | None, TrainConfig], SliderAdapter]] = {
    "standard": attach_peft,
    "lycoris": attach_lycoris,
}


def attach_slider_adapter(
    model: nn.Module, target_names: list[str] | None, config: TrainConfig
) -> SliderAdapter:
    """Attach the trainable slider adapter to ``model`` on exactly ``target_names``.

    ``lora_type: standard`` -> a PEFT LoRA named "slider" (rank, alpha, dropout from the
    config). ``lora_type: lycoris`` -> a LyCORIS network from ``lycoris_config``; its preset
    narrows the targets further, and ``target_names=None`` lets the preset alone decide.
    """
    return ATTACH[config.lora_type](model, target_names, config)


__all__ = [
    "ASSISTANT_ADAPTER",
    "LYCORIS_KEYS",
    "SLIDER_ADAPTER",
    "AssistantAdapter",
    "LycorisSliderAdapter",
    "PeftSliderAdapter",
    "SliderAdapter",
    "attach_slider_adapter",
    "load_assistant_adapter",
    "read_lycoris_config",
    "reset_lycoris_preset_state",
]
