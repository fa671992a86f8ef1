"""Load a slider made by slider-cn into a diffusers pipeline and set its strength everywhere.

For users' own scripts::

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from slider_cn import load_slider, set_slider_strength

    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet)
    load_slider(pipe, "output/")           # base side or ControlNet side, read from the files
    set_slider_strength(pipe, -0.5)         # reaches the UNet *and* the ControlNet

Why not ``pipe(..., cross_attention_kwargs={"scale": s})``: in diffusers' SD/SDXL ControlNet
pipelines that per-call scale reaches the UNet only, never the ControlNet (docs/design.md §8.8), and
it scales every adapter of the UNet, an assistant LoRA included. ``set_slider_strength`` sets the
scale of the slider adapter alone, on every model that holds it, through PEFT's own per-layer
``set_scale`` (strength x alpha/r); negative strengths and 0 work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slider_cn.errors import ConfigError
from slider_cn.outputs import BASE_LORA_FILE, CONTROLNET_LORA_FILE, LYCORIS_FILE, read_metadata

SLIDER_ADAPTER_NAME = "slider"
# Pipeline attributes that may hold a slider: the denoiser and the ControlNet.
_HOLDERS = ("unet", "transformer", "controlnet")
# LyCORIS networks loaded by load_slider, kept on their model (in a dict, so they are not
# registered as submodules and never end up in the model's state dict).
_LYCORIS_ATTR = "_slider_cn_lycoris"


@dataclass
class SliderFiles:
    """The files of a slider-cn output folder (any that exist)."""

    folder: Path
    base_lora: Path | None = None
    controlnet_lora: Path | None = None
    lycoris: Path | None = None
    controlnet: Path | None = None  # a fresh ControlNet trained with the slider
    base: Path | None = None  # the base model of a `tiny` run

    @property
    def slider_file(self) -> Path:
        for path in (self.base_lora, self.controlnet_lora, self.lycoris):
            if path is not None:
                return path
        raise ConfigError(
            f"{self.folder}: no slider file in it (expected {BASE_LORA_FILE}, "
            f"{CONTROLNET_LORA_FILE} or {LYCORIS_FILE}); pass the output_dir of a finished run"
        )

    @property
    def is_lycoris(self) -> bool:
        return self.slider_file == self.lycoris

    @property
    def metadata(self) -> dict[str, str]:
        return read_metadata(self.slider_file)

    @property
    def side(self) -> str:
        """Which model the slider was trained on: "denoiser" or "controlnet"."""
        if self.controlnet_lora is not None:
            return "controlnet"
        if self.base_lora is not None:
            return "denoiser"
        mode = self.metadata.get("slider_cn.training_mode", "lora")
        return "controlnet" if mode == "controlnet" else "denoiser"


def slider_files(adapter: str | Path) -> SliderFiles:
    """Find the slider files in a run's output folder (or the folder of the given file)."""
    path = Path(adapter)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"--adapter {adapter}: folder not found; pass a run's output_dir")

    def found(name: str) -> Path | None:
        return path / name if (path / name).exists() else None

    files = SliderFiles(
        folder=path,
        base_lora=found(BASE_LORA_FILE),
        controlnet_lora=found(CONTROLNET_LORA_FILE),
        lycoris=found(LYCORIS_FILE),
        controlnet=found("controlnet") if found("controlnet/config.json") else None,
        base=found("base") if found("base/model_index.json") else None,
    )
    files.slider_file  # noqa: B018 - raises a clear error when there is none
    return files


def load_slider_controlnet(adapter: str | Path, **kwargs: Any) -> nn.Module:
    """The ControlNet a ControlNet-side slider was trained on, when the run made a fresh one.

    A fresh ControlNet (built from the base UNet) exists nowhere but the run's ``controlnet/``
    folder; pass it to the pipeline, then ``load_slider`` puts the slider on it. ``kwargs`` go
    to ``ControlNetModel.from_pretrained`` (e.g. ``torch_dtype``).
    """
    from diffusers import ControlNetModel

    files = slider_files(adapter)
    if files.controlnet is None:
        base = files.metadata.get("slider_cn.controlnet_model") or "(none recorded)"
        raise ConfigError(
            f"{files.folder}: no controlnet/ folder (the run used an existing ControlNet: {base}); "
            "load that one with ControlNetModel.from_pretrained"
        )
    return ControlNetModel.from_pretrained(str(files.controlnet), **kwargs)


def _role(model: nn.Module) -> str:
    name = type(model).__name__
    if "ControlNet" in name:
        return "controlnet"
    return "unet" if name.startswith("UNet") else "transformer"


def _holders(pipe_or_model: Any) -> dict[str, nn.Module]:
    """The models of a pipeline that may carry a slider (a bare model is its own holder)."""
    if isinstance(pipe_or_model, nn.Module) and not hasattr(pipe_or_model, "nets"):
        return {_role(pipe_or_model): pipe_or_model}
    found: dict[str, nn.Module] = {}
    sources = (
        {"controlnet": pipe_or_model}
        if isinstance(pipe_or_model, nn.Module)
        else {name: getattr(pipe_or_model, name, None) for name in _HOLDERS}
    )
    for name, model in sources.items():
        if model is None:
            continue
        nets = getattr(model, "nets", None)  # MultiControlNetModel
        if nets is not None:
            found.update({f"{name}.{i}": net for i, net in enumerate(nets)})
        else:
            found[name] = model
    return found


def _lora_layers(model: nn.Module, adapter_name: str) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling]


def set_slider_strength(
    pipe_or_model: Any, strength: float, adapter_name: str = SLIDER_ADAPTER_NAME
) -> list[str]:
    """Set the slider's strength on every model of the pipeline that holds it.

    Only the slider adapter is touched: other adapters (an assistant LoRA, style LoRAs) keep
    their scale and their active state. Returns the names of the models that were set.
    """
    strength = float(strength)
    reached: list[str] = []
    for name, model in _holders(pipe_or_model).items():
        layers = _lora_layers(model, adapter_name)
        for layer in layers:
            layer.set_scale(adapter_name, strength)  # strength x alpha / r, per layer
        network = getattr(model, _LYCORIS_ATTR, {}).get(adapter_name)
        if network is not None:
            network.set_multiplier(strength)
        if layers or network is not None:
            reached.append(name)
    if not reached:
        raise ValueError(
            f"no model of {type(pipe_or_model).__name__} holds an adapter named {adapter_name!r}; "
            "load it first with slider_cn.load_slider (or pipe.load_lora_weights(..., "
            f"adapter_name={adapter_name!r}))"
        )
    return reached


def _active_adapters(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            active = module.active_adapter
            return [active] if isinstance(active, str) else list(active)
    return []


def _keep_active(model: nn.Module, previous: list[str], adapter_name: str) -> None:
    """PEFT activates only the newest adapter; keep the ones that were active before, too."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not previous:
        return
    names = [*dict.fromkeys([*previous, adapter_name])]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            wanted = [n for n in names if n in module._all_available_adapter_names()]
            module.set_adapter(wanted)
            for param in module.parameters():
                param.requires_grad_(False)  # set_adapter marks active adapters trainable


def _check_name_free(models: dict[str, nn.Module], adapter_name: str) -> None:
    for name, model in models.items():
        if adapter_name in getattr(model, "peft_config", {}) or adapter_name in getattr(
            model, _LYCORIS_ATTR, {}
        ):
            raise ValueError(
                f"{name} already has an adapter named {adapter_name!r}; pass another adapter_name"
            )


def _load_lycoris(model: nn.Module, file: Path, strength: float, adapter_name: str) -> None:
    from lycoris import create_lycoris_from_weights

    network, _ = create_lycoris_from_weights(strength, str(file), model)
    if not network.loras:
        raise ConfigError(
            f"{file}: none of its LyCORIS modules match {type(model).__name__}; load it into the "
            "model it was trained on"
        )
    network.apply_to()
    first = next(model.parameters())
    network.to(device=first.device, dtype=first.dtype)
    network.requires_grad_(False)
    holder = dict(getattr(model, _LYCORIS_ATTR, {}))
    holder[adapter_name] = network
    object.__setattr__(model, _LYCORIS_ATTR, holder)


def load_slider(
    pipe: Any,
    adapter: str | Path,
    *,
    strength: float = 1.0,
    adapter_name: str = SLIDER_ADAPTER_NAME,
) -> list[str]:
    """Load the slider of a slider-cn output folder into ``pipe`` and set its strength.

    - base-side slider (``pytorch_lora_weights.safetensors``): ``pipe.load_lora_weights``;
    - ControlNet-side slider (``controlnet_slider.safetensors``):
      ``pipe.controlnet.load_lora_adapter(file, prefix=None)``; for a run that trained a fresh
      ControlNet, build the pipeline with ``load_slider_controlnet(adapter)`` first;
    - LyCORIS (``slider_lycoris.safetensors``): the lycoris-lora library's own loader, on the
      denoiser or the ControlNet as the run trained it. Load it after ``pipe.to(device)``: the
      network is not a submodule and does not move with the pipeline.

    Adapters already active stay active. Returns the models the slider was loaded into.
    """
    files = slider_files(adapter)
    holders = _holders(pipe)
    _check_name_free(holders, adapter_name)
    side = files.side
    if side == "controlnet":
        target_name = next((n for n in holders if n.startswith("controlnet")), None)
        if target_name is None:
            raise ConfigError(
                f"{files.slider_file}: a ControlNet-side slider needs a pipeline with a ControlNet "
                f"(StableDiffusionControlNetPipeline, ...); {type(pipe).__name__} has none"
            )
        if target_name != "controlnet":
            raise ConfigError(
                "a MultiControlNetModel pipeline: load the slider into the one ControlNet it was "
                "trained on with load_slider(that_controlnet, ...) before building the pipeline"
            )
    else:
        target_name = next((n for n in ("unet", "transformer") if n in holders), None)
        if target_name is None:
            raise ConfigError(
                f"{files.slider_file}: a base-side slider goes into the denoiser; "
                f"{type(pipe).__name__} has no unet or transformer"
            )
    model = holders[target_name]
    previous = _active_adapters(model)

    if files.is_lycoris:
        _load_lycoris(model, files.slider_file, strength, adapter_name)
    elif side == "controlnet":
        model.load_lora_adapter(str(files.controlnet_lora), prefix=None, adapter_name=adapter_name)
    elif hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(
            str(files.folder), weight_name=BASE_LORA_FILE, adapter_name=adapter_name
        )
    else:  # a bare denoiser: its file's keys carry the "unet." / "transformer." prefix
        prefix = "unet" if type(model).__name__.startswith("UNet") else "transformer"
        model.load_lora_adapter(
            str(files.folder), weight_name=BASE_LORA_FILE, prefix=prefix, adapter_name=adapter_name
        )
    if not files.is_lycoris:
        if not _lora_layers(model, adapter_name):
            raise ConfigError(f"{files.slider_file}: no LoRA weights in it fit {target_name}")
        _keep_active(model, previous, adapter_name)
    set_slider_strength(pipe, strength, adapter_name)
    return [target_name]


def slider_info(adapter: str | Path) -> dict[str, Any]:
    """The slider-cn metadata of a run (family, mode, targets, strengths, rank/alpha, ...)."""
    meta = slider_files(adapter).metadata
    info: dict[str, Any] = {}
    for key, value in meta.items():
        if not key.startswith("slider_cn."):
            continue
        short = key.removeprefix("slider_cn.")
        try:
            info[short] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            info[short] = value
    return info
