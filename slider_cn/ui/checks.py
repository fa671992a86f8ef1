"""What the UI asks of a config before a run: is it valid (in the CLI's words), do its paths stay
in the workspace, which modules will the slider touch, and which batches come first.

Validation goes through the CLI's own loaders (`load_config`, `load_backend_configs`) on the
form's values written to a temporary file beside the config being edited, so relative paths
resolve exactly as they will for `slider-cn train --config FILE`, and every message is the one
the CLI prints (the temporary file's name replaced by the config's). Messages are then sorted
onto the fields they name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slider_cn.config import (
    BUILTIN_MODEL_NAMES,
    KNOWN_KEYS,
    MODEL_KEYS,
    PATH_KEYS,
    TrainConfig,
    load_config,
)
from slider_cn.data.config import BACKEND_KEYS, BackendConfig, load_backend_configs
from slider_cn.errors import ConfigError
from slider_cn.ui.workspace import Workspace

_KEY = re.compile(r"key '([^']+)'")
_BACKEND_INDEX = re.compile(r"backend #(\d+)")
_BACKEND_ID = re.compile(r"backend '([^']+)'")


@dataclass
class Problems:
    """Error lines sorted onto what they name: config keys, dataloader backends, or neither."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    backends: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    general: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fields or self.backends or self.general)

    @property
    def lines(self) -> list[str]:
        out = list(self.general)
        out += [line for lines in self.fields.values() for line in lines]
        out += [line for keys in self.backends.values() for v in keys.values() for line in v]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "fields": self.fields,
            "backends": {str(k): v for k, v in self.backends.items()},
            "general": self.general,
            "message": "\n".join(self.lines),
        }


class CheckFailed(Exception):
    """A config, dataloader or plan the CLI would refuse (HTTP 422), or one whose paths leave
    the workspace (HTTP 403)."""

    def __init__(self, problems: Problems, status: int = 422):
        super().__init__(problems.to_json()["message"])
        self.problems = problems
        self.status = status


def config_problems(message: str) -> Problems:
    """Sort the lines of a config ConfigError onto their keys (unknown keys stay general)."""
    problems = Problems()
    for line in message.splitlines():
        match = _KEY.search(line)
        key = match.group(1).split(".")[0] if match else None
        if key in KNOWN_KEYS and "unknown key" not in line:
            problems.fields.setdefault(key, []).append(line)
        else:
            problems.general.append(line)
    return problems


def backend_problems(message: str, backends: list[Any]) -> Problems:
    """Sort the lines of a dataloader ConfigError onto backends (by index or id) and keys."""
    ids = [b.get("id") if isinstance(b, dict) else None for b in backends]
    problems = Problems()
    for line in message.splitlines():
        index = None
        if match := _BACKEND_INDEX.search(line):
            index = int(match.group(1))
        elif (match := _BACKEND_ID.search(line)) and match.group(1) in ids:
            index = ids.index(match.group(1))
        if index is None:
            problems.general.append(line)
            continue
        key_match = _KEY.search(line)
        key = key_match.group(1).split(".")[0] if key_match else None
        if key is None:
            rest = line.split("): ", 1)[-1] if "): " in line else line.split("': ", 1)[-1]
            key = next((k for k in BACKEND_KEYS if rest.startswith(k)), "_")
            key = next((k for k in BACKEND_KEYS if f"{k} " in rest), key)
        problems.backends.setdefault(index, {}).setdefault(key, []).append(line)
    return problems


def _with_temporary_json(folder: Path, values: Any, use):
    """Write ``values`` to a hidden temporary JSON file in ``folder``, call ``use(path)``, and
    remove the file again."""
    if not folder.is_dir():
        raise CheckFailed(Problems(general=[f"folder not found: {folder}"]))
    handle, name = tempfile.mkstemp(prefix=".slider-cn-ui-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(values, out, indent=2)
        return use(Path(name))
    finally:
        Path(name).unlink(missing_ok=True)


def check_config(ws: Workspace, config_path: str, values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig the CLI would build from ``values`` saved as ``config_path``; raises
    CheckFailed with the CLI's messages sorted onto keys."""
    target = ws.resolve(config_path)
    if not isinstance(values, dict):
        raise CheckFailed(
            Problems(general=["the config must be a JSON object of key: value pairs"])
        )

    def load(path: Path) -> TrainConfig:
        try:
            return load_config(path)
        except ConfigError as exc:
            raise CheckFailed(config_problems(str(exc).replace(str(path), config_path))) from None

    return _with_temporary_json(target.parent, values, load)


def check_dataloader(ws: Workspace, path: str, backends: list[Any]) -> list[BackendConfig]:
    """The backends the CLI would read from ``backends`` saved as ``path``; raises CheckFailed
    with the CLI's messages sorted onto backends and keys."""
    target = ws.resolve(path)

    def load(tmp: Path) -> list[BackendConfig]:
        try:
            return load_backend_configs(tmp)
        except ConfigError as exc:
            message = str(exc).replace(str(tmp), path)
            raise CheckFailed(backend_problems(message, backends)) from None

    loaded = _with_temporary_json(target.parent, backends, load)
    outside = Problems()
    for index, backend in enumerate(loaded):
        if not ws.contains(backend.instance_data_dir):
            outside.backends.setdefault(index, {})["instance_data_dir"] = [
                f"{path}: backend '{backend.id}': instance_data_dir {backend.instance_data_dir} "
                f"is outside the workspace {ws.root}"
            ]
    if outside:
        raise CheckFailed(outside, status=403)
    return loaded


def confine_config(ws: Workspace, config: TrainConfig, source: str) -> None:
    """Refuse (HTTP 403) a config whose files or folders lie outside the workspace: the UI reads
    and writes only there. Hub ids and built-in model names are not paths."""
    problems = Problems()

    def refuse(key: str, value: str) -> None:
        problems.fields.setdefault(key, []).append(
            f"{source}: key '{key}': {value} is outside the workspace {ws.root}"
        )

    for key in PATH_KEYS:
        value = getattr(config, key)
        if isinstance(value, str) and value and not ws.contains(value):
            refuse(key, value)
    for key in MODEL_KEYS:
        value = getattr(config, key)
        if (
            isinstance(value, str)
            and value not in BUILTIN_MODEL_NAMES
            and Path(value).is_absolute()
            and Path(value).exists()
            and not ws.contains(value)
        ):
            refuse(key, value)
    resume = config.resume_from_checkpoint
    if resume and resume != "latest" and not ws.contains(resume):
        refuse("resume_from_checkpoint", resume)
    if problems:
        raise CheckFailed(problems, status=403)
    if config.data_backend_config and Path(config.data_backend_config).is_file():
        try:
            backends = load_backend_configs(config.data_backend_config)
        except ConfigError:
            return  # the plan and the run report it in the CLI's words
        for backend in backends:
            if not ws.contains(backend.instance_data_dir):
                refuse_line = (
                    f"{ws.relative(config.data_backend_config)}: backend '{backend.id}': "
                    f"instance_data_dir {backend.instance_data_dir} is outside the workspace "
                    f"{ws.root}"
                )
                problems.fields.setdefault("data_backend_config", []).append(refuse_line)
        if problems:
            raise CheckFailed(problems, status=403)


# --- targets -----------------------------------------------------------------------------

_TARGET_CACHE: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
_TARGET_LOCK = threading.Lock()  # one model in memory at a time


def targets(config: TrainConfig, side: str | None = None) -> dict[str, Any]:
    """`slider-cn targets --json` for this config (under ``report``), with the summary lines,
    every adapted module and what was left out. Reports are kept for the last few models."""
    from slider_cn.targets_report import build_report

    key = (
        config.model_family,
        config.pretrained_model_name_or_path,
        config.controlnet_model_name_or_path,
        config.training_mode,
        config.slider_lora_target,
        side,
    )
    with _TARGET_LOCK:
        if key in _TARGET_CACHE:
            _TARGET_CACHE.move_to_end(key)
            return _TARGET_CACHE[key]
        try:
            report = build_report(config, side=side)
        except ConfigError as exc:
            raise CheckFailed(config_problems(str(exc))) from None
        res = report.resolution
        result = {
            "report": json.loads(report.to_json()),
            "summary": report.summary(),
            "modules": [
                {
                    "name": m.name,
                    "layer_type": m.layer_type,
                    "shape": list(m.shape),
                    "pattern": m.pattern,
                }
                for m in res.modules
            ],
            "unmatched_patterns": list(res.unmatched_patterns),
            "skipped": dict(res.skipped),
        }
        _TARGET_CACHE[key] = result
        while len(_TARGET_CACHE) > 8:
            _TARGET_CACHE.popitem(last=False)
        return result


# --- plan --------------------------------------------------------------------------------


def plan(ws: Workspace, config: TrainConfig, count: int) -> dict[str, Any]:
    """`slider-cn train --plan N` for this config (under ``lines``, the CLI's JSON lines), with
    each micro-batch's image / conditioning pairs as workspace paths for thumbnails."""
    from slider_cn.data.backends import build_backends
    from slider_cn.data.sampler import SliderSampler, preview

    try:
        backends = build_backends(config)
        sampler = SliderSampler(backends, config.train_batch_size, config.seed)
        plans = list(preview(sampler, count))
    except ConfigError as exc:
        raise CheckFailed(Problems(general=str(exc).splitlines())) from None

    def rel(path: Path | None) -> str | None:
        return ws.relative(path) if path is not None and ws.contains(path) else None

    return {
        "summary": f"{len(backends)} training backends, {len(sampler)} micro-batches per epoch "
        f"of {config.train_batch_size} samples",
        "micro_batches_per_epoch": len(sampler),
        "lines": [p.to_json() for p in plans],
        "pairs": [
            [{"image": rel(s.path), "conditioning": rel(s.conditioning)} for s in p.samples]
            for p in plans
        ],
    }
