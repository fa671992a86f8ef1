"""Writers for the formats other tools load: kohya (ComfyUI / A1111) keys with the true alpha."""

from __future__ import annotations

from pathlib import Path

import torch

_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor], *, alpha: float, prefix: str = "lora_unet"
) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys (`<module>.lora_A.weight`) -> kohya keys (`lora_unet_<module>.lora_down.weight`).

    Each module gets an `.alpha` tensor holding the **training** alpha. Writing alpha = rank
    (as some converters do) silently rescales the slider by rank/alpha (docs/design.md §8.7).
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for peft_suffix, kohya_suffix in _SUFFIXES.items():
            if key.endswith(peft_suffix):
                module = key[: -len(peft_suffix)]
                for known in ("unet.", "transformer.", "controlnet."):
                    module = module.removeprefix(known)
                name = f"{prefix}_{module.replace('.', '_')}"
                converted[name + kohya_suffix] = value.contiguous()
                converted[name + ".alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"not a PEFT LoRA key: {key}")
    return converted


# --- slider-cn export --------------------------------------------------------------------
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


def _alpha(metadata: dict[str, str], file: Path) -> float:
    """The training alpha: slider-cn's metadata, else diffusers' adapter metadata."""
    import json

    from slider_cn.errors import ConfigError

    try:
        return float(metadata["slider_cn.alpha"])
    except (KeyError, ValueError):
        pass
    try:
        return float(json.loads(metadata["lora_adapter_metadata"])["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{file}: no LoRA alpha in its metadata; not a slider-cn file") from None


def export_slider(
    adapter: str | Path,
    fmt: str,
    *,
    strength: float = 1.0,
    output: str | Path | None = None,
    controlnet: str | Path | None = None,
) -> Path:
    """Write a run's slider in another format; returns the file or folder written.

    - ``kohya``: a base-side slider as kohya keys with the true alpha (ComfyUI, A1111);
    - ``diffusers``: the PEFT/diffusers file;
    - ``merged-controlnet``: a ControlNet-side slider merged into its ControlNet at
      ``strength``, saved with ``save_pretrained`` (``ControlNetModel.from_pretrained`` loads it).

    With ``strength`` other than 1 the strength is baked into the LoRA weights, so the file at
    strength 1 behaves like the slider at ``strength``.
    """
    from safetensors.torch import load_file, save_file

    from slider_cn.errors import ConfigError
    from slider_cn.loading import slider_files

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    files = slider_files(adapter)
    source = files.slider_file
    metadata = {**files.metadata, "slider_cn.exported_strength": f"{float(strength):g}"}
    folder = files.folder / "export"

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
        state = _scaled(load_file(str(source)), strength)
        alpha = _alpha(metadata, source)
        rank = metadata.get("slider_cn.rank", "")
        path = (
            Path(output)
            if output
            else folder / f"slider_kohya{_strength_suffix(strength)}.safetensors"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        kohya = peft_to_kohya(state, alpha=alpha, prefix="lora_unet")
        save_file(
            kohya,
            str(path),
            # slider-cn's keys only: diffusers reads a "lora_adapter_metadata" key as PEFT
            # config and then refuses the kohya alphas beside it
            metadata={
                **{k: v for k, v in metadata.items() if k.startswith("slider_cn.")},
                "ss_network_alpha": str(alpha),
                "ss_network_dim": rank,
            },
        )
        return path
    # diffusers: the same keys and adapter metadata, so load_lora_weights / load_lora_adapter
    # read rank and alpha as before
    path = (
        Path(output)
        if output
        else folder / f"{source.stem}{_strength_suffix(strength)}.safetensors"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_scaled(load_file(str(source)), strength), str(path), metadata=metadata)
    return path


def merge_controlnet(
    files,
    strength: float,
    output: str | Path | None,
    controlnet: str | Path | None,
    metadata: dict[str, str],
) -> Path:
    """A ControlNet-side slider merged into its ControlNet at ``strength``."""
    import json

    from diffusers import ControlNetModel

    from slider_cn.errors import ConfigError
    from slider_cn.loading import load_slider

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
        raise ConfigError(
            f"{files.slider_file} is a base-side slider; merged-controlnet is for sliders trained "
            "with training_mode controlnet (use --format kohya or diffusers)"
        )
    source = controlnet or files.controlnet or metadata.get("slider_cn.controlnet_model")
    if not source:
        raise ConfigError(
            f"{files.folder}: no controlnet/ folder and no ControlNet recorded; pass --controlnet "
            "PATH (the ControlNet the slider was trained on)"
        )
    try:
        model = ControlNetModel.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load the ControlNet from {source}: {exc}") from None
    load_slider(model, files.folder, strength=strength)
    model.fuse_lora(adapter_names=["slider"])  # W + strength * alpha/r * B A
    model.unload_lora()
    path = (
        Path(output)
        if output
        else files.folder / "export" / f"controlnet_merged{_strength_suffix(strength)}"
    )
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "slider_cn.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return path
