"""The files a finished run leaves in `output_dir` (docs/design.md §6).

- base-side PEFT LoRA: `pytorch_lora_weights.safetensors` (diffusers' layout, alpha/r folded
  into lora_B, loads with `pipe.load_lora_weights(output_dir)`) and, for families with kohya
  names (the UNet ones), `slider_kohya.safetensors` (kohya keys with the true alpha, for
  ComfyUI / A1111);
- ControlNet-side PEFT LoRA: `controlnet_slider.safetensors` (unprefixed keys, loads with
  `pipe.controlnet.load_lora_adapter(path, prefix=None)`); a fresh ControlNet (its trained
  output projections included, the slider not merged) is saved to `controlnet/`;
- LyCORIS: `slider_lycoris.safetensors`, lycoris-lora's layout with kohya-style module names
  (`lora_unet_...`) for UNet families (slider_cn/formats.py `lycoris_key_prefix`);
- `tiny` runs: the base components in `base/`, so the result can be loaded and inspected;
- `use_ema`: the EMA of the slider's weights beside each slider file, in its format, under its
  name with `_ema` (`pytorch_lora_weights_ema.safetensors`, `controlnet_ema/`, ...), with
  `slider_cn.ema` in its metadata.
Every safetensors file carries slider-cn metadata (family, mode, targets, strengths, rank/alpha,
base model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel as unwrap_model  # DDP, compile
from peft import LoraConfig
from safetensors.torch import save_file

from slider_cn import formats
from slider_cn.formats import (
    ALPHA_FOLDED,
    BASE_FOLDER,
    BASE_LORA_FILE,
    CONTROLNET_FOLDER,
    CONTROLNET_LORA_FILE,
    EMA_SUFFIX,
    FOLDER_METADATA_FILE,
    KOHYA_FILE,
    LYCORIS_FILE,
    LYCORIS_PREFIX,
    RUN_FILE,
    add_metadata,
    fold_alpha,
    jsonable,
    peft_to_kohya,
    variant_name,
)


def slider_metadata(config, family, targets, backends, steps: int, adapter) -> dict[str, str]:
    strengths = {b.id: b.slider_strength for b in backends if b.slider_strength}
    return {
        formats.FAMILY: family.name,
        formats.TRAINING_MODE: config.training_mode,
        formats.LORA_TYPE: config.lora_type,
        formats.TARGETS: json.dumps(list(targets.names)),
        formats.STRENGTHS: json.dumps(strengths),
        formats.RANK: str(adapter.rank),
        formats.ALPHA: str(adapter.alpha),
        formats.BASE_MODEL: config.pretrained_model_name_or_path,
        formats.CONTROLNET_MODEL: config.controlnet_model_name_or_path or "",
        formats.NEUTRAL_MODE: config.slider_neutral_mode,
        formats.STEPS: str(steps),
        # the text sliders it learned, so a file says what its ends mean
        formats.PROMPTS: json.dumps(
            {
                b.prompt.entry: b.prompt.to_json()
                for b in backends
                if b.prompt is not None and b.prompt.kind == "pair"
            }
        ),
    }


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
    ema: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = slider_metadata(config, family, targets, backends, steps, adapter)
    slider = dict(
        config=config,
        family=family,
        components=components,
        adapter=adapter,
        trainable=trainable,
        projection_names=projection_names,
    )
    written = _write_slider(output_dir, "", metadata, **slider)
    if ema is not None:
        # the EMA weights in the live adapter for the write, in the same formats and names
        # with `_ema` (slider_cn/ema.py)
        with ema():
            ema_metadata = {**metadata, formats.EMA: "true"}
            for what, path in _write_slider(output_dir, EMA_SUFFIX, ema_metadata, **slider).items():
                written[f"{what}{EMA_SUFFIX}"] = path

    if config.is_tiny:
        # `tiny` is deterministic per seed: rebuild the untouched base rather than strip adapters.
        family.save_pretrained(
            family.load_components(with_controlnet=False), output_dir / BASE_FOLDER
        )
        written["base"] = output_dir / BASE_FOLDER

    (output_dir / RUN_FILE).write_text(
        json.dumps(
            {"metadata": metadata, "files": {k: str(v) for k, v in written.items()}}, indent=2
        ),
        encoding="utf-8",
    )
    return written


def _write_slider(
    output_dir: Path,
    suffix: str,
    metadata: dict[str, str],
    *,
    config,
    family,
    components,
    adapter,
    trainable: torch.nn.Module,
    projection_names: list[str],
) -> dict[str, Path]:
    """The slider's files (and a fresh ControlNet) under their names with ``suffix``."""
    written: dict[str, Path] = {}
    side = "controlnet" if config.training_mode == "controlnet" else "denoiser"
    lycoris_file, base_lora_file, kohya_file, controlnet_lora_file, controlnet_folder = (
        variant_name(name, suffix)
        for name in (
            LYCORIS_FILE,
            BASE_LORA_FILE,
            KOHYA_FILE,
            CONTROLNET_LORA_FILE,
            CONTROLNET_FOLDER,
        )
    )

    if adapter.kind == "lycoris":
        path = output_dir / lycoris_file
        prefix = formats.lycoris_key_prefix(family, side)
        save_file(
            adapter.file_state(prefix),
            str(path),
            metadata={**metadata, LYCORIS_PREFIX: prefix},
        )
        written["lycoris"] = path
    else:
        lora_state = {
            k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()
        }
        lora_config = jsonable(
            LoraConfig(
                r=adapter.rank, lora_alpha=adapter.alpha, target_modules=list(adapter.target_names)
            ).to_dict()
        )
        if side == "denoiser":
            # unet_lora_layers for UNet families, transformer_lora_layers for transformers.
            # alpha/r folded into lora_B and lora_alpha = r, as the ControlNet-side file: ComfyUI
            # reads no adapter metadata (no `.alpha` keys means scale 1) and would otherwise
            # rescale the slider by r/alpha; diffusers reads lora_alpha = r, the same scale.
            component = family.lora_component
            family.pipeline_class.save_lora_weights(
                str(output_dir),
                **{
                    f"{component}_lora_layers": fold_alpha(
                        lora_state, alpha=adapter.alpha, rank=adapter.rank
                    ),
                    f"{component}_lora_adapter_metadata": {
                        **lora_config,
                        "lora_alpha": adapter.rank,
                    },
                },
                weight_name=base_lora_file,
            )
            add_metadata(output_dir / base_lora_file, {**metadata, ALPHA_FOLDED: "true"})
            written["diffusers"] = output_dir / base_lora_file
            if family.kohya_prefix is not None:  # families whose kohya names are diffusers'
                kohya = peft_to_kohya(lora_state, alpha=adapter.alpha, prefix=family.kohya_prefix)
                save_file(
                    kohya,
                    str(output_dir / kohya_file),
                    metadata={
                        **metadata,
                        "ss_network_alpha": str(adapter.alpha),
                        "ss_network_dim": str(adapter.rank),
                    },
                )
                written["kohya"] = output_dir / kohya_file
        else:
            path = output_dir / controlnet_lora_file
            # alpha/r folded into lora_B, lora_alpha = r: `load_lora_adapter(file_path,
            # prefix=None)` does not read a file's adapter metadata (diffusers 0.42 reads it only
            # with weight_name= or use_safetensors=True) and would take alpha = r, rescaling the
            # slider by r/alpha. Folded, every way of loading gives the trained scale.
            save_file(
                fold_alpha(lora_state, alpha=adapter.alpha, rank=adapter.rank),
                str(path),
                metadata={
                    "format": "pt",
                    formats.DIFFUSERS_ADAPTER_METADATA: json.dumps(
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
        folder = output_dir / controlnet_folder
        if config.base_model_precision != "no":
            # the denoiser in memory is stored quantized: initialise from the base as loaded
            denoiser = family.load_components(with_controlnet=False).denoiser
        else:
            denoiser = unwrap_model(components.denoiser)
            if _has_adapters(denoiser):  # e.g. an assistant LoRA: initialise from the clean base
                denoiser = clean_copy(denoiser)
        controlnet = family.fresh_controlnet(denoiser)
        trained = dict(unwrap_model(trainable).named_modules())
        for name in projection_names:
            dict(controlnet.named_modules())[name].load_state_dict(trained[name].state_dict())
        controlnet.save_pretrained(str(folder), safe_serialization=True)
        (folder / FOLDER_METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        written["controlnet"] = folder

    return written


def _has_adapters(model: torch.nn.Module) -> bool:
    return any(_is_adapter_key(key) for key in model.state_dict())


def _is_adapter_key(key: str) -> bool:
    return "lora_" in key or ".lokr_" in key or ".hada_" in key or ".base_layer." in key
