"""What every slider adapter is: a multiplier that is the slider strength, and its own weights.

``SliderAdapter`` is the interface the training step, validation and outputs use; ``peft.py``
and ``lycoris.py`` implement it. The adapter names are shared with the assistant adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

SLIDER_ADAPTER = "slider"
ASSISTANT_ADAPTER = "assistant"


class SliderAdapter:
    """The trainable slider adapter on a model; its multiplier is the slider strength.

    ``kind`` is "peft" or "lycoris"; ``algo`` the method ("lora", "lokr", "full", ...);
    ``rank`` / ``alpha`` the linear rank and alpha (None for ``full``); ``target_names`` the
    adapted modules, as the base model names them.
    """

    kind: str = ""
    adapter_name = SLIDER_ADAPTER

    def __init__(
        self,
        model: nn.Module,
        target_names: list[str],
        algo: str,
        rank: int | None,
        alpha: float | None,
    ) -> None:
        self.model = model
        self.target_names = list(target_names)
        self.algo = algo
        self.rank = rank
        self.alpha = alpha
        self._multiplier = 1.0

    # scale control -----------------------------------------------------------------------
    def get_multiplier(self) -> float:
        return self._multiplier

    def set_multiplier(self, s: float) -> None:
        """Scale the slider's contribution by ``s`` (its trained scale times ``s``)."""
        self._apply_multiplier(float(s))
        self._multiplier = float(s)

    @contextlib.contextmanager
    def multiplier(self, s: float) -> Iterator[SliderAdapter]:
        """Run a block at multiplier ``s``; the previous scale comes back bit-exactly."""
        saved = self._save_scales()
        previous = self._multiplier
        try:
            self.set_multiplier(s)
            yield self
        finally:
            self._restore_scales(saved)
            self._multiplier = previous

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[SliderAdapter]:
        """Run a block as if the slider were absent: multiplier 0, and where the adapter
        library allows, its layers not computed at all (the frozen-base prediction of a
        neutral `preserve` step then costs what a forward without the slider costs)."""
        with self.multiplier(0.0), self._skipped():
            yield self

    def _skipped(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def _apply_multiplier(self, s: float) -> None:
        raise NotImplementedError

    def _save_scales(self) -> list[float]:
        raise NotImplementedError

    def _restore_scales(self, saved: list[float]) -> None:
        raise NotImplementedError

    # weights -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slider's weights only (no base weights, no assistant), for checkpoints.

        Like ``nn.Module.state_dict`` the tensors share storage with the live weights.
        """
        raise NotImplementedError

    def to(self, *args, **kwargs) -> SliderAdapter:
        """Move weights that live outside the model (LyCORIS); PEFT weights move with it."""
        return self

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _check_keys(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        given = set(state_dict)
        if expected != given:
            missing = sorted(expected - given)[:5]
            unexpected = sorted(given - expected)[:5]
            raise ValueError(
                f"slider state dict does not fit this {self.kind} adapter: missing {missing}, "
                f"unexpected {unexpected}"
            )
