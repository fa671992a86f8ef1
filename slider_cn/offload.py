"""`offload_text_encoders`: text encoders in CPU memory, on the GPU only while they encode.

Training itself never runs the text encoders: every caption is encoded once into the text cache
(slider_cn/data/cache.py) and read from there. They are needed only for cache misses (the first
time a caption or a text slider's prompt is seen) and for validation images. So with this
option they stay in CPU memory, and `onloaded` moves them to the training device for exactly
those calls and back after: on a 24 GB card that is the difference between a Flux run that fits
(T5-XXL alone is 9.5 GB in bf16) and one that does not. The VAE stays on the device (it is
small, and flow-family ControlNets encode their conditioning images with it every step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

OFFLOAD_DEVICE = torch.device("cpu")


class TextEncoderPlacement:
    """Where the text encoders live between uses, and the scope in which they are onloaded.

    Disabled, ``onloaded()`` does nothing (the encoders live on the device). Nested scopes move
    the encoders once.
    """

    def __init__(
        self, encoders: Sequence[nn.Module], device: torch.device | str, *, enabled: bool
    ) -> None:
        self.encoders = list(encoders)
        self.device = torch.device(device)
        self.enabled = enabled
        self.depth = 0
        self.onloads = 0  # how many times the encoders went to the device (for tests and logs)

    def park(self) -> None:
        """Put the encoders where they live between uses."""
        if self.enabled:
            for encoder in self.encoders:
                encoder.to(OFFLOAD_DEVICE)

    @contextlib.contextmanager
    def onloaded(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.depth == 0:
            self.onloads += 1
            for encoder in self.encoders:
                encoder.to(self.device)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.park()
