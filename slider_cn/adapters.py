"""The slider adapter (PEFT LoRA or LyCORIS) on resolved module names, its scale, and assistants.

- ``attach_slider_adapter(model, target_names, config)`` puts the trainable slider adapter on
  exactly the given modules and returns a ``SliderAdapter``: its multiplier is the slider
  strength, and it scales only the slider (never an assistant adapter).
- ``load_assistant_adapter(model, path, strength)`` loads a LoRA file (diffusers/PEFT or kohya
  keys) as a second, frozen PEFT adapter at a fixed strength. It is never scaled by the slider
  and never part of the slider's state dict.

A model may carry both: PEFT runs every adapter in its active list, and both are kept active.
Order does not matter for PEFT sliders; with a LyCORIS slider, load the assistant first when
the algorithm is ``full`` (it takes the original weight off the layer).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slider_cn.errors import ConfigError, read_json, suggest
from slider_cn.targets import adaptable_modules, excluded_by, matches

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig

log = logging.getLogger(__name__)

SLIDER_ADAPTER = "slider"
ASSISTANT_ADAPTER = "assistant"


# --- PEFT helpers ------------------------------------------------------------------------
def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_layers(model: nn.Module, adapter_name: str) -> list[nn.Module]:
    """The PEFT LoRA layers that carry ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return [
        m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A.keys()
    ]


def _adapter_parameters(layer: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if adapter_name in container:
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield item
            else:
                yield from item.parameters()


def _activate_all_adapters(model: nn.Module) -> None:
    """Keep every PEFT adapter of the model active; only the slider's weights train.

    PEFT activates just the newest adapter when one is added (and marks the active ones
    trainable), so after each addition the full list is set again and grads are fixed.
    """
    names = list(getattr(model, "peft_config", {}))
    if not names:
        return
    for layer in _tuner_layers(model):
        # A layer may also carry adapters of another model that shares it (Z-Image's ControlNet
        # runs the transformer's refiners, with the transformer's assistant): keep those too.
        own = [n for n in layer._all_available_adapter_names() if n not in names]
        layer.set_adapter([*names, *own])
        for name in layer._all_available_adapter_names():
            for param in _adapter_parameters(layer, name):
                param.requires_grad_(name == SLIDER_ADAPTER)


@contextlib.contextmanager
def _quiet_multi_adapter_warning() -> Iterator[None]:
    # PEFT warns whenever a second adapter joins a model; here two adapters are the design.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _exact_names_regex(names: list[str]) -> str:
    # PEFT full-matches a string target_modules; a list would match by suffix and could pick
    # up other modules ending in the same name (conv_in vs controlnet_cond_embedding.conv_in).
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def _is_peft_wrapped(model: nn.Module, name: str) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(model.get_submodule(name), BaseTunerLayer)


# --- the slider adapter ------------------------------------------------------------------
class SliderAdapter:
    """The trainable slider adapter on a model; its multiplier is the slider strength.

    ``kind`` is "peft" or "lycoris"; ``algo`` the method ("lora", "lokr", "full", ...);
    ``rank`` / ``alpha`` the linear rank and alpha (None for ``full``); ``target_names`` the
    adapted modules, as the base model names them.
    """

    kind: str = ""
    adapter_name = SLIDER_ADAPTER

    def __init__(
        self,
        model: nn.Module,
        target_names: list[str],
        algo: str,
        rank: int | None,
        alpha: float | None,
    ) -> None:
        self.model = model
        self.target_names = list(target_names)
        self.algo = algo
        self.rank = rank
        self.alpha = alpha
        self._multiplier = 1.0

    # scale control -----------------------------------------------------------------------
    def get_multiplier(self) -> float:
        return self._multiplier

    def set_multiplier(self, s: float) -> None:
        """Scale the slider's contribution by ``s`` (its trained scale times ``s``)."""
        self._apply_multiplier(float(s))
        self._multiplier = float(s)

    @contextlib.contextmanager
    def multiplier(self, s: float) -> Iterator[SliderAdapter]:
        """Run a block at multiplier ``s``; the previous scale comes back bit-exactly."""
        saved = self._save_scales()
        previous = self._multiplier
        try:
            self.set_multiplier(s)
            yield self
        finally:
            self._restore_scales(saved)
            self._multiplier = previous

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[SliderAdapter]:
        """Run a block as if the slider were absent: multiplier 0, and where the adapter
        library allows, its layers not computed at all (the frozen-base prediction of a
        neutral `preserve` step then costs what a forward without the slider costs)."""
        with self.multiplier(0.0), self._skipped():
            yield self

    def _skipped(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _apply_multiplier(self, s: float) -> None:
        raise NotImplementedError

    def _save_scales(self) -> list[float]:
        raise NotImplementedError

    def _restore_scales(self, saved: list[float]) -> None:
        raise NotImplementedError

    # weights -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slider's weights only (no base weights, no assistant), for checkpoints.

        Like ``nn.Module.state_dict`` the tensors share storage with the live weights.
        """
        raise NotImplementedError

    def to(self, *args, **kwargs) -> SliderAdapter:
        """Move weights that live outside the model (LyCORIS); PEFT weights move with it."""
        return self

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "algo": self.algo,
            "rank": self.rank,
            "alpha": self.alpha,
            "modules": len(self.target_names),
            "parameters": sum(p.numel() for p in self.trainable_parameters()),
        }

    def _check_keys(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        given = set(state_dict)
        if expected != given:
            missing = sorted(expected - given)[:5]
            unexpected = sorted(given - expected)[:5]
            raise ValueError(
                f"slider state dict does not fit this {self.kind} adapter: missing {missing}, "
                f"unexpected {unexpected}"
            )


class PeftSliderAdapter(SliderAdapter):
    """A PEFT LoRA adapter named "slider"; the multiplier scales its per-layer alpha/r."""

    kind = "peft"

    def __init__(self, model, target_names, rank, alpha) -> None:
        super().__init__(model, target_names, "lora", rank, alpha)
        self.layers = _adapter_layers(model, SLIDER_ADAPTER)
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
        return [p for layer in self.layers for p in _adapter_parameters(layer, SLIDER_ADAPTER)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # PEFT drops only the adapters named in this model's peft_config; layers shared with
        # another model (Z-Image's ControlNet runs the transformer's refiners) may also carry
        # that model's adapters, e.g. its assistant. Keep the slider's keys alone.
        others = {
            name
            for layer in _tuner_layers(self.model)
            for name in layer._all_available_adapter_names()
            if name != SLIDER_ADAPTER
        }
        state = get_peft_model_state_dict(self.model, adapter_name=SLIDER_ADAPTER)
        return {k: v for k, v in state.items() if not any(f".{n}." in k for n in others)}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        self._check_keys(state_dict)
        set_peft_model_state_dict(self.model, state_dict, adapter_name=SLIDER_ADAPTER)


class LycorisSliderAdapter(SliderAdapter):
    """A LyCORIS network; the multiplier scales the network's own multiplier."""

    kind = "lycoris"

    def __init__(self, model, target_names, network, algo, rank, alpha, base_multiplier) -> None:
        super().__init__(model, target_names, algo, rank, alpha)
        self.network = network
        self.base_multiplier = float(base_multiplier)
        # State-dict keys never depend on whether an assistant wrapped the layer first.
        self._clean_names = {
            lora.lora_name: lora.lora_name.removesuffix("_base_layer") for lora in network.loras
        }

    def _apply_multiplier(self, s: float) -> None:
        self.network.set_multiplier(self.base_multiplier * s)

    def _save_scales(self) -> list[float]:
        return [self.network.multiplier, *(lora.multiplier for lora in self.network.loras)]

    def _restore_scales(self, saved: list[float]) -> None:
        self.network.multiplier = saved[0]
        for lora, value in zip(self.network.loras, saved[1:], strict=True):
            lora.multiplier = value

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def to(self, *args, **kwargs) -> LycorisSliderAdapter:
        """Move the network (it is not a submodule of the model, so model.to() skips it)."""
        self.network.to(*args, **kwargs)
        return self

    def _rename(self, key: str, mapping: dict[str, str]) -> str:
        head, _, rest = key.partition(".")
        return f"{mapping.get(head, head)}.{rest}" if rest else mapping.get(head, head)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self._rename(k, self._clean_names): v for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._check_keys(state_dict)
        back = {clean: actual for actual, clean in self._clean_names.items()}
        self.network.load_state_dict({self._rename(k, back): v for k, v in state_dict.items()})


def attach_slider_adapter(
    model: nn.Module, target_names: list[str] | None, config: TrainConfig
) -> SliderAdapter:
    """Attach the trainable slider adapter to ``model`` on exactly ``target_names``.

    ``lora_type: standard`` -> a PEFT LoRA named "slider" (rank, alpha, dropout from the
    config). ``lora_type: lycoris`` -> a LyCORIS network from ``lycoris_config``; its preset
    narrows the targets further, and ``target_names=None`` lets the preset alone decide.
    """
    if config.lora_type == "standard":
        if not target_names:
            raise ConfigError("a standard LoRA slider needs at least one target module")
        return _attach_peft(model, list(target_names), config)
    return _attach_lycoris(model, target_names, config)


def _attach_peft(model: nn.Module, target_names: list[str], config: TrainConfig) -> SliderAdapter:
    from diffusers.loaders.peft import PeftAdapterMixin
    from peft import LoraConfig, inject_adapter_in_model

    if SLIDER_ADAPTER in getattr(model, "peft_config", {}):
        raise ValueError(f"{type(model).__name__} already has a {SLIDER_ADAPTER!r} adapter")
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.effective_lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=_exact_names_regex(target_names),
        init_lora_weights=True,  # B = 0: the slider starts as the identity
    )
    with _quiet_multi_adapter_warning():
        if isinstance(model, PeftAdapterMixin):
            model.add_adapter(lora_config, adapter_name=SLIDER_ADAPTER)
        else:
            inject_adapter_in_model(lora_config, model, adapter_name=SLIDER_ADAPTER)
    _activate_all_adapters(model)
    adapter = PeftSliderAdapter(model, target_names, config.lora_rank, config.effective_lora_alpha)
    if len(adapter.layers) != len(target_names):
        raise ValueError(
            f"PEFT adapted {len(adapter.layers)} of {len(target_names)} target modules of "
            f"{type(model).__name__}"
        )
    return adapter


# --- LyCORIS -----------------------------------------------------------------------------
# lycoris_config.json keys understood here; everything but apply_preset/multiplier goes to
# lycoris.create_lycoris as keyword arguments.
LYCORIS_KEYS = (
    "algo",
    "multiplier",
    "linear_dim",
    "linear_alpha",
    "conv_dim",
    "conv_alpha",
    "factor",
    "dropout",
    "rank_dropout",
    "module_dropout",
    "use_tucker",
    "use_scalar",
    "block_size",
    "decompose_both",
    "full_matrix",
    "unbalanced_factorization",
    "constraint",
    "rescaled",
    "dora_wd",
    "wd_on_output",
    "bypass_mode",
    "rank_dropout_scale",
    "train_norm",
    "apply_preset",
)

# Class-level state of lycoris.LycorisNetwork that apply_preset() sets and every network
# built afterwards reads. Set explicitly before and after each build so no preset leaks.
_LYCORIS_CLEAN_STATE: dict[str, Any] = {
    "ENABLE_CONV": True,
    "TARGET_REPLACE_MODULE": [],
    "TARGET_REPLACE_NAME": [],
    "MODULE_ALGO_MAP": {},
    "NAME_ALGO_MAP": {},
    "USE_FNMATCH": False,
    "TARGET_EXCLUDE_NAME": [],
    "LORA_PREFIX": "lycoris",
}


def reset_lycoris_preset_state() -> None:
    """Put LycorisNetwork's class-level preset back to an empty, neutral state."""
    from lycoris import LycorisNetwork

    for attr, value in _LYCORIS_CLEAN_STATE.items():
        setattr(LycorisNetwork, attr, value.copy() if hasattr(value, "copy") else value)


def read_lycoris_config(path: str | Path) -> dict[str, Any]:
    """Read and check lycoris_config.json (keys, algo, apply_preset keys)."""
    from lycoris.config_sdk import VALID_PRESET_KEYS
    from lycoris.wrapper import network_module_dict

    path = Path(path)
    raw = read_json(path, "lycoris_config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: lycoris_config must be a JSON object")
    for key in raw:
        if key not in LYCORIS_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'{suggest(key, LYCORIS_KEYS)}")
    algo = str(raw.get("algo", "lora")).lower()
    if algo not in network_module_dict:
        algos = sorted(network_module_dict)
        raise ConfigError(
            f"{path}: key 'algo': unknown LyCORIS algorithm {algo!r}; known: "
            f"{', '.join(algos)}{suggest(algo, algos)}"
        )
    preset = raw.get("apply_preset") or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{path}: key 'apply_preset' must be an object")
    for key in preset:
        if key not in VALID_PRESET_KEYS:
            raise ConfigError(
                f"{path}: unknown key 'apply_preset.{key}'{suggest(key, VALID_PRESET_KEYS)}"
            )
    return {**raw, "algo": algo, "apply_preset": preset, "_path": str(path)}


def _preset_name_match(pattern: str, name: str, use_fnmatch: bool) -> bool:
    # LyCORIS' own rule (re.match from the root, or fnmatch), or a module-path suffix as the
    # guide's presets write them ("attn1.to_q").
    import fnmatch

    if name == pattern or matches(pattern, name):
        return True
    if use_fnmatch:
        return fnmatch.fnmatch(name, pattern)
    try:
        return re.match(pattern, name) is not None
    except re.error:
        return False


def _fix_target_module(preset: dict[str, Any], model: nn.Module, path: str) -> dict[str, Any]:
    """Move module paths found under target_module (a class-name field) to target_name."""
    entries = list(preset.get("target_module") or [])
    if not entries:
        return preset
    class_names = {type(m).__name__ for m in model.modules()}
    module_names = [name for name, _ in model.named_modules() if name]
    classes, paths = [], []
    for entry in entries:
        is_path = entry not in class_names and (
            "." in entry or any(matches(entry, name) for name in module_names)
        )
        (paths if is_path else classes).append(entry)
    if not paths:
        return preset
    log.warning(
        "%s: apply_preset.target_module holds class names, but these are module paths: %s. "
        "Moved to apply_preset.target_name (write them there to silence this warning).",
        path,
        ", ".join(paths),
    )
    fixed = dict(preset)
    fixed["target_module"] = classes
    fixed["target_name"] = [*(preset.get("target_name") or []), *paths]
    return fixed


def _select_lycoris_modules(
    model: nn.Module, preset: dict[str, Any], candidates: list[str] | None
) -> dict[str, dict[str, Any]]:
    """name -> per-module algo overrides, for every layer the preset selects among candidates."""
    class_targets = set(preset.get("target_module") or []) | set(
        preset.get("module_algo_map") or {}
    )
    name_algo_map: dict[str, dict[str, Any]] = preset.get("name_algo_map") or {}
    module_algo_map: dict[str, dict[str, Any]] = preset.get("module_algo_map") or {}
    name_targets = [*(preset.get("target_name") or []), *name_algo_map]
    excludes = list(preset.get("exclude_name") or [])
    use_fnmatch = bool(preset.get("use_fnmatch", False))
    enable_conv = bool(preset.get("enable_conv", True))
    narrows = bool(class_targets or name_targets)
    allowed = set(candidates) if candidates is not None else None

    modules = dict(model.named_modules())
    selected: dict[str, dict[str, Any]] = {}
    for name, layer in adaptable_modules(model):
        if allowed is not None and name not in allowed:
            continue
        if any(_preset_name_match(p, name, use_fnmatch) for p in excludes) or excluded_by(
            excludes, name
        ):
            continue
        if not enable_conv and isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        parts = name.split(".")
        chain = [type(modules[".".join(parts[:i])]).__name__ for i in range(len(parts), 0, -1)]
        chain.append(type(model).__name__)
        by_name = next((p for p in name_targets if _preset_name_match(p, name, use_fnmatch)), None)
        by_class = next((c for c in chain if c in class_targets), None)
        if narrows and by_name is None and by_class is None:
            continue
        overrides: dict[str, Any] = {}
        if by_name in name_algo_map:
            overrides = dict(name_algo_map[by_name])
        else:
            owner = next((c for c in chain if c in module_algo_map), None)
            if owner is not None:
                overrides = dict(module_algo_map[owner])
        selected[name] = overrides
    return selected


def _attach_lycoris(
    model: nn.Module, target_names: list[str] | None, config: TrainConfig
) -> SliderAdapter:
    from lycoris import LycorisNetwork, create_lycoris

    if not config.lycoris_config:
        raise ConfigError("lora_type 'lycoris' needs lycoris_config (a lycoris_config.json file)")
    lyco = read_lycoris_config(config.lycoris_config)
    path = lyco.pop("_path")
    preset = _fix_target_module(lyco.pop("apply_preset"), model, path)
    selected = _select_lycoris_modules(model, preset, target_names)
    if not selected:
        raise ConfigError(
            f"{path}: the LyCORIS preset selects none of the {len(target_names or [])} target "
            f"modules of {type(model).__name__} (apply_preset: {preset})"
        )

    # Adapt a PEFT-wrapped layer (assistant loaded first) through its base layer.
    lyco_names = {
        name: f"{name}.base_layer" if _is_peft_wrapped(model, name) else name for name in selected
    }
    exact = {name: f"^{re.escape(lyco_names[name])}$" for name in selected}
    base_multiplier = float(lyco.pop("multiplier", 1.0))
    algo = lyco.pop("algo")
    linear_dim = lyco.pop("linear_dim", None)
    linear_alpha = lyco.pop("linear_alpha", 1.0)
    reset_lycoris_preset_state()
    try:
        LycorisNetwork.apply_preset(
            {
                "target_module": [],
                "target_name": list(exact.values()),
                "name_algo_map": {exact[n]: cfg for n, cfg in selected.items() if cfg},
                "lora_prefix": preset.get("lora_prefix", "lycoris"),
            }
        )
        network = create_lycoris(
            model,
            multiplier=base_multiplier,
            linear_dim=linear_dim,
            linear_alpha=linear_alpha,
            algo=algo,
            **lyco,
        )
    finally:
        reset_lycoris_preset_state()
    network.apply_to()
    network.requires_grad_(True)
    # The network is not a submodule of the model: put it where the model's weights are.
    first = next(model.parameters(), None)
    if first is not None:
        network.to(first.device)

    if len(network.loras) != len(selected):
        made = {lora.lora_name for lora in network.loras}
        prefix = preset.get("lora_prefix", "lycoris")
        missing = [n for n in selected if f"{prefix}_{lyco_names[n]}".replace(".", "_") not in made]
        raise ConfigError(
            f"{path}: LyCORIS algo {algo!r} could not adapt {len(missing)} selected modules of "
            f"{type(model).__name__}: {missing[:5]}"
        )
    rank = None if algo == "full" else int(linear_dim or 4)
    alpha = None if algo == "full" else float(linear_alpha)
    log.info("LyCORIS %s slider on %d modules of %s", algo, len(selected), type(model).__name__)
    return LycorisSliderAdapter(
        model, list(selected), network, algo, rank, alpha, base_multiplier=base_multiplier
    )


# --- assistant adapters ------------------------------------------------------------------
# diffusers' LoRA loader per denoiser class: its lora_state_dict() turns kohya and other
# non-diffusers key layouts into diffusers/PEFT keys.
_LORA_LOADERS = {
    "UNet2DConditionModel": "StableDiffusionLoraLoaderMixin",
    "SD3Transformer2DModel": "SD3LoraLoaderMixin",
    "FluxTransformer2DModel": "FluxLoraLoaderMixin",
    "ChromaTransformer2DModel": "FluxLoraLoaderMixin",
    "Flux2Transformer2DModel": "Flux2LoraLoaderMixin",
    "AuraFlowTransformer2DModel": "AuraFlowLoraLoaderMixin",
    "Lumina2Transformer2DModel": "Lumina2LoraLoaderMixin",
    "WanTransformer3DModel": "WanLoraLoaderMixin",
    "HiDreamImageTransformer2DModel": "HiDreamImageLoraLoaderMixin",
    "LTXVideoTransformer3DModel": "LTXVideoLoraLoaderMixin",
    "QwenImageTransformer2DModel": "QwenImageLoraLoaderMixin",
    "CosmosTransformer3DModel": "CosmosLoraLoaderMixin",
    "Kandinsky5Transformer3DModel": "KandinskyLoraLoaderMixin",
    "ZImageTransformer2DModel": "ZImageLoraLoaderMixin",
    "SanaTransformer2DModel": "SanaLoraLoaderMixin",
}


class AssistantAdapter:
    """A frozen PEFT adapter loaded from a file; its strength is fixed unless set here."""

    def __init__(self, model: nn.Module, adapter_name: str, path: str, strength: float) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.path = path
        self.layers = _adapter_layers(model, adapter_name)
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
        return [p for layer in self.layers for p in _adapter_parameters(layer, self.adapter_name)]


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


def _kohya_to_diffusers(
    model: nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """Convert kohya keys to diffusers keys with diffusers' own loader for the model's class."""
    import diffusers.loaders.lora_pipeline as lora_pipeline

    loader_name = _LORA_LOADERS.get(type(model).__name__)
    if loader_name is None:
        raise ConfigError(
            f"kohya-format assistant LoRAs are not supported for {type(model).__name__}; "
            "convert it to diffusers format"
        )
    loader = getattr(lora_pipeline, loader_name)
    kwargs = {"unet_config": model.config} if loader_name.startswith("StableDiffusion") else {}
    out = loader.lora_state_dict(state_dict, **kwargs)
    # SD loaders return (state_dict, network_alphas); the others fold alphas into the weights.
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def _component_prefix(model: nn.Module) -> str:
    return "unet" if type(model).__name__ == "UNet2DConditionModel" else "transformer"


def load_assistant_adapter(
    model: nn.Module,
    path: str | Path,
    strength: float,
    adapter_name: str = ASSISTANT_ADAPTER,
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
    prefix: str | None = _component_prefix(model)
    if _is_kohya(keys):
        from safetensors.torch import load_file

        source: Any
        source, alphas = _kohya_to_diffusers(model, load_file(str(file)))
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
    with _quiet_multi_adapter_warning():
        model.load_lora_adapter(source, **kwargs)
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ConfigError(
            f"assistant_lora_path {file}: no LoRA weights in it fit {type(model).__name__}"
        )
    _activate_all_adapters(model)
    assistant = AssistantAdapter(model, adapter_name, str(file), strength)
    if not assistant.layers:
        raise ConfigError(
            f"assistant_lora_path {file}: no LoRA weights in it fit {type(model).__name__}"
        )
    log.info(
        "assistant LoRA %s: %d layers at strength %s", file.name, len(assistant.layers), strength
    )
    return assistant
