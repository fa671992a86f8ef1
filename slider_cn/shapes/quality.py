"""Train a slider on the shapes world and measure it: what the quality tests and
bench/quality.py share.

`train_and_measure(root, ...)` writes the warm/cool dataset (slider_cn.shapes.dataset), trains
a slider with slider-cn's own `train()` and evaluates it with slider_cn.evaluate over the
dataset's prompts and the held-out outline. With ``neutral_prompts`` it also evaluates the same
slider on the neutral content (a held-out triangle's outline), which a `preserve` slider should
leave alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slider_cn.config import load_config


def train_and_measure(
    root: str | Path,
    *,
    mode: str = "lora",
    steps: int = 100,
    seeds: int = 4,
    dataset: dict[str, Any] | None = None,
    overrides: dict[str, str] | None = None,
    neutral_prompts: dict[str, str] | None = None,
    source: str = "images",
) -> dict[str, Any]:
    """Train, then evaluate; returns the evaluation report (plus ``neutral`` when asked).

    ``source``: ``"images"`` (the warm/cool pairs) or ``"prompts"`` (the red/blue text slider,
    slider_cn.shapes.dataset.write_shapes_text_slider); ``dataset`` goes to its writer.
    """
    from slider_cn.evaluate import evaluate_run
    from slider_cn.shapes.dataset import write_shapes_slider_dataset, write_shapes_text_slider
    from slider_cn.train import train
    from slider_cn.validate import ValidationPrompt, prompt_library

    root = Path(root)
    writer = {"images": write_shapes_slider_dataset, "prompts": write_shapes_text_slider}[source]
    paths = writer(root, **(dataset or {}))
    config = load_config(
        paths["config"],
        {
            "output_dir": str(root / "out"),
            "training_mode": mode,
            "max_train_steps": str(steps),
            **(overrides or {}),
        },
    )
    result = train(config)
    seed_list = range(config.seed, config.seed + seeds)
    report = evaluate_run(
        result.family,
        result.components,
        result.adapter,
        config,
        root / "evaluation",
        prompts=prompt_library(config),
        seeds=seed_list,
        attribute="warmth",
    ).report
    if neutral_prompts:
        neutral_config = config.model_copy(
            update={"validation_conditioning_image": str(paths["neutral_conditioning"])}
        )
        neutral = evaluate_run(
            result.family,
            result.components,
            result.adapter,
            neutral_config,
            root / "evaluation_neutral",
            prompts=[ValidationPrompt(k, v, 1.0) for k, v in neutral_prompts.items()],
            seeds=seed_list,
            attribute="warmth",
        ).report
        report["neutral"] = neutral
    return report
