"""A small synthetic contrastive dataset for the `tiny` model: what the mechanical tests train on.

(`make demo` uses the shapes world instead: slider_cn/shapes/dataset.py.)

The concept is "circle size": positive images hold a large bright disc, negative a small dim one,
both captioned alike (the contrast is in the pictures, the strength picks the direction);
neutral images hold a square. Each image has a caption file; the training config and dataloader
config are written beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _draw(kind: str, index: int, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 60, size=3))
    # "more" is larger and brighter, "less" smaller and dimmer: one visual direction
    low = {"large": 200, "small": 70}.get(kind, 120)
    colour = tuple(int(v) for v in rng.integers(low, low + 56, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # near the centre, so the contrast sits in the same place in every picture
    cx, cy = (
        int(v) for v in rng.integers(size // 2 - size // 16, size // 2 + size // 16 + 1, size=2)
    )
    if kind == "square":
        r = size // 5
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        r = size * (0.38 if kind == "large" else 0.12)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return image


def write_demo_dataset(
    root: str | Path,
    images_per_group: int = 4,
    resolution: int = 64,
    seed: int = 0,
    conditioning: str | None = None,
) -> dict[str, Path]:
    """Write images, captions, a dataloader config and a training config under ``root``.

    ``conditioning``: None (no conditioning images), ``"folders"`` (edge maps written beside
    the images as conditioning backends), ``"canny"`` (conditioning backends that read
    ``canny/<group>``, for `slider-cn preprocess --detector canny --input data --output canny`
    to fill) or ``"inline"`` (each backend asks for canny inline).
    Returns the paths: ``config``, ``dataloader``, and one folder per group.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    groups = {
        "plus": ("large", "a circle"),
        "minus": ("small", "a circle"),
        "neutral": ("square", "a square"),
    }
    folders: dict[str, Path] = {}
    for group, (kind, caption) in groups.items():
        folder = root / "data" / group
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_group):
            _draw(kind, i, resolution, rng).save(folder / f"{group}_{i:03d}.png")
            (folder / f"{group}_{i:03d}.txt").write_text(caption, encoding="utf-8")
        folders[group] = folder
        if conditioning == "folders":
            edges = root / "data" / f"{group}_edges"
            edges.mkdir(parents=True, exist_ok=True)
            for image_path in sorted(folder.glob("*.png")):
                with Image.open(image_path) as image:
                    image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB").save(
                        edges / image_path.name
                    )
            folders[f"{group}_edges"] = edges

    dataloader = [
        {
            "id": "circle-plus",
            "instance_data_dir": "data/plus",
            "caption_strategy": "textfile",
            "slider_strength": 0.5,
        },
        {
            "id": "circle-minus",
            "instance_data_dir": "data/minus",
            "caption_strategy": "textfile",
            "slider_strength": -0.5,
        },
        {"id": "neutral", "instance_data_dir": "data/neutral", "caption_strategy": "textfile"},
    ]
    for backend, group in zip(list(dataloader), groups, strict=True):
        if conditioning in ("folders", "canny"):
            folder = f"data/{group}_edges" if conditioning == "folders" else f"canny/{group}"
            backend["conditioning_data"] = f"{backend['id']}-{conditioning}"
            dataloader.append(
                {
                    "id": f"{backend['id']}-{conditioning}",
                    "dataset_type": "conditioning",
                    "instance_data_dir": folder,
                }
            )
        elif conditioning == "inline":
            backend["conditioning"] = [
                {"type": "canny", "params": {"low_threshold": 50, "high_threshold": 120}}
            ]
    dataloader_path = root / "multidatabackend.json"
    dataloader_path.write_text(json.dumps(dataloader, indent=2), encoding="utf-8")

    config = {
        "model_family": "sd1x",
        "pretrained_model_name_or_path": "tiny",
        "data_backend_config": "multidatabackend.json",
        "output_dir": "output",
        "resolution": resolution,
        "slider_lora_target": True,
        "lora_rank": 4,
        "lora_alpha": 4,
        "train_batch_size": 1,
        "max_train_steps": 6,
        "learning_rate": 1e-3,
        "seed": 0,
    }
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"config": config_path, "dataloader": dataloader_path, **folders}
