"""Median training-step time of slider-cn against a minimal diffusers + peft loop (CPU).

    python bench/train_step.py [--pairs 25] [--cases lora,lora+cn,preserve,lora+data]

Both sides get the same UNet (same weights), LoRA rank and modules (slider-cn's resolved slider
targets), AdamW, precision, seed and inputs; bench/common.py builds them (SliderRunner: the
training recipe's own `train_micro_batch`, slider_cn/recipe.py, set up on the bench's models;
PlainRunner: the hand-written loop). Per case the two
steps run interleaved in alternating order (AB BA AB ...) so that load from other processes
hits both alike; the figures are medians over --pairs steps each, after --warmup.

Cases, and what the plain side does:
- lora:      slider step at strength +-0.5   vs  plain LoRA step
- lora+cn:   the same with a frozen ControlNet  vs  plain step + one no-grad ControlNet forward
- preserve:  neutral batch, slider_neutral_mode preserve  vs  plain step + one no-grad forward
- lora+data: the lora step plus the rest of the recipe's micro-batch: the next sampler plan,
             load_batch, latents and text embeddings from a warm EncodedCache  vs  plain step
             on tensors already in memory
- controlnet: LoRA on the ControlNet (UNet frozen)  vs  the same by hand
Goal: ratio slider-cn / plain <= 1.05 in every case.

The model is bench/common.py's MEDIUM_UNET: SD1.5's layout at 1/10 width (about 9M
parameters, 100 slider target modules) at 128 px, 16x16 latents.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

GOAL = 1.05


def compare(case: str, args, device: torch.device, tmp: Path) -> dict:
    base_case = "lora" if case == "lora+data" else case
    slider_models, plain_models = common.twin_models(base_case, args.model, device, args.seed)
    options = common.Options(rank=args.rank, precision=args.precision, seed=args.seed)
    slider = common.SliderRunner(base_case, args.model, device, options, slider_models)
    plain = common.PlainRunner(base_case, args.model, device, options, plain_models)
    inputs = common.case_inputs(base_case, args.model, args.resolution, args.batch, device)
    feed = (
        common.DataFeed(tmp / "data", args.resolution, args.batch, device)
        if case == "lora+data"
        else None
    )
    flip = itertools.cycle(["+", "-"])

    def slider_step() -> None:
        if feed is not None:
            slider.step(feed.next())
        elif case in ("lora", "lora+cn", "controlnet"):
            inputs.sign = next(flip)  # the multiplier changes every step, as in training
            inputs.slider_strength = 0.5 if inputs.sign == "+" else -0.5
            slider.step(inputs)
        else:
            slider.step(inputs)

    def plain_step() -> None:
        plain.step(inputs)

    def timed(fn) -> float:
        common.cuda_sync(device)
        start = time.perf_counter()
        fn()
        common.cuda_sync(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        slider_step()
        plain_step()
    times: dict[str, list[float]] = {"slider": [], "plain": []}
    for i in range(args.pairs):
        order = (("slider", slider_step), ("plain", plain_step))
        for name, fn in order if i % 2 == 0 else reversed(order):
            times[name].append(timed(fn))
    slider.close()
    s, p = statistics.median(times["slider"]), statistics.median(times["plain"])
    # Noise: the spread of the per-pair ratios (each pair ran back to back).
    ratios = sorted(a / b for a, b in zip(times["slider"], times["plain"], strict=True))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return {"case": case, "slider": s, "plain": p, "ratio": s / p, "q1": q1, "q3": q3,
            "paired": statistics.median(ratios), "targets": slider.n_targets}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium", choices=sorted(common.UNETS))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--pairs", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default="lora,lora+cn,preserve,lora+data")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch CPU threads (default: OMP_NUM_THREADS or 1; steadier on a shared machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in (*common.CASES, "lora+data")]
    if unknown:
        parser.error(f"unknown case(s) {unknown}")

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        for case in cases:
            rows.append(compare(case, args, device, Path(tmp)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.model} UNet at {args.resolution}px, batch {args.batch}, LoRA rank {args.rank} on "
        f"{rows[0]['targets']} slider targets, precision {args.precision}, {args.threads} "
        f"thread(s), load average {load:.2f}; median of {args.pairs} interleaved steps each"
    )
    print("ratio = median slider-cn / median plain; per pair (the two steps run back to back):")
    print("the median ratio and its quartiles, which show the noise from other load")
    print(f"{'case':<12}{'slider-cn':>12}{'plain':>12}{'diff':>10}{'ratio':>8}  "
          f"{'pairs: median [q1..q3]':<25}goal")  # fmt: skip
    for r in rows:
        ok = "ok" if r["ratio"] <= GOAL else "OVER"
        print(
            f"{r['case']:<12}{r['slider'] * 1e3:>10.1f}ms{r['plain'] * 1e3:>10.1f}ms"
            f"{(r['slider'] - r['plain']) * 1e3:>+8.1f}ms{r['ratio']:>8.3f}  "
            f"{r['paired']:.3f} [{r['q1']:.3f}..{r['q3']:.3f}]{'':<4}<= {GOAL} {ok}"
        )
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
