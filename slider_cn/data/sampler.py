"""The sign-cycled sampler (docs/design.md §4): which backend, sign and samples each micro-batch gets.

Semantics, for one epoch:

- Backends are grouped by the sign of `slider_strength`: positive "+", negative "-", neutral
  "0". The groups take turns in the fixed cycle + → - → 0, one micro-batch per turn; a group
  with no backend left is skipped (it leaves the cycle).
- Inside the group whose turn it is, one backend is drawn with weight `probability` among
  the group's backends that still have a batch left. A batch never mixes backends.
- Each backend's epoch pool is its samples shuffled once per pass, for 1 + `repeats` passes,
  concatenated (`repeats: 0` = every image once per epoch; a batch may straddle two passes).
  The pool is consumed in order, one *global* batch (`batch_size * world_size` samples) per
  turn. **Remainder policy: drop.** A backend with fewer samples left than a global batch is
  exhausted and leaves its group; its last `pool % global_batch` samples are not used this
  epoch (the shuffle differs every epoch, so no image is left out for good; with aspect
  buckets, batches fill per bucket, and a bucket smaller than a global batch is never drawn,
  which the sampler logs as a warning). Every batch is
  therefore full on every rank, and the epoch length is fixed: `len(sampler)` =
  sum over backends of `samples_per_epoch // global_batch`. A backend too small for even one
  global batch is a ConfigError.
- The epoch ends when every backend is exhausted.

Determinism: the backend draw of micro-batch ``index`` in epoch ``epoch`` is the
``index``-th uniform of a numpy Generator seeded by (seed, epoch); each backend's shuffle
comes from one seeded by (seed, epoch, backend id). The global RNGs (torch, numpy, random) are neither used nor disturbed. Every rank
computes the same sequence; rank ``r`` takes samples ``[r * batch_size, (r + 1) * batch_size)``
of each global batch, so ranks see the same backends and signs and disjoint samples.

Use (the training loop)::

    sampler = SliderSampler(backends, batch_size, seed, rank=rank, world_size=world_size)
    sampler.load_state_dict(saved)          # when resuming; continues mid-epoch exactly
    for epoch in range(sampler.epoch, num_epochs):
        sampler.set_epoch(epoch)            # keeps the resumed position for the same epoch
        for plan in sampler:                # BatchPlan, this rank's samples
            ...
            checkpoint["sampler"] = sampler.state_dict()   # position after `plan`

With prefetching, save ``sampler.state_dict(after=plan)`` for the last plan actually trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slider_cn.data.backends import Backend, Sample
from slider_cn.data.buckets import BucketSpec
from slider_cn.data.prompts import PromptTask
from slider_cn.errors import ConfigError

log = logging.getLogger(__name__)

SIGN_CYCLE = ("+", "-", "0")
STATE_VERSION = 1
# Separate streams of the seed sequence for backend draws and per-backend shuffles.
_DRAW, _SHUFFLE = 0, 1


@dataclass(frozen=True)
class BatchPlan:
    """One micro-batch as planned: which backend, which strength, and this rank's samples."""

    step: int  # global micro-batch index: epoch * len(sampler) + index
    epoch: int
    index: int  # micro-batch index inside the epoch
    backend: str
    slider_strength: float
    sign: str  # "+", "-" or "0"
    samples: tuple[Sample, ...]
    resolution: int
    prompt: PromptTask | None = None  # set for the micro-batches of a text slider
    spec: BucketSpec | None = None  # the backend's bucket settings (None: square)

    @property
    def bucket(self) -> tuple[int, int]:
        """(width, height) of every image of this micro-batch."""
        first = self.samples[0].placement if self.samples else None
        if first is not None:
            return first.bucket
        side = self.spec.square_side() if self.spec is not None else self.resolution
        return side, side

    @property
    def files(self) -> list[str]:
        """The training images, or for a text slider the conditioning images it draws."""
        return [
            str(s.path if s.path is not None else s.conditioning)
            for s in self.samples
            if s.path is not None or s.conditioning is not None
        ]

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    def to_json(self) -> dict[str, Any]:
        """The line `slider-cn train --dry-run --plan N` prints."""
        line = {
            "step": self.step,
            "epoch": self.epoch,
            "backend": self.backend,
            "slider_strength": self.slider_strength,
            "sign": self.sign,
            "bucket": "{}x{}".format(*self.bucket),
            "files": self.files,
        }
        if self.prompt is not None:
            line["prompts"] = self.prompt.to_json()
            if self.prompt.kind == "neutral":
                line["prompts"]["neutral"] = self.captions
        return line


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def _backend_seed(backend_id: str) -> int:
    # Stable across runs and processes (str hash() is salted); independent of backend order.
    return zlib.crc32(backend_id.encode("utf-8"))


class SliderSampler:
    """Plans micro-batches by the sign-cycled rule; see the module docstring."""

    def __init__(
        self,
        backends: Sequence[Backend],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad sampler geometry: batch_size={batch_size} rank={rank} world_size={world_size}"
            )
        if not backends:
            raise ConfigError("no training backends to sample from")
        ids = [b.id for b in backends]
        if len(set(ids)) != len(ids):
            raise ValueError(f"backend ids must be unique: {ids}")
        self.backends = list(backends)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        # sample indices of each bucket, per backend (one bucket without aspect buckets)
        self._buckets = [_bucket_members(b) for b in self.backends]
        self._batches_per_backend = [
            sum(len(m) * (b.repeats + 1) // self.global_batch for m in members.values())
            for b, members in zip(self.backends, self._buckets, strict=True)
        ]
        for backend, members in zip(self.backends, self._buckets, strict=True):
            # images of a bucket that never fills a batch are never trained: say so
            short = {
                b: len(m)
                for b, m in members.items()
                if len(m) * (backend.repeats + 1) < self.global_batch
            }
            if short and len(members) > 1 and rank == 0:
                log.warning(
                    "backend '%s': %d image(s) in bucket(s) %s never fill a batch of %d and are "
                    "not trained; add images of those shapes, add repeats, or lower "
                    "train_batch_size",
                    backend.id,
                    sum(short.values()),
                    ", ".join(f"{w}x{h} ({n})" for (w, h), n in short.items()),
                    self.global_batch,
                )
        too_small = [
            b for b, n in zip(self.backends, self._batches_per_backend, strict=True) if n == 0
        ]
        if too_small:
            lines = [
                f"backend '{b.id}' has {b.samples_per_epoch} samples per epoch "
                f"({len(b.samples)} images x {b.repeats + 1} passes"
                + (
                    f", the largest of its {len(m)} buckets {max(map(len, m.values()))} images"
                    if len(m) > 1
                    else ""
                )
                + ")"
                for b, m in zip(self.backends, self._buckets, strict=True)
                if b in too_small
            ]
            raise ConfigError(
                "; ".join(lines) + f", fewer than one batch of {self.global_batch} "
                f"(train_batch_size {batch_size} x {world_size} processes), so it would never "
                "be drawn; add images or repeats, or lower train_batch_size"
            )
        self.epoch = 0
        self.index = 0
        self._schedule_cache: tuple[int, list[tuple[int, int]]] | None = None
        self._pool_cache: dict[tuple[int, int], np.ndarray] = {}
        self._batch_cache: dict[tuple[int, int], list[np.ndarray]] = {}
        self._fingerprint: str | None = None

    # --- the schedule ------------------------------------------------------------------
    def __len__(self) -> int:
        """Micro-batches per epoch (the same every epoch)."""
        return sum(self._batches_per_backend)

    def _pool(self, backend_index: int, epoch: int) -> np.ndarray:
        """Sample indices of one backend for one epoch: a fresh shuffle per pass."""
        cached = self._pool_cache.get((epoch, backend_index))
        if cached is None:
            if any(e != epoch for e, _ in self._pool_cache):
                self._pool_cache.clear()  # keep one epoch's pools only
            backend = self.backends[backend_index]
            rng = _rng(self.seed, epoch, _SHUFFLE, _backend_seed(backend.id))
            n = len(backend.samples)
            cached = np.concatenate([rng.permutation(n) for _ in range(backend.repeats + 1)])
            self._pool_cache[(epoch, backend_index)] = cached
        return cached

    def _global_batches(self, backend_index: int, epoch: int) -> list[np.ndarray]:
        """One backend's global batches of ``epoch``, in order: its pool read in order, each
        sample joining its bucket's batch, a batch complete when it holds a global batch.
        What is left in a bucket at the end is not used this epoch (remainder policy: drop)."""
        cached = self._batch_cache.get((epoch, backend_index))
        if cached is None:
            if any(e != epoch for e, _ in self._batch_cache):
                self._batch_cache.clear()
            pool = self._pool(backend_index, epoch)
            g = self.global_batch
            members = self._buckets[backend_index]
            if len(members) == 1:
                cached = [pool[i * g : (i + 1) * g] for i in range(len(pool) // g)]
            else:
                bucket_of = {i: b for b, indices in members.items() for i in indices}
                filling: dict[tuple[int, int], list[int]] = {}
                cached = []
                for i in pool:
                    batch = filling.setdefault(bucket_of[int(i)], [])
                    batch.append(int(i))
                    if len(batch) == g:
                        cached.append(np.asarray(batch))
                        filling[bucket_of[int(i)]] = []
            self._batch_cache[(epoch, backend_index)] = cached
        return cached

    def schedule(self, epoch: int) -> list[tuple[int, int]]:
        """(backend index, batch number in the backend) of every global batch of ``epoch``."""
        if self._schedule_cache is not None and self._schedule_cache[0] == epoch:
            return self._schedule_cache[1]
        left = list(self._batches_per_backend)
        taken = [0] * len(self.backends)
        # Backends still in each group, in config order; a group empties as they run out.
        groups = [[i for i, b in enumerate(self.backends) if b.sign == sign] for sign in SIGN_CYCLE]
        # The draw of step k is the k-th uniform of the (seed, epoch) stream: one vectorised
        # call instead of a generator per step, same determinism.
        uniforms = _rng(self.seed, epoch, _DRAW).random(len(self))
        plan: list[tuple[int, int]] = []
        turn = 0
        for index in range(len(self)):
            for offset in range(len(SIGN_CYCLE)):
                position = (turn + offset) % len(SIGN_CYCLE)
                candidates = groups[position]
                if candidates:
                    break
            if len(candidates) == 1:
                chosen = candidates[0]
            else:
                weights = [self.backends[i].probability for i in candidates]
                cumulative = np.cumsum(weights) / sum(weights)
                pick = int(np.searchsorted(cumulative, uniforms[index], side="right"))
                chosen = candidates[min(pick, len(candidates) - 1)]
            plan.append((chosen, taken[chosen]))
            taken[chosen] += 1
            left[chosen] -= 1
            if left[chosen] == 0:
                candidates.remove(chosen)  # exhausted: leaves its group
            turn = (position + 1) % len(SIGN_CYCLE)
        self._schedule_cache = (epoch, plan)
        return plan

    def plan_at(self, epoch: int, index: int) -> BatchPlan:
        """The plan of micro-batch ``index`` of ``epoch`` for this rank."""
        backend_index, number = self.schedule(epoch)[index]
        backend = self.backends[backend_index]
        batch = self._global_batches(backend_index, epoch)[number]
        first = self.rank * self.batch_size
        chosen = batch[first : first + self.batch_size]
        return BatchPlan(
            step=epoch * len(self) + index,
            epoch=epoch,
            index=index,
            backend=backend.id,
            slider_strength=float(backend.slider_strength),
            sign=backend.sign,
            samples=tuple(backend.samples[int(i)] for i in chosen),
            resolution=backend.resolution,
            prompt=backend.prompt,
            spec=backend.spec,
        )

    # --- iteration and position --------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; a no-op when already in it (so a resumed mid-epoch
        position survives the loop's `set_epoch` call)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.index = 0

    def __iter__(self) -> Iterator[BatchPlan]:
        """Plans from the current position to the end of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch and self.index < len(self):
            index = self.index
            plan = self.plan_at(epoch, index)
            # Advance before yielding: state_dict() taken while holding `plan` resumes after it.
            self.index = index + 1
            yield plan

    def fingerprint(self) -> str:
        """Identifies what the sequence depends on: backend ids, signs, probabilities, repeats
        and files (relative paths without extension). The strength's magnitude is not part of
        it, so a resumed run may change it without changing the sequence."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        description = [
            [b.id, b.sign, b.probability, b.repeats, [_sample_id(s) for s in b.samples]]
            for b in self.backends
        ]
        return hashlib.sha256(json.dumps(description).encode("utf-8")).hexdigest()[:16]

    def state_dict(self, after: BatchPlan | None = None) -> dict[str, Any]:
        """The position to resume from: after the last plan yielded, or after ``after``."""
        epoch, index = (self.epoch, self.index) if after is None else (after.epoch, after.index + 1)
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "index": index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off. The seed, batch geometry and data must
        be those of the saved run; otherwise the sequence would differ, which is an error."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"sampler state has version {state.get('version')}, expected {STATE_VERSION}"
            )
        changed = [
            f"{key} {state.get(key)} -> {now}"
            for key, now in (
                ("seed", self.seed),
                ("batch_size", self.batch_size),
                ("world_size", self.world_size),
            )
            if state.get(key) != now
        ]
        if state.get("fingerprint") != self.fingerprint():
            changed.append("the dataset (backends, files, signs, probabilities or repeats)")
        if changed:
            raise ConfigError(
                "cannot resume the data sequence of the checkpoint: changed since it was "
                f"written: {'; '.join(changed)}. Resume with the same settings and data, or "
                "start a new run"
            )
        if not 0 <= int(state["index"]) <= len(self):
            raise ConfigError(f"sampler state index {state['index']} outside 0..{len(self)}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])


def _bucket_members(backend: Backend) -> dict[tuple[int, int] | None, list[int]]:
    members: dict[tuple[int, int] | None, list[int]] = {}
    for i, sample in enumerate(backend.samples):
        bucket = sample.placement.bucket if sample.placement is not None else None
        members.setdefault(bucket, []).append(i)
    return members


def _sample_id(sample: Sample) -> Any:
    # with aspect buckets, an image's bucket is part of the sequence (batches group by it)
    if sample.placement is None:
        return sample.key
    return [sample.key, *sample.placement.bucket]


def preview(sampler: SliderSampler, count: int) -> Iterator[BatchPlan]:
    """The first ``count`` plans of a fresh run from epoch 0, crossing epochs as needed.

    Works on its own position: the sampler's state is left as it was.
    """
    produced = 0
    epoch = 0
    while produced < count:
        for index in range(len(sampler)):
            if produced >= count:
                return
            yield sampler.plan_at(epoch, index)
            produced += 1
        epoch += 1
