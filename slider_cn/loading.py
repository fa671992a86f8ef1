"""Load a slider made by slider-cn into a diffusers pipeline and set its strength everywhere.

For users' own scripts::

    from diffusers import StableDiffusionControlNetPipeline
    from slider_cn import load_slider, load_slider_controlnet, set_slider_strength

    controlnet = load_slider_controlnet("output/")  # a run's fresh ControlNet, its family's class
    pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=controlnet)
    load_slider(pipe, "output/")           # base side or ControlNet side, read from the files
    set_slider_strength(pipe, -0.5)         # reaches the UNet *and* the ControlNet

The run's family (its metadata) says which classes fit: ``slider_files(out).family`` has the
denoiser and ControlNet classes and the pipelines (``pipeline_class``,
``controlnet_pipeline_class``); a slider given a model of another class is a ConfigError.

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

from slider_cn import formats
from slider_cn.adapters.base import SLIDER_ADAPTER
from slider_cn.adapters.peft import adapter_layers
from slider_cn.errors import ConfigError
from slider_cn.formats import (
    BASE_FOLDER,
    BASE_LORA_FILE,
    CONTROLNET_FOLDER,
    CONTROLNET_LORA_FILE,
    LYCORIS_FILE,
    read_metadata,
)

SLIDER_ADAPTER_NAME = SLIDER_ADAPTER  # the adapter name training gives the slider
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
        mode = self.metadata.get(formats.TRAINING_MODE, "lora")
        return "controlnet" if mode == "controlnet" else "denoiser"

    @property
    def family(self) -> Any:
        """The family class of the run (slider_cn.families), from the slider file's metadata:
        its diffusers classes, pipelines, LoRA component and kohya prefix."""
        from slider_cn.families import family_class, family_names

        name = self.metadata.get(formats.FAMILY)
        if name not in family_names():
            raise ConfigError(
                f"{self.slider_file}: its metadata names no known model family "
                f"({formats.FAMILY}: {name!r}; known: {', '.join(family_names())}); "
                "pass the output_dir of a slider-cn run"
            )
        return family_class(name)


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
        controlnet=found(CONTROLNET_FOLDER) if found(f"{CONTROLNET_FOLDER}/config.json") else None,
        base=found(BASE_FOLDER) if found(f"{BASE_FOLDER}/model_index.json") else None,
    )
    files.slider_file  # noqa: B018 - raises a clear error when there is none
    return files


def check_model_folder(folder: str | Path, expected: type, what: str) -> None:
    """A diffusers model folder must hold ``expected`` (its config's ``_class_name``): loading
    another class's folder would build a randomly initialised ``expected``."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return  # a hub id or a single file: diffusers says what is wrong with it
    try:
        found = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return
    if found and found != expected.__name__:
        raise ConfigError(
            f"{folder} holds a {found}, but {what} needs a {expected.__name__}; pass the one the "
            "slider was trained on"
        )


def load_slider_controlnet(adapter: str | Path, **kwargs: Any) -> nn.Module:
    """The ControlNet a ControlNet-side slider was trained on, when the run made a fresh one.

    A fresh ControlNet (built from the base denoiser) exists nowhere but the run's
    ``controlnet/`` folder; pass it to the family's ControlNet pipeline, then ``load_slider``
    puts the slider on it. Its class is the run's family's (``ControlNetModel``,
    ``SD3ControlNetModel``, ``FluxControlNetModel``, ``ZImageControlNetModel``); ``kwargs`` go to
    its ``from_pretrained`` (e.g. ``torch_dtype``). A Z-Image ControlNet borrows the
    transformer's embedders and refiners: its pipeline attaches them when it is built.
    """
    files = slider_files(adapter)
    family = files.family
    model_class = family.controlnet_model_class
    if files.controlnet is None:
        base = files.metadata.get(formats.CONTROLNET_MODEL)
        if files.side == "controlnet" and base:
            raise ConfigError(
                f"{files.folder}: no {CONTROLNET_FOLDER}/ folder (the run used an existing "
                f"ControlNet: {base}); load that one with {model_class.__name__}.from_pretrained"
            )
        raise ConfigError(
            f"{files.folder}: no {CONTROLNET_FOLDER}/ folder: this run trained a base-side "
            f"slider (load it with load_slider into a {family.pipeline_class.__name__}) "
            f"{'with the ControlNet ' + base if base else 'without a ControlNet'}"
        )
    check_model_folder(files.controlnet, model_class, f"a {family.name} ControlNet")
    return model_class.from_pretrained(str(files.controlnet), **kwargs)


def _family_role(model: nn.Module) -> str | None:
    """ "controlnet" or the LoRA component name for a model of a known family's class."""
    from slider_cn.families import family_class, family_names

    for name in family_names():
        family = family_class(name)
        if family.has_controlnet() and isinstance(model, family.controlnet_model_class):
            return "controlnet"
        if isinstance(model, family.denoiser_model_class):
            return family.lora_component
    return None


def _is_multi_controlnet(model: Any) -> bool:
    return isinstance(getattr(model, "nets", None), nn.ModuleList)


def _pipeline_models(pipe: Any) -> dict[str, nn.Module]:
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = vars(pipe)
    return {name: model for name, model in components.items() if isinstance(model, nn.Module)}


def _holders(pipe_or_model: Any) -> dict[str, nn.Module]:
    """The models of a pipeline that may carry a slider, by component name (a bare model is
    its own holder; the ControlNets of a MultiControlNetModel are ``controlnet.<i>``)."""
    if isinstance(pipe_or_model, nn.Module):
        if _is_multi_controlnet(pipe_or_model):
            sources = {"controlnet": pipe_or_model}
        else:
            return {_family_role(pipe_or_model) or "model": pipe_or_model}
    else:
        sources = _pipeline_models(pipe_or_model)
    found: dict[str, nn.Module] = {}
    for name, model in sources.items():
        if _is_multi_controlnet(model):
            found.update({f"{name}.{i}": net for i, net in enumerate(model.nets)})
        else:
            found[name] = model
    return found


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
        layers = adapter_layers(model, adapter_name)
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


def _lycoris_weights(file: Path, metadata: dict[str, str], prefix: str) -> dict[str, Any]:
    """A LyCORIS slider file's weights with ``prefix`` on its module names (the file may use
    kohya-style names: slider_cn/formats.py ``lycoris_key_prefix``)."""
    from safetensors.torch import load_file

    written = metadata.get(formats.LYCORIS_PREFIX, formats.LYCORIS_NATIVE_PREFIX)
    return formats.reprefix_lycoris(load_file(str(file)), written, prefix)


def _load_lycoris(model: nn.Module, files: SliderFiles, strength: float, adapter_name: str) -> None:
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    file = files.slider_file
    # lycoris-lora's loader maps `<LycorisNetwork.LORA_PREFIX>_<module path>` names
    weights = _lycoris_weights(file, files.metadata, LycorisNetwork.LORA_PREFIX)
    network, _ = create_lycoris_from_weights(strength, str(file), model, weights_sd=weights)
    wanted = {key.partition(".")[0] for key in weights if "." in key}
    unmatched = sorted(wanted - {lora.lora_name for lora in network.loras})
    if unmatched:
        raise ConfigError(
            f"{file}: {len(unmatched)} of its {len(wanted)} LyCORIS modules match no module of "
            f"{type(model).__name__} (e.g. {unmatched[0]}); load it into the model it was "
            "trained on"
        )
    network.apply_to()
    first = next(model.parameters())
    network.to(device=first.device, dtype=first.dtype)
    network.requires_grad_(False)
    holder = dict(getattr(model, _LYCORIS_ATTR, {}))
    holder[adapter_name] = network
    object.__setattr__(model, _LYCORIS_ATTR, holder)


def _target(pipe: Any, holders: dict[str, nn.Module], files: SliderFiles) -> str:
    """The holder the slider goes into: the ControlNet or the family's denoiser, checked to be
    of the run's family's class."""
    family = files.family
    bare = isinstance(pipe, nn.Module) and not _is_multi_controlnet(pipe)
    if files.side == "controlnet":
        expected, what = family.controlnet_model_class, "ControlNet"
        name = next(iter(holders)) if bare else "controlnet"
        if not bare and name not in holders:
            if any(n.startswith("controlnet.") for n in holders):
                raise ConfigError(
                    "a MultiControlNetModel pipeline: load the slider into the one ControlNet it "
                    "was trained on with load_slider(that_controlnet, ...) before building the "
                    "pipeline"
                )
            raise ConfigError(
                f"{files.slider_file}: a ControlNet-side slider needs a pipeline with a "
                f"ControlNet ({family.controlnet_pipeline_class.__name__}); "
                f"{type(pipe).__name__} has none"
            )
    else:
        expected, what = family.denoiser_model_class, "denoiser"
        name = next(iter(holders)) if bare else family.lora_component
        if not bare and name not in holders:
            raise ConfigError(
                f"{files.slider_file}: a base-side {family.name} slider goes into the "
                f"{name} of a {family.pipeline_class.__name__} (or "
                f"{family.controlnet_pipeline_class.__name__}); {type(pipe).__name__} has no {name}"
            )
    if not isinstance(holders[name], expected):
        pipeline = (
            family.controlnet_pipeline_class
            if files.side == "controlnet"
            else family.pipeline_class
        )
        raise ConfigError(
            f"{files.slider_file} was trained on a {family.name} {what} ({expected.__name__}); "
            f"got a {type(holders[name]).__name__}: load it into a {pipeline.__name__} of that "
            "family (slider_cn.load_slider_controlnet gives a fresh run's ControlNet)"
        )
    return name


def _is_mismatch(exc: Exception) -> bool:
    """A library error that means the file does not fit the model (not a bug or an OOM)."""
    from peft.utils.error import PeftError

    if isinstance(exc, (PeftError, ValueError, KeyError)):
        return True
    return isinstance(exc, RuntimeError) and (
        "size mismatch" in str(exc) or "Error(s) in loading state_dict" in str(exc)
    )


def load_slider(
    pipe: Any,
    adapter: str | Path,
    *,
    strength: float = 1.0,
    adapter_name: str = SLIDER_ADAPTER_NAME,
) -> list[str]:
    """Load the slider of a slider-cn output folder into ``pipe`` and set its strength.

    ``pipe`` is the run's family's pipeline (plain or with a ControlNet), or the bare model the
    slider was trained on (its denoiser or ControlNet).

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
    target_name = _target(pipe, holders, files)
    model = holders[target_name]
    previous = _active_adapters(model)
    component = files.family.lora_component

    try:
        if files.is_lycoris:
            _load_lycoris(model, files, strength, adapter_name)
        elif files.side == "controlnet":
            model.load_lora_adapter(
                str(files.controlnet_lora), prefix=None, adapter_name=adapter_name
            )
        elif hasattr(pipe, "load_lora_weights"):
            pipe.load_lora_weights(
                str(files.folder), weight_name=BASE_LORA_FILE, adapter_name=adapter_name
            )
        else:  # a bare denoiser: the file's keys carry the family's component prefix
            model.load_lora_adapter(
                str(files.folder),
                weight_name=BASE_LORA_FILE,
                prefix=component,
                adapter_name=adapter_name,
            )
    except Exception as exc:
        if isinstance(exc, ConfigError) or not _is_mismatch(exc):
            raise
        raise ConfigError(
            f"{files.slider_file} does not fit {target_name} ({type(model).__name__}): {exc}; "
            "load it into the model it was trained on"
        ) from None
    if not files.is_lycoris:
        if not adapter_layers(model, adapter_name):
            raise ConfigError(f"{files.slider_file}: no LoRA weights in it fit {target_name}")
        _keep_active(model, previous, adapter_name)
    set_slider_strength(pipe, strength, adapter_name)
    return [target_name]


def slider_info(adapter: str | Path) -> dict[str, Any]:
    """The slider-cn metadata of a run (family, mode, targets, strengths, rank/alpha, ...)."""
    meta = slider_files(adapter).metadata
    info: dict[str, Any] = {}
    for key, value in formats.slider_cn_metadata(meta).items():
        short = key.removeprefix("slider_cn.")
        try:
            info[short] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            info[short] = value
    return info
