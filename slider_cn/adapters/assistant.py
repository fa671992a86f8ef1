"""Assistant adapters: a LoRA file loaded as a second, frozen PEFT adapter at a fixed strength.

It is never scaled by the slider and never part of the slider's state dict. Kohya-format files
are converted by the family's own diffusers LoRA loader (``family.lora_state_dict``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from slider_cn.adapters.base import ASSISTANT_ADAPTER, SLIDER_ADAPTER
from slider_cn.adapters.peft import (
    activate_all_adapters,
    adapter_layers,
    adapter_parameters,
    quiet_multi_adapter_warning,
)
from slider_cn.errors import ConfigError

if TYPE_CHECKING:
    from slider_cn.families.base import ModelFamily

log = logging.getLogger(__name__)


class AssistantAdapter:
    """A frozen PEFT adapter loaded from a file; its strength is fixed unless set here."""

    def __init__(self, model: nn.Module, adapter_name: str, path: str, strength: float) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.path = path
        self.layers = adapter_layers(model, adapter_name)
        self.strength = float(strength)
        self.set_strength(strength)

    def set_strength(self, s: float) -> None:
        """Scale the assistant to ``s`` times its own alpha/r (e.g. for validation)."""
        for layer in self.layers:
            layer.set_scale(self.adapter_name, float(s))
        self.strength = float(s)

    @contextlib.contextmanager
    def strength_as(self, s: float) -> Iterator[AssistantAdapter]:
        saved = [layer.scaling[self.adapter_name] for layer in self.layers]
        previous = self.strength
        try:
            self.set_strength(s)
            yield self
        finally:
            for layer, value in zip(self.layers, saved, strict=True):
                layer.scaling[self.adapter_name] = value
            self.strength = previous

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in adapter_parameters(layer, self.adapter_name)]


def _assistant_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(
                f"assistant_lora_path {path} is a folder with {len(files)} .safetensors files; "
                "point it at the LoRA file itself"
            )
        path = files[0]
    if not path.is_file():
        raise ConfigError(f"assistant_lora_path: file not found: {path}")
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"assistant_lora_path {path}: only .safetensors LoRA files are loaded (no pickles)"
        )
    return path


def _is_kohya(keys: list[str]) -> bool:
    return any(
        ".lora_down." in k or k.startswith(("lora_unet_", "lora_transformer_")) for k in keys
    )


def load_assistant_adapter(
    model: nn.Module,
    path: str | Path,
    strength: float,
    adapter_name: str = ASSISTANT_ADAPTER,
    *,
    family: ModelFamily,
) -> AssistantAdapter:
    """Load a LoRA file into ``model`` as a separate, frozen adapter at ``strength``.

    Diffusers/PEFT keys (with or without the "unet."/"transformer." prefix) and kohya keys
    ("lora_unet_...lora_down.weight" with ".alpha") are accepted; text-encoder parts of the
    file are ignored (the assistant is loaded into the denoiser only).
    """
    from safetensors import safe_open

    if adapter_name == SLIDER_ADAPTER:
        raise ValueError(f"{SLIDER_ADAPTER!r} is the slider's adapter name")
    file = _assistant_file(path)
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
    prefix: str | None = family.lora_component
    if _is_kohya(keys):
        from safetensors.torch import load_file

        source: Any
        try:
            source, alphas = family.lora_state_dict(load_file(str(file)), model)
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"assistant_lora_path {file}: diffusers' {family.name} LoRA loader cannot read "
                f"its kohya keys ({exc}); convert it to diffusers format"
            ) from None
        keys = list(source)
        weight_name = None
    else:
        # Let diffusers read the file itself: it also reads the adapter config (alpha) that
        # diffusers writes into the safetensors metadata.
        source, alphas, weight_name = str(file.parent), None, file.name
    if not any(k.startswith(f"{prefix}.") for k in keys):
        prefix = None  # bare PEFT keys, as get_peft_model_state_dict writes them
        alphas = None
    else:
        others = sorted({k.split(".")[0] for k in keys if not k.startswith(f"{prefix}.")})
        if others:
            log.warning(
                "assistant LoRA %s also has weights for %s; only the %s part is loaded",
                file,
                ", ".join(others),
                prefix,
            )
    kwargs: dict[str, Any] = {"adapter_name": adapter_name, "prefix": prefix}
    if weight_name is not None:
        kwargs.update(weight_name=weight_name, use_safetensors=True, local_files_only=True)
    if alphas:
        kwargs["network_alphas"] = alphas
    with quiet_multi_adapter_warning():
        model.load_lora_adapter(source, **kwargs)
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ConfigError(
            f"assistant_lora_path {file}: no LoRA weights in it fit {type(model).__name__}"
        )
    activate_all_adapters(model)
    assistant = AssistantAdapter(model, adapter_name, str(file), strength)
    if not assistant.layers:
        raise ConfigError(
            f"assistant_lora_path {file}: no LoRA weights in it fit {type(model).__name__}"
        )
    log.info(
        "assistant LoRA %s: %d layers at strength %s", file.name, len(assistant.layers), strength
    )
    return assistant
