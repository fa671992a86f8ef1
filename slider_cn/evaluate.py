"""`slider-cn evaluate`: does the slider slide? A strength sweep over seeds and prompts, measured.

For every prompt (``--prompt``, else the run's validation prompts) and seed, the run renders one
image per strength (default -1, -0.5, 0, 0.5, 1) with its ControlNet and conditioning image when
it has them, and measures each image:

- on the `shapes` model, the shapes world's attributes (``slider_cn.shapes.measure``): warmth
  (the hue as one number), value (brightness), saturation, area, position and fill. The slider's attribute is ``--attribute`` or the one
  it moves most (the largest difference between the extreme strengths, as a share of that
  attribute's range);
- on other models, with a local CLIP folder (``--clip_model``), the CLIP score difference
  between the ``--positive`` and ``--negative`` concept texts, as Concept Sliders reports it.

``evaluation.json`` holds, per strength, the mean and spread of every measure; monotonicity (the
Spearman correlation of strength with the attribute's mean over seeds and prompts, and per seed);
the effect size (attribute at the highest strength minus at the lowest) and each side's share of
it; preservation (shapes: mask IoU of each image with its s = 0 image, and the drift of the
attributes of the other group, geometry for a colour slider and colour for a geometry one).
``evaluation.png`` plots the attribute against strength, one line per seed; ``*_sweep.png`` is
the grid per prompt (a row per seed, strengths left to right).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slider_cn.config import TrainConfig
from slider_cn.errors import ConfigError
from slider_cn.validate import (
    DEFAULT_STRENGTHS,
    SweepRenderer,
    ValidationPrompt,
    _slug,
    prompt_library,
    strength_label,
    sweep_grid,
)

COLOUR_ATTRIBUTES = ("hue", "saturation", "value", "warmth")
GEOMETRY_ATTRIBUTES = ("area", "cx", "cy", "fill")
SHAPES_ATTRIBUTES = ("warmth", "value", "saturation", "area", "cx", "cy", "fill")


@dataclasses.dataclass
class EvaluationResult:
    folder: Path
    report: dict[str, Any]
    plot: Path
    grids: dict[str, Path]

    @property
    def json_path(self) -> Path:
        return self.folder / "evaluation.json"


# --- statistics ----------------------------------------------------------------------------
def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); NaN when either is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan
    return float(spearmanr(x[keep], y[keep]).statistic)


def _stats(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def sweep_strengths(strengths: Sequence[float]) -> list[float]:
    """The sorted strengths of an evaluation; at least three, 0 among them."""
    values = sorted({float(s) for s in strengths})
    if len(values) < 3 or 0.0 not in values:
        raise ConfigError(
            "--strengths: evaluation needs at least three strengths, 0 among them (the base "
            "picture every other strength is compared with), e.g. -1,-0.5,0,0.5,1"
        )
    return values


# --- measures ------------------------------------------------------------------------------
class ShapesMeasure:
    """The shapes world's attributes of each image, and its shape mask for preservation."""

    kind = "shapes"
    names = SHAPES_ATTRIBUTES
    # the span each attribute can take in the shapes world (area: a shape covers up to ~half)
    ranges = {
        "warmth": 2.0,
        "value": 1.0,
        "saturation": 1.0,
        "area": 0.5,
        "cx": 1.0,
        "cy": 1.0,
        "fill": 0.5,
    }

    def __call__(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        from slider_cn.shapes.measure import measure_with_mask

        out = []
        for image in images:
            m, mask = measure_with_mask(image)
            values = {name: getattr(m, name) for name in self.names}
            out.append({"values": values, "found": m.found, "mask": mask})
        return out


class ClipMeasure:
    """CLIP score difference: 100 * (cos(image, positive) - cos(image, negative))."""

    kind = "clip"
    names = ("clip_delta",)

    def __init__(self, path: str, positive: str, negative: str):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--clip_model {path}: not a CLIP model folder: {exc}") from None
        with torch.no_grad():
            texts = self.processor(text=[positive, negative], return_tensors="pt", padding=True)
            features = self.model.get_text_features(**texts)
        self.texts = torch.nn.functional.normalize(_features(features), dim=-1)

    def __call__(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        import torch

        with torch.no_grad():
            pixels = self.processor(images=images, return_tensors="pt")
            features = _features(self.model.get_image_features(**pixels))
        scores = torch.nn.functional.normalize(features, dim=-1) @ self.texts.T
        return [
            {"values": {"clip_delta": float(100 * (row[0] - row[1]))}, "found": True, "mask": None}
            for row in scores
        ]


def _features(output: Any) -> Any:
    # transformers 5 returns a model output with the projected embeddings in pooler_output
    return getattr(output, "pooler_output", output)


# --- the sweep -----------------------------------------------------------------------------
def _choose_attribute(values: dict[str, np.ndarray], strengths: list[float], measure) -> str:
    """The attribute the slider moves most, as a share of that attribute's range.

    (A share of the range, not of the spread at s = 0: with a ControlNet the geometry hardly
    varies between seeds, and a one-pixel shift would look like a huge effect.)
    """
    low, high = int(np.argmin(strengths)), int(np.argmax(strengths))
    ranges = getattr(measure, "ranges", {})
    best, best_score = measure.names[0], -1.0
    for name in measure.names:
        v = values[name]  # (strengths, prompts, seeds)
        score = abs(np.nanmean(v[high]) - np.nanmean(v[low])) / ranges.get(name, 1.0)
        if np.isfinite(score) and score > best_score:
            best, best_score = name, float(score)
    return best


def evaluate_run(
    family: Any,
    components: Any,
    adapter: Any,
    config: TrainConfig,
    folder: str | Path,
    *,
    prompts: list[ValidationPrompt],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    seeds: Sequence[int] = (0, 1, 2, 3),
    measure: Any = None,
    attribute: str | None = None,
    assistant: Any = None,
    label: str | None = None,
) -> EvaluationResult:
    """Render, measure and report a strength sweep of ``adapter``; see the module docstring.

    ``label`` names the run in the plot's title (default: the output folder's name).
    """
    strengths = sweep_strengths(strengths)
    seeds = [int(s) for s in seeds]
    measure = measure or ShapesMeasure()
    if attribute is not None and attribute not in measure.names:
        raise ConfigError(
            f"--attribute {attribute!r}: not measured here; choose one of {', '.join(measure.names)}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # measured[strength index][prompt index] -> one record per seed
    measured: list[list[list[dict[str, Any]]]] = []
    grids: dict[str, Path] = {}
    with SweepRenderer(family, components, adapter, config, assistant=assistant) as renderer:
        rendered = [[renderer.render(p.prompt, s, seeds) for p in prompts] for s in strengths]
    for per_prompt in rendered:
        measured.append([measure(images) for images in per_prompt])
    used: set[str] = set()
    for j, prompt in enumerate(prompts):
        stem = _slug(prompt.name)
        while stem in used:
            stem += "_"
        used.add(stem)
        rows = [
            sweep_grid([(s, rendered[i][j][k]) for i, s in enumerate(strengths)])
            for k in range(len(seeds))
        ]
        grids[stem] = folder / f"{stem}_sweep.png"  # the file stem: unique, unlike names
        _stack(rows).save(grids[stem])

    names = measure.names
    values = {
        name: np.array(
            [
                [[r["values"][name] for r in per_seed] for per_seed in per_prompt]
                for per_prompt in measured
            ],
            dtype=float,
        )
        for name in names
    }  # (strengths, prompts, seeds)
    chosen = attribute or _choose_attribute(values, strengths, measure)
    v = values[chosen]
    means = [float(np.nanmean(v[i])) for i in range(len(strengths))]
    zero = strengths.index(0.0)
    per_seed = [
        spearman(strengths, [np.nanmean(v[i, :, k]) for i in range(len(strengths))])
        for k in range(len(seeds))
    ]
    report: dict[str, Any] = {
        "measure": measure.kind,
        "attribute": chosen,
        "attribute_chosen_by": "--attribute"
        if attribute
        else "largest change, as a share of its range",
        "strengths": strengths,
        "seeds": seeds,
        "prompts": [dataclasses.asdict(p) for p in prompts],
        "per_strength": {
            name: [
                {"strength": s, **_stats(values[name][i].ravel())} for i, s in enumerate(strengths)
            ]
            for name in names
        },
        "monotonicity": {
            "spearman": spearman(strengths, means),
            "spearman_per_seed": per_seed,
            "spearman_per_seed_mean": float(np.nanmean(per_seed)) if per_seed else math.nan,
        },
        "effect_size": means[-1] - means[0],
        "effect_sides": {"negative": means[zero] - means[0], "positive": means[-1] - means[zero]},
        "slides_both_ways": _slides_both_ways(means[zero] - means[0], means[-1] - means[zero]),
        "found": float(np.mean([r["found"] for a in measured for b in a for r in b])),
    }
    if measure.kind == "shapes":
        report["preservation"] = _preservation(measured, values, strengths, zero, chosen)
    report_path = folder / "evaluation.json"
    plot = folder / "evaluation.png"
    _plot(plot, strengths, v, seeds, chosen, label or folder.name)
    report["files"] = {"plot": plot.name, "grids": {k: p.name for k, p in grids.items()}}
    report_path.write_text(json.dumps(_finite(report), indent=2, allow_nan=False), encoding="utf-8")
    return EvaluationResult(folder, report, plot, grids)


def _finite(value: Any) -> Any:
    """NaN (an undefined Spearman, no shape found) as null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _slides_both_ways(negative: float, positive: float, share: float = 0.1) -> bool:
    """Each side of zero moves the attribute the same way, by at least ``share`` of the total.

    A slider whose training lost the sign of one side moves the picture with the strength on
    one side and not, or backwards, on the other. (A slider trained on the + side alone still
    passes: a LoRA is close to linear in its multiplier, so -1 undoes what +1 learned.)
    """
    total = negative + positive
    if not (math.isfinite(total) and total != 0):
        return False
    return negative / total >= share and positive / total >= share


def _preservation(measured, values, strengths, zero, chosen) -> dict[str, Any]:
    from slider_cn.shapes.measure import mask_iou

    ious = []
    for i in range(len(strengths)):
        per = [
            mask_iou(r["mask"], base["mask"])
            for per_prompt, base_prompt in zip(measured[i], measured[zero], strict=True)
            for r, base in zip(per_prompt, base_prompt, strict=True)
        ]
        ious.append(
            {"strength": strengths[i], "mean": float(np.mean(per)), "min": float(np.min(per))}
        )
    untouched = GEOMETRY_ATTRIBUTES if chosen in COLOUR_ATTRIBUTES else COLOUR_ATTRIBUTES

    def drift_of(v: np.ndarray) -> list[dict[str, float]]:
        """Per strength, the mean over pictures of |attribute - its s = 0 picture's|."""
        return [
            {"strength": s, "mean_abs": float(np.nanmean(np.abs(v[i] - v[zero])))}
            for i, s in enumerate(strengths)
        ]

    drift = {name: drift_of(values[name]) for name in untouched if name in values}
    attribute_drift = drift_of(values[chosen])
    return {
        "mask_iou": ious,
        "untouched_attributes": list(drift),
        "drift": drift,
        # how far each picture's own attribute moved from its s = 0 picture: on content the
        # slider should leave alone (a neutral prompt), this is the number to keep small
        "attribute_drift": attribute_drift,
    }


def _stack(rows: list[Image.Image]) -> Image.Image:
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet


def _plot(path: Path, strengths, v: np.ndarray, seeds, attribute: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for k, seed in enumerate(seeds):
        ax.plot(
            strengths, np.nanmean(v[:, :, k], axis=1), "o-", alpha=0.45, lw=1, label=f"seed {seed}"
        )
    ax.plot(strengths, np.nanmean(v, axis=(1, 2)), "o-", color="black", lw=2.5, label="mean")
    ax.set_xlabel("slider strength")
    ax.set_ylabel(attribute)
    ax.set_xticks(strengths, [strength_label(s) for s in strengths])
    ax.axvline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    ax.set_title(f"{attribute} against slider strength ({label})", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- a finished run ------------------------------------------------------------------------
def evaluate_output(
    config: TrainConfig,
    adapter_dir: str | Path,
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    seeds: int = 4,
    prompts: Sequence[str] | None = None,
    output: str | Path | None = None,
    attribute: str | None = None,
    clip_model: str | None = None,
    positive: str | None = None,
    negative: str | None = None,
) -> EvaluationResult:
    """``slider-cn evaluate``: rebuild a finished run and measure its strength sweep."""
    from slider_cn.validate import rebuild_run

    strengths = sweep_strengths(strengths)  # before any model loads
    if clip_model:
        if not positive or not negative:
            raise ConfigError(
                "--clip_model needs --positive TEXT and --negative TEXT (the concept's two ends)"
            )
        measure: Any = ClipMeasure(clip_model, positive, negative)
    elif config.is_shapes:
        measure = ShapesMeasure()
    else:
        raise ConfigError(
            f"evaluate measures the `shapes` model's pictures directly; for "
            f"{config.pretrained_model_name_or_path!r} pass --clip_model PATH (a local CLIP folder) "
            "with --positive TEXT and --negative TEXT"
        )
    if prompts:
        entries = [ValidationPrompt(p, p, 1.0) for p in prompts]  # files named after the text
    else:
        entries = prompt_library(config)
    run = rebuild_run(config, adapter_dir, check_conditioning=True)
    base_seed = config.validation_seed if config.validation_seed is not None else config.seed
    folder = Path(output) if output else Path(adapter_dir) / "evaluation"
    return evaluate_run(
        run.family,
        run.components,
        run.adapter,
        run.config,
        folder,
        prompts=entries,
        strengths=strengths,
        seeds=range(base_seed, base_seed + seeds),
        measure=measure,
        attribute=attribute,
        assistant=run.assistant,
        label=Path(adapter_dir).resolve().name,
    )


def summary_lines(result: EvaluationResult) -> list[str]:
    """What a person reads first: the attribute at each strength, monotonicity, preservation."""
    report = result.report
    name = report["attribute"]
    rows = report["per_strength"][name]
    lines = [
        f"{name} by strength: "
        + ", ".join(f"{strength_label(r['strength'])}: {r['mean']:+.3f}" for r in rows),
        f"monotonicity (Spearman of strength and mean {name}): {report['monotonicity']['spearman']:+.2f}; "
        f"effect size {report['effect_size']:+.3f} ({name} at the highest minus the lowest strength)",
    ]
    preservation = report.get("preservation")
    if preservation:
        ious = preservation["mask_iou"]
        lines.append(
            f"outline held: mean mask IoU with the s=0 picture >= {min(r['mean'] for r in ious):.2f} "
            f"at every strength (worst single picture {min(r['min'] for r in ious):.2f})"
        )
    return lines
