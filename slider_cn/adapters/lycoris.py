"""The slider as a LyCORIS network (any of lycoris-lora's algorithms), from lycoris_config.json.

The network lives beside the model (it is not a submodule): ``to()`` moves it, and under
several ranks its gradients are averaged by hand (docs/design.md).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import extract_model_from_parallel as unwrap_model  # DDP, compile
from torch import nn

from slider_cn import formats
from slider_cn.adapters.base import SliderAdapter
from slider_cn.adapters.peft import is_peft_wrapped
from slider_cn.errors import ConfigError, read_json, suggest
from slider_cn.targets import adaptable_modules, excluded_by, matches

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig

log = logging.getLogger(__name__)


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

    def file_names(self, prefix: str) -> dict[str, str]:
        """Module names in memory -> in the slider's file: ``<prefix>_<module path>``.

        The module path is the adapted module's own (``...attn1.to_q``), also where an
        assistant's PEFT layer wraps it (the network then adapts ``...to_q.base_layer``),
        whatever prefix the network was built with; the network in memory and checkpoints keep
        their names (slider_cn/formats.py says which prefix each file gets).
        """
        paths = {
            id(module): name.removesuffix(".base_layer")
            for name, module in unwrap_model(self.model).named_modules()
        }
        return {
            lora.lora_name: formats.kohya_module_name(prefix, paths[id(lora.org_module[0])])
            for lora in self.network.loras
        }

    def file_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The weights as the slider's file holds them, under ``file_names``."""
        state = {
            k: v.detach().float().cpu().contiguous() for k, v in self.network.state_dict().items()
        }
        return formats.rename_lycoris_modules(state, self.file_names(prefix))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._check_keys(state_dict)
        back = {clean: actual for actual, clean in self._clean_names.items()}
        self.network.load_state_dict({self._rename(k, back): v for k, v in state_dict.items()})


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


def attach_lycoris(
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
        name: f"{name}.base_layer" if is_peft_wrapped(model, name) else name for name in selected
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
