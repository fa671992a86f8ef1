"""An exponential moving average of the slider's trainable weights (`use_ema`).

After every optimizer step (every ``ema_update_interval`` steps when set), each shadow weight
moves toward the live one: ``shadow = d * shadow + (1 - d) * weight``, with the decay of
diffusers' EMAModel (which SimpleTuner's EMA follows): ``d = min(ema_decay, (1 + n) / (10 + n))``
at the n-th update counted from 0, so the first update copies the weights and early ones follow
them closely. The shadow is fp32, on the weights' device; checkpoints save it with the update
count (resume is exact), and the end of a run writes it beside the slider in the same formats
(slider_cn/outputs.py, ``*_ema`` names), by swapping it into the live weights for the write.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def ema_decay_at(update: int, decay: float) -> float:
    """The decay of the ``update``-th update (0-based): 0 for the first (a copy)."""
    if update <= 0:
        return 0.0
    return min(decay, (1.0 + update) / (10.0 + update))


class SliderEMA:
    """The EMA of a Trainables' weights (``trainables.state_dict()`` keys)."""

    def __init__(self, trainables, decay: float, update_interval: int | None = None):
        self.trainables = trainables
        self.decay = float(decay)
        self.update_interval = update_interval or 1
        self.updates = 0  # how many updates the shadow has had
        self.shadow = {
            key: value.detach().float().clone() for key, value in trainables.state_dict().items()
        }

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """After optimizer step ``global_step`` (1-based): update when it is due."""
        if global_step % self.update_interval:
            return
        d = ema_decay_at(self.updates, self.decay)
        for key, value in self.trainables.state_dict().items():
            shadow = self.shadow[key]
            shadow.mul_(d).add_(value.detach().float().to(shadow.device), alpha=1.0 - d)
        self.updates += 1

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The shadow weights and their metadata (update count, decay), for a checkpoint."""
        return (
            {k: v.detach().cpu().contiguous() for k, v in self.shadow.items()},
            {"updates": str(self.updates), "decay": repr(self.decay)},
        )

    def load_state_dict(self, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        missing = sorted(set(self.shadow) - set(weights))
        unexpected = sorted(set(weights) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA weights do not fit this run: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for key, value in weights.items():
            self.shadow[key].copy_(value.float())
        self.updates = int(metadata.get("updates", 0))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The shadow weights in the live ones for the duration (outputs are written through
        the live adapter); the trained weights are back afterwards, bit for bit."""
        live = {k: v.detach().clone() for k, v in self.trainables.state_dict().items()}
        self.trainables.load_state_dict(
            {k: self.shadow[k].to(live[k].device, live[k].dtype) for k in live}
        )
        try:
            yield
        finally:
            self.trainables.load_state_dict(live)
