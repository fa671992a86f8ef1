"""A second epoch with caches against the first: time, and the encoder calls it still makes.

    python bench/cache.py [--images 8] [--resolution 512] [--batch 1] [--step-ms 150]

The data path is the training recipe's (slider_cn/recipe.py), per micro-batch: the sampler's
plan, `load_batch(pixels=False)` (conditioning images decoded here), latents from
`EncodedCache.latents` and text embeddings from `EncodedCache.text`, on the tiny sd1x encoders
with a synthetic dataset with conditioning (write_demo_dataset, `--images` per group, three
groups). Epoch 1 starts from an empty cache and
runs the VAE and the text encoder; epoch 2 must run neither: the calls are counted at the
modules (forward hooks on the text encoders, a wrapper on `vae.encode`), not at slider-cn's own
counters. The tiny VAE is far cheaper than SD's, so the real first epoch costs much more and
the ratio here is a worst case for the cache.

With --step-ms > 0 a third part replays the warm epoch with a stand-in for the training step
(a sleep: the time the loop waits on the GPU) and reports the time per micro-batch with the
next batch read while the step runs (the recipe's `prefetch_batches`) and without it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Calls:
    """Counts VAE encodes and text-encoder forwards at the modules themselves."""

    def __init__(self, components):
        self.vae = self.text = 0
        vae, encode = components.vae, components.vae.encode

        def counted_encode(*args, **kwargs):
            self.vae += 1
            return encode(*args, **kwargs)

        vae.encode = counted_encode
        for encoder in components.text_encoders:
            encoder.register_forward_hook(self._text_hook)

    def _text_hook(self, *_):
        self.text += 1

    def reset(self) -> tuple[int, int]:
        counts = (self.vae, self.text)
        self.vae = self.text = 0
        return counts


def run_epoch(sampler, cache, epoch: int, *, prefetch: bool, step_s: float = 0.0):
    """One epoch of the recipe's data path; returns (seconds, per-part seconds per micro-batch)."""
    from slider_cn.data.loading import load_batch, prefetch_batches

    parts = {"load_batch": [], "latents": [], "text": []}
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    if prefetch:
        pairs = prefetch_batches(sampler, pixels=False)
    else:
        pairs = ((plan, None) for plan in sampler)
    mark = time.perf_counter()
    for plan, batch in pairs:
        if batch is None:
            batch = load_batch(plan, pixels=False)
        t1 = time.perf_counter()
        latents = cache.latents(batch)
        t2 = time.perf_counter()
        text = cache.text(batch.captions)
        t3 = time.perf_counter()
        assert latents.shape[0] == len(plan.samples) == text["encoder_hidden_states"].shape[0]
        assert batch.conditioning_pixels is not None
        parts["load_batch"].append(t1 - mark)  # with prefetch: the wait for the batch
        parts["latents"].append(t2 - t1)
        parts["text"].append(t3 - t2)
        if step_s:
            time.sleep(step_s)
        mark = time.perf_counter()
    return time.perf_counter() - start, {k: statistics.median(v) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per group (3 groups)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--step-ms", type=float, default=150.0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers.utils import logging as diffusers_logging

    from slider_cn.config import load_config
    from slider_cn.data.backends import training_backends
    from slider_cn.data.cache import EncodedCache
    from slider_cn.data.sampler import SliderSampler
    from slider_cn.demo_data import write_demo_dataset
    from slider_cn.families import get_family

    diffusers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        paths = write_demo_dataset(
            tmp, images_per_group=args.images, resolution=args.resolution, conditioning="folders"
        )
        config = load_config(paths["config"], {"resolution": str(args.resolution)})
        backends = training_backends(config, progress=False)
        sampler = SliderSampler(backends, batch_size=args.batch, seed=config.seed)
        family = get_family(config)
        components = family.load_components()
        calls = Calls(components)
        cache = EncodedCache(config.cache_path, family, components, device="cpu")

        first, _ = run_epoch(sampler, cache, 0, prefetch=True)
        first_calls = calls.reset()
        second, parts = run_epoch(sampler, cache, 1, prefetch=True)
        second_calls = calls.reset()

        n = len(sampler)
        print(
            f"{3 * args.images} images {args.resolution}x{args.resolution} with conditioning, "
            f"batch {args.batch}, {n} micro-batches per epoch, tiny sd1x encoders, "
            f"{args.threads} thread(s)"
        )
        print(f"epoch 1 (empty cache): {first:7.2f} s   VAE encodes {first_calls[0]:3d}, "
              f"text-encoder forwards {first_calls[1]:3d}")  # fmt: skip
        print(f"epoch 2 (warm cache):  {second:7.2f} s   VAE encodes {second_calls[0]:3d}, "
              f"text-encoder forwards {second_calls[1]:3d}")  # fmt: skip
        print(f"ratio epoch 2 / epoch 1 = {second / first:.3f}")
        print(
            "epoch 2 per micro-batch (median): "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in parts.items())
        )
        ok = second_calls == (0, 0)
        if args.step_ms > 0:
            step_s = args.step_ms / 1e3
            rows = {}
            # Interleaved against load drift; every epoch is warm (only the order differs).
            for epoch, prefetch in enumerate((False, True, False, True), start=2):
                seconds, _ = run_epoch(sampler, cache, epoch, prefetch=prefetch, step_s=step_s)
                rows.setdefault(prefetch, []).append(seconds / n)
            plain, ahead = min(rows[False]), min(rows[True])
            print(
                f"with a {args.step_ms:.0f} ms stand-in step, per micro-batch: "
                f"next batch read after the step {plain * 1e3:.1f} ms, "
                f"during the step (prefetch_batches) {ahead * 1e3:.1f} ms; "
                f"data overhead {(plain - step_s) * 1e3:.1f} -> {(ahead - step_s) * 1e3:.1f} ms"
            )
        print("second epoch encodes nothing:", "yes" if ok else "NO")
        if not ok:
            sys.exit(1)


if __name__ == "__main__":
    main()
