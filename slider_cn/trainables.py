"""What a slider run trains, as one object: the slider adapter, and in ControlNet mode on a
fresh ControlNet also its output projections, trained in full (docs/design.md §8.1: they start
at zero, and unless they learn the residuals stay zero and no gradient reaches the adapter).

`state_dict()` is what a checkpoint's `trainable.safetensors` holds: the adapter's weights as
``adapter.<key>`` and every projection parameter as ``projection.<layer name>.<parameter>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

ADAPTER_PREFIX = "adapter."
PROJECTION_PREFIX = "projection."


class Trainables:
    """The slider ``adapter`` attached to ``model``, plus the layers of ``model`` named in
    ``projection_names``, whose parameters are made trainable here.

    ``model`` is the module the adapter sits on (not a DDP wrapper of it: the layers are the
    same objects either way)."""

    def __init__(self, adapter, model: nn.Module, projection_names: Sequence[str] = ()) -> None:
        self.adapter = adapter
        self.model = model
        self.projection_names = list(projection_names)
        for p in self._projection_parameters():
            p.requires_grad_(True)

    def _projections(self) -> dict[str, nn.Module]:
        modules = dict(self.model.named_modules())
        return {name: modules[name] for name in self.projection_names}

    def _projection_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self._projections().values() for p in layer.parameters()]

    def parameters(self) -> list[nn.Parameter]:
        """The adapter's trainable parameters, then each projection's, in a fixed order (the
        optimizer state of a checkpoint follows it)."""
        return list(self.adapter.trainable_parameters()) + self._projection_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live weights (sharing storage, as ``nn.Module.state_dict``), keyed as checkpoints
        store them."""
        weights = {ADAPTER_PREFIX + k: v for k, v in self.adapter.state_dict().items()}
        for name, pname, p in self._named_projections():
            weights[f"{PROJECTION_PREFIX}{name}.{pname}"] = p
        return weights

    def load_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy ``weights`` (as `state_dict` keys them) into the live weights. A missing key
        raises KeyError; a key that fits nothing here raises ValueError (the adapter checks its
        own keys)."""
        adapter = {
            k.removeprefix(ADAPTER_PREFIX): v
            for k, v in weights.items()
            if k.startswith(ADAPTER_PREFIX)
        }
        own = {f"{PROJECTION_PREFIX}{name}.{pname}" for name, pname, _ in self._named_projections()}
        unexpected = sorted(k for k in weights if not k.startswith(ADAPTER_PREFIX) and k not in own)
        if unexpected:
            raise ValueError(
                f"trainable weights do not fit this run: unexpected {unexpected[:3]}"
                + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
            )
        self.adapter.load_state_dict(adapter)
        with torch.no_grad():
            for name, pname, p in self._named_projections():
                p.copy_(weights[f"{PROJECTION_PREFIX}{name}.{pname}"])

    def _named_projections(self):
        for name, layer in self._projections().items():
            for pname, p in layer.named_parameters():
                yield name, pname, p
