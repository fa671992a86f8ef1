"""Inline conditioning: a backend's `"conditioning": [{"type": ..., "params": {...}}]` made
into a cached conditioning folder and linked as that backend's conditioning_data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from conditioning.registry import params_hash, resolve_params
from conditioning.runner import run_batch
from slider_cn.data.config import BackendConfig
from slider_cn.errors import ConfigError

log = logging.getLogger(__name__)

# Keys of a spec's params that configure the runner rather than the detector.
RUNNER_KEYS = ("annotator_path",)


def _split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    detector = {k: v for k, v in params.items() if k not in RUNNER_KEYS}
    runner = {k: v for k, v in params.items() if k in RUNNER_KEYS}
    return detector, runner


def prepare_inline_conditioning(
    backends: list[BackendConfig],
    cache_root: Path,
    *,
    workers: int = 1,
    device: str | None = None,
    progress: bool = True,
) -> list[BackendConfig]:
    """For every enabled backend with `conditioning` set, run the batch runner into
    ``cache_root/<backend id>/<type>-<hash of its resolved params>`` (a rerun only redoes what
    changed) and return the backend list with, after that backend, a new `conditioning`
    backend on the folder, and the backend's `conditioning_data` pointing to it (and its
    `conditioning` cleared, so the result can be passed again). The input list is not modified. Images that cannot be made are a ConfigError naming them."""
    cache_root = Path(cache_root)
    ids = {b.id for b in backends}
    result: list[BackendConfig] = []
    for backend in backends:
        if not backend.conditioning or backend.disabled:
            result.append(backend)
            continue
        where = f"backend '{backend.id}'"
        if backend.conditioning_data is not None:
            raise ConfigError(
                f"{where}: set either `conditioning` (generated) or `conditioning_data` "
                f"(an existing conditioning backend), not both"
            )
        if len(backend.conditioning) > 1:
            raise ConfigError(
                f"{where}: `conditioning` lists {len(backend.conditioning)} entries; a backend "
                "pairs with one conditioning dataset, so keep one"
            )
        spec = backend.conditioning[0]
        detector_params, runner_params = _split_params(spec.params)
        try:
            resolved = resolve_params(spec.type, detector_params)
        except ConfigError as exc:
            raise ConfigError(f"{where}: conditioning: {exc}") from None
        digest = params_hash(spec.type, resolved)
        folder = cache_root / backend.id / f"{spec.type}-{digest}"
        log.info("%s: making %s conditioning in %s", where, spec.type, folder)
        try:
            report = run_batch(
                spec.type,
                resolved,
                backend.instance_data_dir,
                folder,
                workers=workers,
                annotator_path=runner_params.get("annotator_path"),
                device=device,
                progress=progress,
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: conditioning: {exc}") from None
        if report.failed:
            names = "; ".join(f"{f.path}: {f.error}" for f in report.failed)
            raise ConfigError(
                f"{where}: conditioning '{spec.type}' could not be made for "
                f"{len(report.failed)} image(s) in {backend.instance_data_dir}: {names}"
            )
        log.info("%s", report.summary())

        cond_id = f"{backend.id}-{spec.type}"
        if cond_id in ids:
            cond_id = f"{cond_id}-{digest}"
        if cond_id in ids:
            raise ConfigError(f"{where}: cannot derive a free id for its conditioning backend")
        ids.add(cond_id)
        # The copy is resolved: it names its conditioning backend and asks for nothing inline.
        result.append(
            backend.model_copy(update={"conditioning_data": cond_id, "conditioning": None})
        )
        result.append(
            BackendConfig(
                id=cond_id,
                dataset_type="conditioning",
                instance_data_dir=str(folder.resolve()),
                resolution=backend.resolution,
            )
        )
    return result
