"""The files a finished run leaves in `output_dir` (docs/design.md §6).

- base-side PEFT LoRA: `pytorch_lora_weights.safetensors` (diffusers' layout, loads with
  `pipe.load_lora_weights(output_dir)`) and `slider_kohya.safetensors` (kohya keys with the
  true alpha, for ComfyUI / A1111);
- ControlNet-side PEFT LoRA: `controlnet_slider.safetensors` (unprefixed keys, loads with
  `pipe.controlnet.load_lora_adapter(path, prefix=None)`); a fresh ControlNet (its trained
  output projections included, the slider not merged) is saved to `controlnet/`;
- LyCORIS: `slider_lycoris.safetensors` in the lycoris-lora library's own format;
- `tiny` runs: the base components in `base/`, so the result can be loaded and inspected.
Every safetensors file carries slider-cn metadata (family, mode, targets, strengths, rank/alpha,
base model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slider_cn import export

BASE_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "slider_kohya.safetensors"
CONTROLNET_LORA_FILE = "controlnet_slider.safetensors"
LYCORIS_FILE = "slider_lycoris.safetensors"


# Metadata flag: the file's lora_B holds alpha/r and its adapter config says alpha = r.
ALPHA_FOLDED = "slider_cn.alpha_folded"


def fold_alpha(
    state: dict[str, torch.Tensor], *, alpha: float, rank: int
) -> dict[str, torch.Tensor]:
    """LoRA weights with the scale alpha/r moved into lora_B, for loaders that assume alpha = r."""
    scale = float(alpha) / float(rank)
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def slider_metadata(config, family, targets, backends, steps: int, adapter) -> dict[str, str]:
    strengths = {b.id: b.slider_strength for b in backends if b.slider_strength}
    return {
        "slider_cn.family": family.name,
        "slider_cn.training_mode": config.training_mode,
        "slider_cn.lora_type": config.lora_type,
        "slider_cn.targets": json.dumps(list(targets.names)),
        "slider_cn.strengths": json.dumps(strengths),
        "slider_cn.rank": str(adapter.rank),
        "slider_cn.alpha": str(adapter.alpha),
        "slider_cn.base_model": config.pretrained_model_name_or_path,
        "slider_cn.controlnet_model": config.controlnet_model_name_or_path or "",
        "slider_cn.neutral_mode": config.slider_neutral_mode,
        "slider_cn.steps": str(steps),
        # the text sliders it learned, so a file says what its ends mean
        "slider_cn.prompts": json.dumps(
            {
                b.prompt.entry: b.prompt.to_json()
                for b in backends
                if b.prompt is not None and b.prompt.kind == "pair"
            }
        ),
    }


def add_metadata(path: str | Path, extra: dict[str, str]) -> None:
    """Merge ``extra`` into a safetensors file's metadata, keeping what is there."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(path))
    metadata.update(extra)
    save_file(tensors, str(path), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def clean_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffusers model without any adapter layers (PEFT or LyCORIS)."""
    clean = type(model).from_config(model.config)
    state = {}
    for key, value in model.state_dict().items():
        if _is_adapter_key(key) and ".base_layer." not in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    clean.load_state_dict(state, strict=True)
    return clean


def write_final_outputs(
    output_dir: str | Path,
    *,
    config,
    family,
    components,
    adapter,
    trainable: torch.nn.Module,
    targets,
    projection_names: list[str],
    backends,
    steps: int,
) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = slider_metadata(config, family, targets, backends, steps, adapter)
    written: dict[str, Path] = {}
    side = "controlnet" if config.training_mode == "controlnet" else "denoiser"

    if adapter.kind == "lycoris":
        path = output_dir / LYCORIS_FILE
        adapter.network.save_weights(str(path), torch.float32, metadata)
        written["lycoris"] = path
    else:
        lora_state = {
            k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()
        }
        lora_config = _jsonable(
            LoraConfig(
                r=adapter.rank, lora_alpha=adapter.alpha, target_modules=list(adapter.target_names)
            ).to_dict()
        )
        if side == "denoiser":
            # unet_lora_layers for UNet families, transformer_lora_layers for transformers
            component = family.lora_component
            family.pipeline_class.save_lora_weights(
                str(output_dir),
                **{
                    f"{component}_lora_layers": lora_state,
                    f"{component}_lora_adapter_metadata": lora_config,
                },
                weight_name=BASE_LORA_FILE,
            )
            add_metadata(output_dir / BASE_LORA_FILE, metadata)
            written["diffusers"] = output_dir / BASE_LORA_FILE
            if family.kohya_prefix is not None:  # UNet families only
                kohya = export.peft_to_kohya(
                    lora_state, alpha=adapter.alpha, prefix=family.kohya_prefix
                )
                save_file(
                    kohya,
                    str(output_dir / KOHYA_FILE),
                    metadata={
                        **metadata,
                        "ss_network_alpha": str(adapter.alpha),
                        "ss_network_dim": str(adapter.rank),
                    },
                )
                written["kohya"] = output_dir / KOHYA_FILE
        else:
            path = output_dir / CONTROLNET_LORA_FILE
            # alpha/r folded into lora_B, lora_alpha = r: `load_lora_adapter(file_path,
            # prefix=None)` does not read a file's adapter metadata (diffusers 0.42 reads it only
            # with weight_name= or use_safetensors=True) and would take alpha = r, rescaling the
            # slider by r/alpha. Folded, every way of loading gives the trained scale.
            save_file(
                fold_alpha(lora_state, alpha=adapter.alpha, rank=adapter.rank),
                str(path),
                metadata={
                    "format": "pt",
                    "lora_adapter_metadata": json.dumps(
                        {**lora_config, "lora_alpha": adapter.rank}, sort_keys=True
                    ),
                    **metadata,
                    ALPHA_FOLDED: "true",
                },
            )
            written["controlnet_lora"] = path

    if side == "controlnet" and components.controlnet_is_fresh:
        # A fresh ControlNet exists nowhere else: save it as initialised plus its trained output
        # projections, without the slider (which loads on top of it).
        folder = output_dir / "controlnet"
        if config.base_model_precision != "no":
            # the denoiser in memory is stored quantized: initialise from the base as loaded
            denoiser = family.load_components(with_controlnet=False).denoiser
        else:
            denoiser = _unwrap(components.denoiser)
            if _has_adapters(denoiser):  # e.g. an assistant LoRA: initialise from the clean base
                denoiser = clean_copy(denoiser)
        controlnet = family.fresh_controlnet(denoiser)
        trained = dict(_unwrap(trainable).named_modules())
        for name in projection_names:
            dict(controlnet.named_modules())[name].load_state_dict(trained[name].state_dict())
        controlnet.save_pretrained(str(folder), safe_serialization=True)
        (folder / "slider_cn.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        written["controlnet"] = folder

    if config.is_tiny:
        # `tiny` is deterministic per seed: rebuild the untouched base rather than strip adapters.
        family.save_pretrained(family.load_components(with_controlnet=False), output_dir / "base")
        written["base"] = output_dir / "base"

    (output_dir / "slider_cn_run.json").write_text(
        json.dumps(
            {"metadata": metadata, "files": {k: str(v) for k, v in written.items()}}, indent=2
        ),
        encoding="utf-8",
    )
    return written


def _jsonable(value: Any) -> Any:
    """LoraConfig.to_dict() holds sets and enums; safetensors metadata needs JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset, tuple, list)):
        return [
            _jsonable(v) for v in (sorted(value) if isinstance(value, (set, frozenset)) else value)
        ]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value
    return value


def _has_adapters(model: torch.nn.Module) -> bool:
    return any(_is_adapter_key(key) for key in model.state_dict())


def _is_adapter_key(key: str) -> bool:
    return "lora_" in key or ".lokr_" in key or ".hada_" in key or ".base_layer." in key


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP wraps the trained model
