"""Training checkpoints: written atomically, pruned, found again on resume.

A checkpoint folder `checkpoint-<step>` holds the trainable weights (safetensors; with
`use_ema` also their EMA, `ema.safetensors`), the optimizer and lr-scheduler states, the sampler state, the RNG states and the step. It is
written under a temporary name and renamed, so a crash never leaves a half checkpoint that
`latest` would pick up. Everything is loaded with safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slider_cn.errors import ConfigError

PREFIX = "checkpoint-"
EMA_FILE = "ema.safetensors"  # the EMA of trainable.safetensors (`use_ema`)
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainingState:
    """What a checkpoint gives back besides what `load_checkpoint` restores in place (the
    optimizer, the scheduler and the RNG states). The epoch it was saved in is in state.json too,
    but the sampler state holds the position to resume from."""

    step: int
    weights: dict[str, torch.Tensor]
    sampler: dict[str, Any]
    extra: dict[str, Any]
    # the EMA of the weights and its metadata (`use_ema`), when the checkpoint holds one
    ema: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def rank_rng_state(noise_generator: torch.Generator) -> dict[str, Any]:
    """One rank's random state, to be gathered on the main rank and saved with the others.

    Bytes and numpy arrays rather than tensors: all_gather_object unpickles tensors through
    torch's legacy loader, which fails on this torch."""
    states = _rng_states()

    def raw(tensor: torch.Tensor) -> bytes:
        return tensor.numpy().tobytes()

    return {
        "torch": raw(states["torch"]),
        "numpy": states["numpy"],
        "python": states["python"],
        "cuda": [raw(s) for s in states.get("cuda", [])],
        "noise_generator": raw(noise_generator.get_state()),
    }


def _saved_rank_state(state: dict[str, Any]) -> dict[str, Any]:
    """`rank_rng_state` in the layout of rng.pt (tensors, as torch.load(weights_only) reads)."""

    def tensor(raw: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    saved = {
        "torch": tensor(state["torch"]),
        "numpy": _np_state_to_plain(state["numpy"]),
        "python": state["python"],
        "noise_generator": tensor(state["noise_generator"]),
    }
    if state["cuda"]:
        saved["cuda"] = [tensor(raw) for raw in state["cuda"]]
    return saved


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _np_state_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    # numpy's generator state holds numpy arrays; torch.load(weights_only=True) takes tensors.
    inner = state["state"]
    return {
        **state,
        "state": {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inner.items()
        },
    }


def _np_state_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    inner = state["state"]
    return {
        **state,
        "state": {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in inner.items()},
    }


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    epoch: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    sampler_state: dict[str, Any],
    noise_generator: torch.Generator,
    extra: dict[str, Any] | None = None,
    total_limit: int | None = None,
    rank_states: list[dict[str, Any]] | None = None,
    ema: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically and prune the oldest beyond ``total_limit``.

    ``rank_states`` (`rank_rng_state` of every rank, in rank order) makes a multi-process run
    resume with each rank's own noise; without it every rank resumes from the main one's."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".{PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in weights.items()},
        str(tmp / "trainable.safetensors"),
    )
    if ema is not None:
        save_file(ema[0], str(tmp / EMA_FILE), metadata=ema[1])
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    rng = _rng_states()
    rng["numpy"] = _np_state_to_plain(rng["numpy"])
    rng["noise_generator"] = noise_generator.get_state()
    if rank_states is not None:
        rng["ranks"] = [_saved_rank_state(state) for state in rank_states]
    torch.save(rng, tmp / "rng.pt")
    state = {"step": step, "epoch": epoch, "sampler": sampler_state, "extra": extra or {}}
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def find_checkpoint(output_dir: str | Path, which: str) -> Path:
    """`latest` -> the newest complete checkpoint in ``output_dir``; else the folder given."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(
                f"resume_from_checkpoint 'latest': no checkpoint-<step> folder in {output_dir}"
            )
        return found[-1]
    path = Path(which)
    if not (path / "state.json").is_file():
        raise ConfigError(
            f"resume_from_checkpoint: {path} is not a slider-cn checkpoint (no state.json)"
        )
    return path


def load_checkpoint(
    path: str | Path,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    noise_generator: torch.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingState:
    """Restore optimizer, scheduler and RNG states in place (``rank``'s own when the checkpoint
    holds every rank's); return the rest."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    ranks = rng.pop("ranks", None)
    if ranks is not None and len(ranks) == world_size:
        rng = ranks[rank]
    rng["numpy"] = _np_state_from_plain(rng["numpy"])
    noise_generator.set_state(rng.pop("noise_generator"))
    _set_rng_states(rng)
    return TrainingState(
        step=state["step"],
        weights=load_file(str(path / "trainable.safetensors")),
        sampler=state["sampler"],
        extra=state.get("extra", {}),
        ema=_load_ema(path / EMA_FILE),
    )


def _load_ema(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata
