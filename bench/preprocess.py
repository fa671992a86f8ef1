"""Images/s of the conditioning runner against a plain controlnet-aux loop (canny, 512x512).

    python bench/preprocess.py [--images 120] [--workers N] [--repeats 2]

The baseline is what a user's ad-hoc script does: a single-process loop that opens each image
with PIL, calls controlnet-aux's CannyDetector (its defaults: thresholds 100/200, 512 px) and
saves the PNG. The runner is `conditioning.run_batch("canny", ...)` with --workers processes,
timed end to end (pool start-up, manifest included) into a fresh output folder each time.
Both make the same 512x512 edge maps; the script checks they are identical. Each figure is the
best of --repeats runs, baseline and runner interleaved so that load from other processes on
the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Importable from a checkout without installing; heavier imports stay inside the functions, so
# the runner's helper processes (which import this script as their __main__) start light.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_images(folder: Path, count: int, size: int = 512) -> list[Path]:
    """`count` distinct 512x512 photos: crops, flips and tints of scikit-image's samples."""
    from skimage import data

    samples = [data.astronaut(), data.coffee(), data.chelsea()]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        img = samples[i % len(samples)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = cv2.resize(
            img[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA
        )
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = (crop * rng.uniform(0.8, 1.2, size=3)).clip(0, 255).astype(np.uint8)
        path = folder / f"{i // 40:02d}" / f"img_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(path)
        paths.append(path)
    return paths


def baseline(paths: list[Path], src: Path, out: Path) -> float:
    from conditioning._aux import aux_class

    detector = aux_class("canny", "canny", "CannyDetector")()
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        result = detector(image, low_threshold=100, high_threshold=200)
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        result.save(target)
    return time.perf_counter() - start


def runner(src: Path, out: Path, workers: int) -> float:
    from conditioning import run_batch

    start = time.perf_counter()
    report = run_batch("canny", {}, src, out, workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    assert report.ok and not report.skipped, report.summary()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        paths = write_images(src, args.images)
        from conditioning import run_batch
        from conditioning._aux import aux_class

        aux_class("canny", "canny", "CannyDetector")  # import costs outside the timings
        run_batch("canny", {}, src, tmp / "warm-up", progress=False)

        best = {"baseline": float("inf"), "runner-1": float("inf"), "runner-n": float("inf")}
        for _ in range(args.repeats):
            for name, run in (
                ("baseline", lambda out: baseline(paths, src, out)),
                ("runner-n", lambda out: runner(src, out, args.workers)),
                ("runner-1", lambda out: runner(src, out, 1)),
            ):
                out = tmp / name
                shutil.rmtree(out, ignore_errors=True)
                best[name] = min(best[name], run(out))

        # controlnet-aux writes the edge map as RGB, the runner as one-channel PNG.
        same = all(
            np.array_equal(
                np.asarray(Image.open(tmp / "baseline" / p.relative_to(src)))[:, :, 0],
                np.asarray(Image.open(tmp / "runner-n" / p.relative_to(src))),
            )
            for p in paths
        )
        rate = {name: args.images / seconds for name, seconds in best.items()}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{args.images} images 512x512, canny 100/200, {os.cpu_count()} CPUs, "
              f"load average {load:.2f}, best of {args.repeats}")  # fmt: skip
        print(f"controlnet-aux loop (1 process):   {rate['baseline']:7.1f} images/s")
        print(f"runner, 1 worker:                  {rate['runner-1']:7.1f} images/s")
        print(f"runner, {args.workers} workers:                 {rate['runner-n']:7.1f} images/s")
        print(
            f"ratio runner/{args.workers} workers : loop = {rate['runner-n'] / rate['baseline']:.2f}x"
        )
        print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()
