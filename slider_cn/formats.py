"""The files a run writes and what is inside them: names, metadata keys, key layouts.

A leaf module (it imports nothing of slider_cn but ``slider_cn.errors``), shared by training's
writer (``outputs.py``), the loaders (``loading.py``, ``validate.py``) and the export command
(``export.py``), so none of them imports another for a file name.

Key layouts of the slider files:

- PEFT / diffusers (``pytorch_lora_weights.safetensors``): ``<component>.<module>.lora_A.weight``
  with the component the family's ``lora_component`` ("unet" or "transformer"); alpha/r folded
  into ``lora_B`` (``ALPHA_FOLDED``), so the ``lora_adapter_metadata`` JSON says lora_alpha = r
  and the training alpha is in ``slider_cn.alpha``;
- kohya (``slider_kohya.safetensors``, ``export --format kohya``): ``<prefix>_<module with _>``
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (the training alpha), with the family's
  ``kohya_prefix``; families without one (transformers) have no kohya format;
- LyCORIS (``slider_lycoris.safetensors``): ``<prefix>_<module with _>.<lycoris parameter>``,
  see :func:`lycoris_key_prefix` for the prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# --- file and folder names of a run's output_dir --------------------------------------------
BASE_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "slider_kohya.safetensors"
CONTROLNET_LORA_FILE = "controlnet_slider.safetensors"
LYCORIS_FILE = "slider_lycoris.safetensors"
CONTROLNET_FOLDER = "controlnet"  # a fresh ControlNet trained with the slider
BASE_FOLDER = "base"  # the base model of a `tiny` run
RUN_FILE = "slider_cn_run.json"  # the run's metadata and the files it wrote
FOLDER_METADATA_FILE = "slider_cn.json"  # metadata beside a saved model folder
EXPORT_FOLDER = "export"
# `use_ema`: the EMA of the slider, written beside it under the same names with this suffix
# (`pytorch_lora_weights_ema.safetensors`, `controlnet_ema/`, ...)
EMA_SUFFIX = "_ema"


def variant_name(name: str, suffix: str) -> str:
    """``name`` with ``suffix`` before its extension: a file or folder of the EMA variant."""
    if not suffix:
        return name
    path = Path(name)
    return f"{path.stem}{suffix}{path.suffix}" if path.suffix else f"{name}{suffix}"


# --- metadata keys (every safetensors file a run writes carries them) -----------------------
FAMILY = "slider_cn.family"
TRAINING_MODE = "slider_cn.training_mode"
LORA_TYPE = "slider_cn.lora_type"
TARGETS = "slider_cn.targets"
STRENGTHS = "slider_cn.strengths"
RANK = "slider_cn.rank"
ALPHA = "slider_cn.alpha"
BASE_MODEL = "slider_cn.base_model"
CONTROLNET_MODEL = "slider_cn.controlnet_model"
NEUTRAL_MODE = "slider_cn.neutral_mode"
STEPS = "slider_cn.steps"
PROMPTS = "slider_cn.prompts"
EXPORTED_STRENGTH = "slider_cn.exported_strength"
# The file holds the EMA of the slider's weights (`use_ema`), not the trained weights.
EMA = "slider_cn.ema"
# The file's lora_B holds alpha/r and its adapter config says alpha = r.
ALPHA_FOLDED = "slider_cn.alpha_folded"
# The prefix of a LyCORIS file's module names ("lora_unet", "lycoris"); absent: "lycoris".
LYCORIS_PREFIX = "slider_cn.lycoris_prefix"
# diffusers' own metadata key: the PEFT LoraConfig of the file, as JSON
DIFFUSERS_ADAPTER_METADATA = "lora_adapter_metadata"

# lycoris-lora's own module-name prefix (LycorisNetwork.LORA_PREFIX)
LYCORIS_NATIVE_PREFIX = "lycoris"


# --- alpha ----------------------------------------------------------------------------------
def unfold_alpha(
    state: dict[str, torch.Tensor], *, alpha: float, rank: int
) -> dict[str, torch.Tensor]:
    """The inverse of ``fold_alpha``: lora_B back at its trained value, for files that carry
    the true alpha (kohya's ``.alpha``)."""
    return fold_alpha(state, alpha=rank, rank=alpha)


def fold_alpha(
    state: dict[str, torch.Tensor], *, alpha: float, rank: int
) -> dict[str, torch.Tensor]:
    """LoRA weights with the scale alpha/r moved into lora_B, for loaders that assume alpha = r."""
    scale = float(alpha) / float(rank)
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


# --- kohya ----------------------------------------------------------------------------------
_KOHYA_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def kohya_module_name(prefix: str, module: str) -> str:
    """``lora_unet`` + ``down_blocks.0.attentions.0.proj_in`` -> ``lora_unet_down_blocks_0_...``."""
    return f"{prefix}_{module}".replace(".", "_")


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor],
    *,
    alpha: float,
    prefix: str,
    component: str | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys (``[component.]<module>.lora_A.weight``) -> kohya keys
    (``<prefix>_<module>.lora_down.weight``).

    ``component``: the first name of diffusers-layout keys (the family's ``lora_component``),
    removed when present. Each module gets an ``.alpha`` tensor holding the **training** alpha.
    Writing alpha = rank (as some converters do) silently rescales the slider by rank/alpha
    (docs/design.md §8.7).
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for peft_suffix, kohya_suffix in _KOHYA_SUFFIXES.items():
            if key.endswith(peft_suffix):
                module = key[: -len(peft_suffix)]
                if component:
                    module = module.removeprefix(f"{component}.")
                name = kohya_module_name(prefix, module)
                converted[name + kohya_suffix] = value.contiguous()
                converted[name + ".alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"not a PEFT LoRA key: {key}")
    return converted


# --- LyCORIS --------------------------------------------------------------------------------
def lycoris_key_prefix(family: Any, side: str) -> str:
    """The module-name prefix of a LyCORIS slider file.

    Base side of a family with a kohya prefix (the UNet families): that prefix, ``lora_unet``.
    ``lora_unet_<diffusers module path>`` is the one name every LyCORIS loader maps: ComfyUI
    (``comfy/lora.py`` ``model_lora_keys_unet``: ``lora_unet_`` and ``lycoris_`` both map
    ``unet_to_diffusers`` names), lycoris-lora's kohya loader (``lycoris.kohya``, used by
    sd-scripts and A1111-style UIs: it maps only ``lora_unet_`` / ``lora_te`` names, 0 keys of a
    ``lycoris_`` file) and A1111's built-in Lora extension.

    Transformer families (no kohya prefix) and ControlNet-side sliders: lycoris-lora's own
    ``lycoris`` prefix. For SD3, Flux and Z-Image, ComfyUI maps ``lycoris_<diffusers path>``
    (SimpleTuner's layout) but ``lora_unet_`` only with the original checkpoints' module paths
    (MMDiT / BFL / NextDiT names, fused qkv), which a LyCORIS module on diffusers' separate
    to_q / to_k / to_v cannot be written as; the kohya loaders of sd-scripts and musubi read
    those original paths too. No UI puts a LoRA on a ControlNet: its file is for
    ``slider_cn.load_slider``.
    """
    if side == "denoiser" and family.kohya_prefix is not None:
        return family.kohya_prefix
    return LYCORIS_NATIVE_PREFIX


def rename_lycoris_modules(
    state: dict[str, torch.Tensor], names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """``<module>.<param>`` keys with each module name mapped through ``names``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, dot, rest = key.partition(".")
        out[f"{names.get(head, head)}{dot}{rest}"] = value
    return out


def reprefix_lycoris(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """``<old>_<module>.<param>`` keys as ``<new>_<module>.<param>`` (others unchanged)."""
    if old == new:
        return dict(state)
    names = {
        key.partition(".")[0]: new + key.partition(".")[0][len(old) :]
        for key in state
        if key.startswith(f"{old}_")
    }
    return rename_lycoris_modules(state, names)


# --- metadata -------------------------------------------------------------------------------
def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def add_metadata(path: str | Path, extra: dict[str, str]) -> None:
    """Merge ``extra`` into a safetensors file's metadata, keeping what is there."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    metadata = read_metadata(path)
    tensors = load_file(str(path))
    metadata.update(extra)
    save_file(tensors, str(path), metadata=metadata)


def slider_cn_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Only slider-cn's own keys of a file's metadata."""
    return {k: v for k, v in metadata.items() if k.startswith("slider_cn.")}


def jsonable(value: Any) -> Any:
    """LoraConfig.to_dict() holds sets and enums; safetensors metadata needs JSON."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset, tuple, list)):
        return [
            jsonable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)
        ]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def adapter_config(metadata: dict[str, str]) -> dict[str, Any]:
    """diffusers' adapter metadata of a LoRA file (its PEFT LoraConfig; a pipeline's
    save_lora_weights prefixes each key with the component, ``unet.lora_alpha``), or {}."""
    import json

    try:
        config = json.loads(metadata[DIFFUSERS_ADAPTER_METADATA])
    except (KeyError, TypeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_value(config: dict[str, Any], name: str) -> Any:
    return next((v for k, v in config.items() if k.rsplit(".", 1)[-1] == name), None)


def training_alpha(metadata: dict[str, str], file: Path) -> float:
    """A LoRA file's training alpha: slider-cn's metadata, else diffusers' adapter metadata."""
    return _number(metadata, ALPHA, "lora_alpha", file, "alpha")


def training_rank(metadata: dict[str, str], file: Path) -> int:
    """A LoRA file's rank: slider-cn's metadata, else diffusers' adapter metadata."""
    return int(_number(metadata, RANK, "r", file, "rank"))


def _number(metadata: dict[str, str], key: str, config_key: str, file: Path, what: str) -> float:
    from slider_cn.errors import ConfigError

    for value in (metadata.get(key), _config_value(adapter_config(metadata), config_key)):
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{file}: no LoRA {what} in its metadata; not a slider-cn file")


def folded_adapter_config(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata for a file whose lora_B holds alpha/r: adapter metadata with lora_alpha = r
    (and no alpha pattern), and the ALPHA_FOLDED flag."""
    import json

    out = dict(metadata)
    config = adapter_config(metadata)
    if config:
        for key in list(config):
            head, _, name = key.rpartition(".")
            prefix = f"{head}." if head else ""
            if name == "lora_alpha":
                config[key] = config.get(f"{prefix}r")
            elif name == "alpha_pattern":
                config[key] = {}
        out[DIFFUSERS_ADAPTER_METADATA] = json.dumps(config, indent=2, sort_keys=True)
    out[ALPHA_FOLDED] = "true"
    return out
