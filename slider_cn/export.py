"""``slider-cn export``: a run's slider in the format another tool loads.

- ``kohya``: a base-side slider as kohya keys with the true alpha (ComfyUI, A1111), for families
  whose kohya names are diffusers' (``family.kohya_prefix``: the UNet families);
- ``diffusers``: the PEFT/diffusers file, alpha/r folded into its weights (see below);
- ``merged-controlnet``: a ControlNet-side slider merged into its ControlNet.

File names, metadata keys and the key layouts are in slider_cn/formats.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slider_cn import formats
from slider_cn.errors import ConfigError
from slider_cn.formats import EXPORT_FOLDER, FOLDER_METADATA_FILE
from slider_cn.loading import (
    SLIDER_ADAPTER_NAME,
    SliderFiles,
    check_model_folder,
    load_slider,
    slider_files,
)

FORMATS = ("kohya", "diffusers", "merged-controlnet")


def _strength_suffix(strength: float) -> str:
    return "" if strength == 1.0 else f"_s{strength:g}"


def _scaled(state: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """Bake a strength into LoRA weights: the up (B) half times ``strength``."""
    out = {}
    for key, value in state.items():
        value = value.detach().float().contiguous()
        if strength != 1.0 and (".lora_B." in key or ".lora_up." in key):
            value = value * strength
        out[key] = value
    return out


def export_slider(
    adapter: str | Path,
    fmt: str,
    *,
    strength: float = 1.0,
    output: str | Path | None = None,
    controlnet: str | Path | None = None,
) -> Path:
    """Write a run's slider in another format; returns the file or folder written.

    - ``kohya``: a base-side slider as kohya keys with the true alpha (ComfyUI, A1111); only for
      families with a kohya prefix (a transformer family's kohya names are its original
      checkpoint's, not diffusers': use ``diffusers`` there);
    - ``diffusers``: the PEFT/diffusers file with alpha/r folded into lora_B and
      ``lora_alpha = r`` in its adapter metadata, so loaders that read the metadata
      (diffusers) and loaders that do not (ComfyUI reads ``transformer.*`` / ``unet.*`` PEFT keys
      and takes alpha = r) give the trained scale;
    - ``merged-controlnet``: a ControlNet-side slider merged into its ControlNet at
      ``strength``, saved with ``save_pretrained`` (the family's ControlNet class's
      ``from_pretrained`` loads it).

    With ``strength`` other than 1 the strength is baked into the LoRA weights, so the file at
    strength 1 behaves like the slider at ``strength``.
    """
    from safetensors.torch import load_file, save_file

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    files = slider_files(adapter)
    source = files.slider_file
    family = files.family
    metadata = {**files.metadata, formats.EXPORTED_STRENGTH: f"{float(strength):g}"}
    folder = files.folder / EXPORT_FOLDER

    if fmt == "merged-controlnet":
        return merge_controlnet(files, strength, output, controlnet, metadata)
    if files.is_lycoris:
        raise ConfigError(
            f"{source} is a LyCORIS slider: it is already in the lycoris-lora format that ComfyUI "
            "and A1111 load; for a ControlNet-side one use --format merged-controlnet"
        )
    if fmt == "kohya":
        if files.side == "controlnet":
            raise ConfigError(
                f"{source} is a ControlNet-side slider: ComfyUI and A1111 do not put LoRAs on a "
                "ControlNet; export it with --format merged-controlnet --strength S"
            )
        if family.kohya_prefix is None:
            raise ConfigError(
                f"--format kohya: {family.name} ({family.denoiser_model_class.__name__}) has no "
                "kohya format here: its kohya names are the original checkpoint's module names, "
                "not diffusers'. Use --format diffusers (diffusers' load_lora_weights; ComfyUI "
                f"loads its {family.lora_component}.* keys)"
            )
        state = _scaled(load_file(str(source)), strength)
        rank = metadata.get(formats.RANK, "")
        alpha = formats.training_alpha(metadata, source)
        if metadata.get(formats.ALPHA_FOLDED) == "true":
            # kohya files carry the true alpha (docs/design.md §8.7): take alpha/r back out
            rank_value = formats.training_rank(metadata, source)
            state = formats.unfold_alpha(state, alpha=alpha, rank=rank_value)
        path = (
            Path(output)
            if output
            else folder / f"slider_kohya{_strength_suffix(strength)}.safetensors"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        kohya = formats.peft_to_kohya(
            state, alpha=alpha, prefix=family.kohya_prefix, component=family.lora_component
        )
        save_file(
            kohya,
            str(path),
            # slider-cn's keys only: diffusers reads a "lora_adapter_metadata" key as PEFT
            # config and then refuses the kohya alphas beside it
            metadata={
                **formats.slider_cn_metadata(metadata),
                "ss_network_alpha": str(alpha),
                "ss_network_dim": rank,
            },
        )
        return path
    # diffusers: the same keys, alpha/r folded into lora_B and the adapter metadata's
    # lora_alpha = r (as the ControlNet-side file is written), so every loader gives the
    # trained scale, whether it reads the metadata or not
    path = (
        Path(output)
        if output
        else folder / f"{source.stem}{_strength_suffix(strength)}.safetensors"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    state = _scaled(load_file(str(source)), strength)
    save_file(
        _folded(state, metadata, source),
        str(path),
        metadata=formats.folded_adapter_config(metadata),
    )
    return path


def _folded(
    state: dict[str, torch.Tensor], metadata: dict[str, str], source: Path
) -> dict[str, torch.Tensor]:
    if metadata.get(formats.ALPHA_FOLDED) == "true":
        return state
    alpha = formats.training_alpha(metadata, source)
    return formats.fold_alpha(state, alpha=alpha, rank=formats.training_rank(metadata, source))


def merge_controlnet(
    files: SliderFiles,
    strength: float,
    output: str | Path | None,
    controlnet: str | Path | None,
    metadata: dict[str, str],
) -> Path:
    """A ControlNet-side slider merged into its ControlNet at ``strength``."""
    family = files.family
    model_class = family.controlnet_model_class
    if files.is_lycoris:
        # lycoris-lora 4.1.3's merge_to applies a LoKr module's alpha/dim scale twice (its
        # forward applies it once), so a merged ControlNet would not be the trained slider.
        raise ConfigError(
            f"{files.slider_file}: merging a LyCORIS slider into a ControlNet is not supported "
            "(lycoris-lora's merge does not reproduce its own forward for LoKr); load it with "
            "slider_cn.load_slider in diffusers, or train with lora_type standard for a "
            "mergeable ControlNet slider"
        )
    if files.side != "controlnet":
        other = "--format kohya or diffusers" if family.kohya_prefix else "--format diffusers"
        raise ConfigError(
            f"{files.slider_file} is a base-side slider; merged-controlnet is for sliders trained "
            f"with training_mode controlnet (use {other})"
        )
    source = controlnet or files.controlnet or metadata.get(formats.CONTROLNET_MODEL)
    if not source:
        raise ConfigError(
            f"{files.folder}: no controlnet/ folder and no ControlNet recorded; pass --controlnet "
            f"PATH (the {model_class.__name__} the slider was trained on)"
        )
    check_model_folder(source, model_class, f"a {family.name} ControlNet-side slider")
    try:
        model = model_class.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"could not load the {model_class.__name__} from {source}: {exc}"
        ) from None
    load_slider(model, files.folder, strength=strength)
    # W + strength * alpha/r * B A, by PEFT's own merge (fuse_lora is PEFT's merge_and_unload
    # per layer; every family's ControlNet class has it through PeftAdapterMixin)
    model.fuse_lora(adapter_names=[SLIDER_ADAPTER_NAME])
    model.unload_lora()
    path = (
        Path(output)
        if output
        else files.folder / EXPORT_FOLDER / f"controlnet_merged{_strength_suffix(strength)}"
    )
    model.save_pretrained(str(path), safe_serialization=True)
    (path / FOLDER_METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return path
