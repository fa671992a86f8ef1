"""What the step semantics buy, measured on the shapes model: one dataset, three ways to train.

    python bench/quality.py [--steps 150] [--seeds 4] [--out bench_output/quality]

The same warm (+1) / cool (-1) pairs (circles and squares) plus neutral content (triangles of
any hue, captioned without a colour word: content the slider should leave alone), the same
steps and seed, trained three ways with slider-cn's own loop:

- ``preserve``: slider-cn's default: a neutral batch teaches the slider at +-max|s| to reproduce
  the frozen base (docs/design.md §5);
- ``regular``: neutral batches trained as plain denoising at strength 1 with no preservation,
  which is what SimpleTuner does with a backend that has no slider_strength (and what other
  tools do with unlabelled data);
- ``no-neutral``: the neutral backend left out (pairs only), the reference.

Each row: the warmth slider's effect size and Spearman on the held-out circle, the outline IoU
with s = 0, and on the neutral content the warmth drift at |s| = 1 (how far the slider moves a
picture it should leave alone: the mean over pictures of |warmth(s) - warmth(0)|, worse of
s = -1 and s = +1) and its outline IoU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slider_cn.shapes.quality import train_and_measure  # noqa: E402

ARMS = {
    "preserve": ({"neutral": 8}, {"slider_neutral_mode": "preserve"}),
    "regular": ({"neutral": 8}, {"slider_neutral_mode": "regular"}),
    "no-neutral": ({"neutral": 0}, {}),
}
NEUTRAL_PROMPTS = {"triangle": "a triangle", "large_triangle": "a large triangle"}


def _row(name: str, report: dict) -> dict:
    iou = min(r["mean"] for r in report["preservation"]["mask_iou"])
    neutral = report["neutral"]
    extreme = max(
        r["mean_abs"] for r in neutral["preservation"]["attribute_drift"] if abs(r["strength"]) == 1
    )
    return {
        "arm": name,
        "effect_size": report["effect_size"],
        "spearman": report["monotonicity"]["spearman"],
        "both_ways": report["slides_both_ways"],
        "outline_iou": iou,
        "neutral_warmth_drift": extreme,
        "neutral_outline_iou": min(r["mean"] for r in neutral["preservation"]["mask_iou"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="slider_cn_quality_"))
    rows = []
    for name, (dataset, overrides) in ARMS.items():
        start = time.perf_counter()
        report = train_and_measure(
            root / name,
            mode="lora",
            steps=args.steps,
            seeds=args.seeds,
            dataset={"pairs": 16, **dataset},
            overrides=overrides,
            neutral_prompts=NEUTRAL_PROMPTS,
        )
        rows.append({**_row(name, report), "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        f"{args.steps} steps, LoRA-only with shapes-canny, {args.seeds} seeds; warmth runs from "
        "-1 (azure) to +1 (orange)"
    )
    header = "| arm | effect size | Spearman | both ways | outline IoU | neutral warmth drift at abs(s)=1 | neutral outline IoU |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['effect_size']:+.2f} | {r['spearman']:+.2f} | {r['both_ways']} "
            f"| {r['outline_iou']:.2f} | {r['neutral_warmth_drift']:.2f} | {r['neutral_outline_iou']:.2f} |"
        )


if __name__ == "__main__":
    main()
