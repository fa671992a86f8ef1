"""The shapes world and the small pipeline trained on it (`shapes`, `shapes-canny`).

- `world`: seeded pictures of one coloured shape, with captions.
- `measure`: the attributes of a picture, recovered from its pixels.
- `models`: the architecture of the shipped pipeline.
- `pretrain`: reproduces the shipped weights (`python -m slider_cn.shapes.pretrain`).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
# Built-in model names -> the shipped diffusers folders (weights stored as fp16, loaded as fp32).
BUILTIN_MODELS: dict[str, Path] = {"shapes": WEIGHTS / "base", "shapes-canny": WEIGHTS / "canny"}
NATIVE_RESOLUTION = 32


def builtin_model(name: str) -> Path | None:
    """The folder of a built-in model name, or None for any other name or path."""
    path = BUILTIN_MODELS.get(name)
    if path is None:
        return None
    if not path.is_dir():
        raise FileNotFoundError(
            f"the built-in model {name!r} is missing from the installation ({path}); reinstall "
            "slider-cn or rebuild it with `python -m slider_cn.shapes.pretrain --output "
            f"{WEIGHTS}`"
        )
    return path
