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
# The family of the shipped pipeline (its folders are an SD1.x diffusers pipeline).
FAMILY = "sd1x"


def builtin_model(name: str) -> Path | None:
    """The folder of a built-in model, given by its name or as that folder's path; else None."""
    path = BUILTIN_MODELS.get(name)
    if path is None:
        return _builtin_folder(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"the built-in model {name!r} is missing from the installation ({path}); reinstall "
            "slider-cn or rebuild it with `python -m slider_cn.shapes.pretrain --output "
            f"{WEIGHTS}`"
        )
    return path


def builtin_name(name_or_path: str) -> str | None:
    """`shapes` / `shapes-canny` for the name or the shipped folder's path; else None."""
    if name_or_path in BUILTIN_MODELS:
        return name_or_path
    folder = _builtin_folder(name_or_path)
    return next((k for k, v in BUILTIN_MODELS.items() if folder == v.resolve()), None)


def _builtin_folder(path: str) -> Path | None:
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return resolved if any(resolved == v.resolve() for v in BUILTIN_MODELS.values()) else None
