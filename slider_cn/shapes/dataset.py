"""A contrastive slider dataset from the shapes world: warm (+) against cool (-) pictures.

Each positive picture has a negative twin with the same outline, size, position and caption
and a cool hue instead of a warm one, so the only thing the slider can learn is warmth.
Optional neutral pictures (triangles of any hue, captioned like the pairs, without a colour
word) are the content a `preserve` slider should leave alone: without them the warmth slider
would move triangles too. The canny maps the ControlNet needs are read from
``canny/<group>`` (for `slider-cn preprocess --detector canny --input data --output canny` to
fill), written directly (``conditioning="write"``), or asked for inline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from slider_cn.shapes import FAMILY
from slider_cn.shapes.world import COOL_HUES, WARM_HUES, render, sample_spec, with_hue

# both name the held-out outline's shape, so text and ControlNet agree
VALIDATION_PROMPTS = {"circle": "a circle", "large_circle": "a large circle"}


def _canny(image: Image.Image) -> Image.Image:
    from slider_cn.shapes.models import canny_map

    return Image.fromarray(canny_map(image))


def write_shapes_slider_dataset(
    root: str | Path,
    *,
    pairs: int = 16,
    neutral: int = 0,
    seed: int = 0,
    conditioning: str = "write",
    flip_signs: bool = False,
    drop_sign: bool = False,
    strength: float = 1.0,
) -> dict[str, Path]:
    """Write images, captions, canny maps, the dataloader and the training config under ``root``.

    ``conditioning``: ``"write"`` (canny maps written now), ``"preprocess"`` (backends read
    ``canny/<group>``, filled by `slider-cn preprocess`), ``"inline"`` (canny made at training
    time). ``flip_signs`` swaps the strengths of the warm and cool groups (a negative control);
    ``drop_sign`` trains both groups at +``strength`` (a trainer that ignores the sign of
    slider_strength: the other negative control). Returns the paths: ``config``, ``dataloader``,
    ``validation_conditioning`` (a held-out circle's canny map), ``neutral_conditioning`` (a
    triangle's) and one folder per group.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[tuple[str, Image.Image, str]]] = {"plus": [], "minus": []}
    for i in range(pairs):
        spec = sample_spec(rng, shape=("circle", "square")[i % 2], size="large")
        caption = spec.caption(("size", "shape"))
        warm = with_hue(spec, rng.uniform(*WARM_HUES))
        cool = with_hue(spec, rng.uniform(*COOL_HUES))
        groups["plus"].append((f"plus_{i:03d}", render(warm), caption))
        groups["minus"].append((f"minus_{i:03d}", render(cool), caption))
    if neutral:
        groups["neutral"] = []
        for i in range(neutral):
            spec = sample_spec(rng, shape="triangle")
            caption = spec.caption(("size", "shape"))  # no colour word, as the pairs
            groups["neutral"].append((f"neutral_{i:03d}", render(spec), caption))
    folders: dict[str, Path] = {}
    for group, items in groups.items():
        folder = root / "data" / group
        folder.mkdir(parents=True, exist_ok=True)
        for stem, image, caption in items:
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
            if conditioning == "write":
                canny = root / "canny" / group
                canny.mkdir(parents=True, exist_ok=True)
                _canny(image).save(canny / f"{stem}.png")
        folders[group] = folder

    sign = -1.0 if flip_signs else 1.0
    minus = sign * strength if drop_sign else -sign * strength
    strengths = {"plus": sign * strength, "minus": minus, "neutral": None}
    dataloader: list[dict] = []
    for group in groups:
        backend = {
            "id": f"shapes-{group}",
            "instance_data_dir": f"data/{group}",
            "caption_strategy": "textfile",
        }
        if strengths[group] is not None:
            backend["slider_strength"] = strengths[group]
        if conditioning in ("write", "preprocess"):
            backend["conditioning_data"] = f"shapes-{group}-canny"
            dataloader.append(backend)
            dataloader.append(
                {
                    "id": f"shapes-{group}-canny",
                    "dataset_type": "conditioning",
                    "instance_data_dir": f"canny/{group}",
                }
            )
        else:
            backend["conditioning"] = [{"type": "canny"}]
            dataloader.append(backend)
    dataloader_path = root / "multidatabackend.json"
    dataloader_path.write_text(json.dumps(dataloader, indent=2), encoding="utf-8")
    validation_files = _write_validation(root, seed)
    config = {
        **_training_config(seed),
        "data_backend_config": "multidatabackend.json",
        "slider_allow_unbalanced": drop_sign,
    }
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"config": config_path, "dataloader": dataloader_path, **validation_files, **folders}


def _write_validation(root: Path, seed: int) -> dict[str, Path]:
    """An outline the slider never trained on, a triangle's for neutral content, and prompts
    that name no colour."""
    held_out = sample_spec(np.random.default_rng(seed + 1000), shape="circle", size="large")
    validation = root / "validation_canny.png"
    _canny(render(held_out)).save(validation)
    neutral_outline = sample_spec(
        np.random.default_rng(seed + 1001), shape="triangle", size="large"
    )
    neutral_validation = root / "neutral_canny.png"
    _canny(render(neutral_outline)).save(neutral_validation)
    library = root / "prompt_library.json"
    library.write_text(json.dumps(VALIDATION_PROMPTS, indent=2), encoding="utf-8")
    return {"validation_conditioning": validation, "neutral_conditioning": neutral_validation}


def _training_config(seed: int) -> dict:
    """What the image and the text sliders of the shapes world share."""
    return {
        "model_family": FAMILY,
        "pretrained_model_name_or_path": "shapes",
        "controlnet_model_name_or_path": "shapes-canny",
        "output_dir": "output",
        "slider_lora_target": True,
        "lora_rank": 4,
        "lora_alpha": 4,
        "train_batch_size": 4,
        "max_train_steps": 100,
        "learning_rate": 5e-3,
        "checkpointing_steps": 1000,
        "seed": seed,
        "user_prompt_library": "prompt_library.json",
        "validation_conditioning_image": "validation_canny.png",
        "validation_num_inference_steps": 20,
        "validation_guidance": 3.0,
    }


# The text slider of the shapes world: a circle, turned toward red or toward blue.
TEXT_SLIDER = {"target": "a circle", "positive": "a red circle", "negative": "a blue circle"}


def write_shapes_text_slider(
    root: str | Path,
    *,
    outlines: int = 16,
    seed: int = 0,
    flip: bool = False,
    guidance_scale: float = 1.0,
    denoising_steps: int = 10,
    neutral: list[str] | None = None,
) -> dict[str, Path]:
    """A text slider on the shapes model: the prompts of ``TEXT_SLIDER``, and canny maps of
    circle outlines as the conditioning backend the ControlNet draws from (no training image).

    ``flip`` swaps positive and negative (a negative control: the slope must turn around);
    ``guidance_scale`` 0 removes the guidance difference, so there is nothing to learn (the
    other control). Returns ``config``, ``prompts``, ``dataloader`` and the validation files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    canny = root / "canny" / "circles"
    canny.mkdir(parents=True, exist_ok=True)
    for i in range(outlines):
        spec = sample_spec(rng, shape="circle", size="large")
        _canny(render(spec)).save(canny / f"circle_{i:03d}.png")
    dataloader = [
        {
            "id": "circles-canny",
            "dataset_type": "conditioning",
            "instance_data_dir": "canny/circles",
        }
    ]
    dataloader_path = root / "multidatabackend.json"
    dataloader_path.write_text(json.dumps(dataloader, indent=2), encoding="utf-8")
    positive, negative = TEXT_SLIDER["positive"], TEXT_SLIDER["negative"]
    if flip:
        positive, negative = negative, positive
    entry = {
        "id": "red-blue",
        "target": TEXT_SLIDER["target"],
        "positive": positive,
        "negative": negative,
        "guidance_scale": guidance_scale,
        "denoising_steps": denoising_steps,
        "conditioning_data": "circles-canny",
    }
    if neutral:
        entry["neutral"] = neutral
    prompts_path = root / "slider_prompts.json"
    prompts_path.write_text(json.dumps([entry], indent=2), encoding="utf-8")
    validation_files = _write_validation(root, seed)
    config = {
        **_training_config(seed),
        "data_backend_config": "multidatabackend.json",
        "slider_prompts": "slider_prompts.json",
    }
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {
        "config": config_path,
        "prompts": prompts_path,
        "dataloader": dataloader_path,
        **validation_files,
    }
