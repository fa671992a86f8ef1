"""Writers for the formats other tools load: kohya (ComfyUI / A1111) keys with the true alpha."""

from __future__ import annotations

import torch

_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor], *, alpha: float, prefix: str = "lora_unet"
) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys (`<module>.lora_A.weight`) -> kohya keys (`lora_unet_<module>.lora_down.weight`).

    Each module gets an `.alpha` tensor holding the **training** alpha. Writing alpha = rank
    (as some converters do) silently rescales the slider by rank/alpha (DESIGN.md §8.7).
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
