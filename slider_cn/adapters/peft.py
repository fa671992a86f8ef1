"""The slider as a PEFT LoRA adapter named "slider", and the PEFT layer helpers the assistant
adapter shares (several adapters on one model, all kept active, only the slider trained)."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from slider_cn.adapters.base import SLIDER_ADAPTER, SliderAdapter
from slider_cn.errors import ConfigError

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_layers(model: nn.Module, adapter_name: str) -> list[nn.Module]:
    """The PEFT LoRA layers that carry ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return [
        m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A.keys()
    ]


def adapter_parameters(layer: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if adapter_name in container:
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield item
            else:
                yield from item.parameters()


def activate_all_adapters(model: nn.Module) -> None:
    """Keep every PEFT adapter of the model active; only the slider's weights train.

    PEFT activates just the newest adapter when one is added (and marks the active ones
    trainable), so after each addition the full list is set again and grads are fixed.
    """
    names = list(getattr(model, "peft_config", {}))
    if not names:
        return
    for layer in tuner_layers(model):
        # A layer may also carry adapters of another model that shares it (Z-Image's ControlNet
        # runs the transformer's refiners, with the transformer's assistant): keep those too.
        own = [n for n in layer._all_available_adapter_names() if n not in names]
        layer.set_adapter([*names, *own])
        for name in layer._all_available_adapter_names():
            for param in adapter_parameters(layer, name):
                param.requires_grad_(name == SLIDER_ADAPTER)


@contextlib.contextmanager
def quiet_multi_adapter_warning() -> Iterator[None]:
    # PEFT warns whenever a second adapter joins a model; here two adapters are the design.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _exact_names_regex(names: list[str]) -> str:
    # PEFT full-matches a string target_modules; a list would match by suffix and could pick
    # up other modules ending in the same name (conv_in vs controlnet_cond_embedding.conv_in).
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def is_peft_wrapped(model: nn.Module, name: str) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(model.get_submodule(name), BaseTunerLayer)


class PeftSliderAdapter(SliderAdapter):
    """A PEFT LoRA adapter named "slider"; the multiplier scales its per-layer alpha/r."""

    kind = "peft"

    def __init__(self, model, target_names, rank, alpha) -> None:
        super().__init__(model, target_names, "lora", rank, alpha)
        self.layers = adapter_layers(model, SLIDER_ADAPTER)
        # alpha/r of each layer at multiplier 1; every multiplier is applied to these.
        self._base_scaling = [layer.scaling[SLIDER_ADAPTER] for layer in self.layers]

    def _apply_multiplier(self, s: float) -> None:
        for layer, base in zip(self.layers, self._base_scaling, strict=True):
            layer.scaling[SLIDER_ADAPTER] = base * s

    def _save_scales(self) -> list[float]:
        return [layer.scaling[SLIDER_ADAPTER] for layer in self.layers]

    def _restore_scales(self, saved: list[float]) -> None:
        for layer, value in zip(self.layers, saved, strict=True):
            layer.scaling[SLIDER_ADAPTER] = value

    @contextlib.contextmanager
    def _skipped(self) -> Iterator[None]:
        # A PEFT layer with adapters disabled runs only its base layer. Only layers where the
        # slider is the sole adapter are switched: an assistant on the same layer must keep
        # running (there the multiplier 0 alone takes the slider out). The flag is PEFT's
        # own, and requires_grad is left alone (PEFT's enable_adapters would change it).
        alone = [
            layer
            for layer in self.layers
            if not layer._disable_adapters and set(layer.lora_A) == {SLIDER_ADAPTER}
        ]
        try:
            for layer in alone:
                layer._disable_adapters = True
            yield
        finally:
            for layer in alone:
                layer._disable_adapters = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in adapter_parameters(layer, SLIDER_ADAPTER)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # PEFT drops only the adapters named in this model's peft_config; layers shared with
        # another model (Z-Image's ControlNet runs the transformer's refiners) may also carry
        # that model's adapters, e.g. its assistant. Keep the slider's keys alone.
        others = {
            name
            for layer in tuner_layers(self.model)
            for name in layer._all_available_adapter_names()
            if name != SLIDER_ADAPTER
        }
        state = get_peft_model_state_dict(self.model, adapter_name=SLIDER_ADAPTER)
        return {k: v for k, v in state.items() if not any(f".{n}." in k for n in others)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        self._check_keys(state_dict)
        set_peft_model_state_dict(self.model, state_dict, adapter_name=SLIDER_ADAPTER)


def attach_peft(
    model: nn.Module, target_names: list[str] | None, config: TrainConfig
) -> SliderAdapter:
    """A PEFT LoRA named "slider" on exactly ``target_names`` (rank, alpha, dropout from the
    config), its B initialised to zero so that the slider starts as the identity."""
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import LoraConfig, inject_adapter_in_model

    if not target_names:
        raise ConfigError("a standard LoRA slider needs at least one target module")
    if SLIDER_ADAPTER in getattr(model, "peft_config", {}):
        raise ValueError(f"{type(model).__name__} already has a {SLIDER_ADAPTER!r} adapter")
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=_exact_names_regex(target_names),
        init_lora_weights=True,  # B = 0: the slider starts as the identity
    )
    with quiet_multi_adapter_warning():
        if isinstance(model, PeftAdapterMixin):
            model.add_adapter(lora_config, adapter_name=SLIDER_ADAPTER)
        else:
            inject_adapter_in_model(lora_config, model, adapter_name=SLIDER_ADAPTER)
    activate_all_adapters(model)
    adapter = PeftSliderAdapter(model, target_names, config.lora_rank, config.effective_lora_alpha)
    if len(adapter.layers) != len(target_names):
        raise ValueError(
            f"PEFT adapted {len(adapter.layers)} of {len(target_names)} target modules of "
            f"{type(model).__name__}"
        )
    return adapter
