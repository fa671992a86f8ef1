"""The batch runner: every image under an input folder -> a conditioning PNG at the same
relative path under the output folder, resumable through the output folder's manifest."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from conditioning import _worker
from conditioning.images import list_images, output_name
from conditioning.manifest import Manifest
from conditioning.registry import get_spec, resolve_params
from slider_cn.errors import ConfigError

log = logging.getLogger(__name__)

_SAVE_EVERY_S = 2.0  # manifest checkpoint interval: an interrupted run keeps its progress
_FILES_PER_HELPER = 4  # fewer files than this per process do not pay for starting one


@dataclass
class FailedFile:
    path: str  # relative to the input folder
    error: str


@dataclass
class RunReport:
    detector: str
    params: dict[str, Any]
    input_dir: Path
    output_dir: Path
    processed: list[str] = field(default_factory=list)  # source paths, relative to input_dir
    skipped: list[str] = field(default_factory=list)  # up to date, left alone
    failed: list[FailedFile] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # outputs whose source is gone

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"{self.detector}: {len(self.processed)} processed, {len(self.skipped)} up to date, "
            f"{len(self.failed)} failed"
            + (f", {len(self.removed)} stale outputs removed" if self.removed else "")
            + f" -> {self.output_dir}"
        ]
        lines += [f"  failed: {f.path}: {f.error}" for f in self.failed]
        return "\n".join(lines)


# --- the batch ----------------------------------------------------------------------------
def _parallel(
    built: Any, rels: list[str], n_workers: int, init_args: tuple
) -> Iterator[tuple[str, str | None]]:
    """Process `rels` here and in n_workers - 1 helper processes. This process works from the
    start and hands chunks only to helpers that are up, so nothing ever waits for a helper to
    start (on a loaded machine that takes seconds)."""
    import cv2

    input_dir, output_dir, resolution = init_args[-3:]
    chunk = max(1, min(4, len(rels) // (n_workers * 8)))
    chunks = [rels[i : i + chunk] for i in range(0, len(rels), chunk)]
    helpers = n_workers - 1
    # spawn, not fork: a fork copies OpenCV's and torch's thread pools in a broken state (a
    # forked child can hang in its first cv2 call).
    pool = ProcessPoolExecutor(
        helpers, multiprocessing.get_context("spawn"), _worker.init, init_args
    )
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one process per core while the helpers run
    try:
        # A ping is done once a helper has started and built its detector.
        pings = [pool.submit(_worker.ping) for _ in range(helpers)]
        pending: list[tuple[list[str], Future]] = []
        position = 0
        while position < len(chunks) or pending:
            ready = sum(ping.done() and ping.exception() is None for ping in pings)
            while position < len(chunks) and len(pending) < 2 * ready:
                try:
                    future = pool.submit(_worker.work_chunk, chunks[position])
                except BrokenProcessPool:  # a helper died: this process carries on alone
                    pings = []
                    break
                pending.append((chunks[position], future))
                position += 1
            for item in [item for item in pending if item[1].done()]:
                pending.remove(item)
                yield from _chunk_results(*item)
            if position < len(chunks):
                for rel in chunks[position]:
                    yield rel, _worker.process_file(built, input_dir, output_dir, rel, resolution)
                position += 1
            elif pending:
                yield from _chunk_results(*pending.pop(0))
    finally:
        cv2.setNumThreads(threads)
        # Helpers still starting are not waited for; they exit once up.
        pool.shutdown(wait=False, cancel_futures=True)


def _chunk_results(part: list[str], future: Future) -> Iterator[tuple[str, str | None]]:
    try:
        yield from future.result()
    except BrokenProcessPool as exc:  # a helper died (killed, out of memory)
        yield from ((rel, f"helper process died ({exc})") for rel in part)


def _check_folders(input_dir: Path, output_dir: Path) -> None:
    if not input_dir.is_dir():
        raise ConfigError(f"input folder not found: {input_dir}")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output {output_dir} exists and is not a folder")
    if output_dir == input_dir or output_dir.is_relative_to(input_dir):
        raise ConfigError(
            f"output folder {output_dir} is inside the input folder {input_dir}: its images "
            "would be taken for inputs on the next run; choose a folder beside it"
        )
    if input_dir.is_relative_to(output_dir):
        raise ConfigError(f"input folder {input_dir} is inside the output folder {output_dir}")


def _check_collisions(sources: list[str]) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for rel in sources:
        out = output_name(rel)
        if out in seen:
            clashes.append(f"{seen[out]} and {rel} -> {out}")
        seen.setdefault(out, rel)
    if clashes:
        raise ConfigError(
            "these sources would write the same output PNG; rename one of each pair: "
            + "; ".join(clashes)
        )


def _weights_identity(annotator_path: str | None, needs_weights: bool) -> str | None:
    if not needs_weights:
        return None
    if annotator_path and Path(annotator_path).expanduser().is_dir():
        return str(Path(annotator_path).expanduser().resolve())
    return annotator_path  # a hub id, or None for the detector's default repo


def run_batch(
    detector: str,
    params: dict[str, Any] | None,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    resolution: int | None = None,
    workers: int = 1,
    annotator_path: str | None = None,
    *,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunReport:
    """Run `detector` over every image under `input_dir` into `output_dir` (same relative
    paths, PNG). Files whose manifest entry is current are skipped; unreadable images are
    reported in `failed` and the rest still processed. Bad arguments raise ConfigError.

    resolution: shorter side of the outputs in pixels (aspect kept); None: the source size.
    workers: processes for the CPU detectors (this one and workers - 1 helpers); weight-based
    detectors run in this process (on `device`, default CUDA when available).
    force: redo every file.
    """
    spec = get_spec(detector)
    resolved = resolve_params(detector, params)
    if resolution is not None and (isinstance(resolution, bool) or int(resolution) < 8):
        raise ConfigError(f"resolution must be a whole number >= 8, got {resolution!r}")
    if int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, got {workers!r}")
    input_dir = Path(input_dir).expanduser().resolve()
    output_dir = Path(output_dir).expanduser().resolve()
    _check_folders(input_dir, output_dir)

    sources = list_images(input_dir)
    _check_collisions(sources)
    report = RunReport(detector, resolved, input_dir, output_dir)
    settings = {
        "detector": detector,
        "params": resolved,
        "resolution": resolution,
        "weights": _weights_identity(annotator_path, spec.needs_weights),
    }
    manifest = Manifest.load(output_dir)

    todo: list[tuple[str, os.stat_result]] = []
    for rel in sources:
        stat = (input_dir / rel).stat()
        if not force and manifest.is_current(rel, stat, settings):
            report.skipped.append(rel)
        else:
            todo.append((rel, stat))
    present = set(sources)
    for rel in [r for r in manifest.files if r not in present]:
        (output_dir / manifest.files.pop(rel)["output"]).unlink(missing_ok=True)
        report.removed.append(rel)
    if not todo:
        if report.removed:
            manifest.save()
        return report

    from conditioning.detectors import build_detector

    # Built here first even when workers build their own: bad weights or a missing package
    # are one clear error before any work starts.
    built = build_detector(detector, resolved, annotator_path, device)
    n_workers = 1 if spec.uses_torch else max(1, min(int(workers), len(todo) // _FILES_PER_HELPER))
    if spec.uses_torch and workers > 1:
        log.info("%s runs in one process (torch); --workers applies to CPU detectors", detector)
    stats = dict(todo)
    output_dir.mkdir(parents=True, exist_ok=True)

    def results() -> Iterator[tuple[str, str | None]]:
        rels = [rel for rel, _ in todo]
        if n_workers == 1:
            for rel in rels:
                yield rel, _worker.process_file(built, input_dir, output_dir, rel, resolution)
            return
        init = (spec.aux_module is None, detector, resolved, annotator_path, device)
        yield from _parallel(built, rels, n_workers, (*init, input_dir, output_dir, resolution))

    last_save = time.monotonic()
    bar = tqdm(total=len(todo), desc=detector, unit="img", disable=None if progress else True)
    try:
        for rel, error in results():
            if error is None:
                manifest.record(rel, output_name(rel), stats[rel], settings)
                report.processed.append(rel)
            else:
                # An older output no longer matches its source: remove it rather than pair it.
                if manifest.files.pop(rel, None) is not None:
                    (output_dir / output_name(rel)).unlink(missing_ok=True)
                report.failed.append(FailedFile(rel, error))
            bar.update()
            if time.monotonic() - last_save > _SAVE_EVERY_S:
                manifest.save()
                last_save = time.monotonic()
    finally:
        bar.close()
        manifest.save()
    report.processed.sort()
    report.failed.sort(key=lambda f: f.path)
    return report
