"""`make demo`: the whole journey on the shipped `shapes` model, on a CPU, in a few minutes.

1. a contrastive dataset from the shapes world: warm shapes (+) and their cool twins (-), the
   same outlines and captions, so the only difference is warmth;
2. their canny maps with `slider-cn preprocess`;
3. the planned batches (`train --plan`), then a LoRA-only slider on the base with the
   `shapes-canny` ControlNet frozen in the loop, and a ControlNet-mode slider on that ControlNet;
4. `slider-cn validate` (a strength-sweep grid per prompt) and `slider-cn evaluate` (the
   measured warmth at each strength over seeds and prompts, the outline IoU, a plot) for each.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from slider_cn.cli import main as cli_main
from slider_cn.shapes.dataset import write_shapes_slider_dataset

STEPS = int(os.environ.get("SLIDER_CN_DEMO_STEPS", "150"))
STRENGTHS = "-1,-0.5,0,0.5,1"


def _run(args: list[str]) -> None:
    print(f"\n$ slider-cn {shlex.join(args)}", flush=True)
    code = cli_main(args)
    if code != 0:
        sys.exit(code)


def _curve(report: dict) -> str:
    name = report["attribute"]
    return ", ".join(
        f"{row['strength']:+g}: {row['mean']:+.2f}" for row in report["per_strength"][name]
    )


def main(root: str = "demo_output") -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    root_path = Path(root).resolve()
    for old in ("data", "canny", "lora_run", "controlnet_run"):
        shutil.rmtree(root_path / old, ignore_errors=True)  # the demo owns these: start afresh
    paths = write_shapes_slider_dataset(root_path, pairs=16, conditioning="preprocess")
    config = str(paths["config"])
    print(f"wrote a contrastive dataset from the shapes world under {root_path / 'data'}")
    print("  plus/: warm shapes (slider_strength +1)   minus/: the same outlines in cool hues (-1)")

    _run(
        [
            "preprocess",
            "--detector",
            "canny",
            "--input",
            str(root_path / "data"),
            "--output",
            str(root_path / "canny"),
        ]
    )
    _run(["train", "--config", config, "--plan", "4"])

    runs = {
        "lora_run": ("LoRA-only slider, shapes-canny frozen in the loop", {}),
        "controlnet_run": (
            "ControlNet-mode slider on shapes-canny",
            {"training_mode": "controlnet"},
        ),
    }
    reports: dict[str, dict] = {}
    for name, (title, extra) in runs.items():
        out = root_path / name
        overrides = {"output_dir": str(out), "max_train_steps": str(STEPS), **extra}
        flags = [token for key, value in overrides.items() for token in (f"--{key}", value)]
        print(f"\n== {title} ==")
        _run(["train", "--config", config, *flags])
        # validate and evaluate read the mode, targets and ControlNet from the run's files
        run = ["--config", config, "--adapter", str(out), f"--strengths={STRENGTHS}"]
        _run(["validate", *run])
        _run(["evaluate", *run, "--attribute", "warmth"])
        reports[name] = json.loads((out / "evaluation" / "evaluation.json").read_text())

    print("\nWhat the sliders do (measured on the generated pictures, 4 seeds x 2 prompts)")
    for name, (title, _) in runs.items():
        report = reports[name]
        ious = report["preservation"]["mask_iou"]
        print(f"  {title}:")
        print(f"    {report['attribute']} by strength  {_curve(report)}")
        print(
            f"    Spearman {report['monotonicity']['spearman']:+.2f}, effect size "
            f"{report['effect_size']:+.2f} (warmth runs from -1 azure to +1 orange)"
        )
        print(
            f"    outline: mean mask IoU with the s=0 picture >= {min(r['mean'] for r in ious):.2f} "
            f"at every strength, worst single picture {min(r['min'] for r in ious):.2f}"
        )
    print("\nOutputs")
    for name, (title, _) in runs.items():
        out = root_path / name
        print(f"  {title}:")
        for grid in sorted((out / "validation" / "final").glob("*_sweep.png")):
            print(f"    strength-sweep grid:  {grid}")
        print(f"    evaluation plot:      {out / 'evaluation' / 'evaluation.png'}")
        print(f"    evaluation report:    {out / 'evaluation' / 'evaluation.json'}")
    lora = root_path / "lora_run"
    print(f"  LoRA slider (diffusers): {lora / 'pytorch_lora_weights.safetensors'}")
    print(f"  kohya / ComfyUI file:    {lora / 'slider_kohya.safetensors'}")
    print(
        f"  ControlNet slider:       {root_path / 'controlnet_run' / 'controlnet_slider.safetensors'}"
    )
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
