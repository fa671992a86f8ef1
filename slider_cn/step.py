"""The slider training step (docs/design.md §5): one micro-batch in, one loss out.

- Positive / negative batch with strength s: the slider's multiplier is s for this forward
  (only the slider: assistant adapters keep theirs), the loss is the family's plain denoising
  loss, and the multiplier is restored afterwards.
- Neutral batch, `preserve`: the slider at ±max|s| must reproduce the prediction with the
  slider off on the same noisy input (one extra no-grad forward). `regular`: plain loss at 1.0.
- LoRA-only mode with a ControlNet: its residuals are computed once, without grad, and reused
  by every denoiser forward of the micro-batch. ControlNet mode: the ControlNet runs with grad.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slider_cn.families.base import Components, ModelFamily


@dataclass
class StepInputs:
    """One micro-batch after encoding."""

    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    slider_strength: float
    sign: str  # "+", "-" or "0"
    conditioning_pixels: torch.Tensor | None = None


@dataclass
class StepResult:
    loss: torch.Tensor
    strength: float  # the multiplier the slider had in the graded forward


class SliderStep:
    def __init__(
        self,
        family: ModelFamily,
        components: Components,
        adapter: Any,
        *,
        training_mode: str,
        neutral_mode: str,
        max_strength: float,
        conditioning_scale: float = 1.0,
    ):
        self.family = family
        self.components = components
        self.adapter = adapter
        self.training_mode = training_mode
        self.neutral_mode = neutral_mode
        self.max_strength = max_strength
        self.conditioning_scale = conditioning_scale

    def _uses_controlnet(self, inputs: StepInputs) -> bool:
        return self.components.controlnet is not None and inputs.conditioning_pixels is not None

    def _forward(self, inputs: StepInputs, noisy, timesteps, frozen_residuals) -> torch.Tensor:
        residuals = frozen_residuals
        if (
            residuals is None
            and self.training_mode == "controlnet"
            and self._uses_controlnet(inputs)
        ):
            residuals = self.family.controlnet_residuals(
                self.components,
                noisy,
                timesteps,
                inputs.cond,
                inputs.conditioning_pixels,
                self.conditioning_scale,
            )
        return self.family.predict(self.components, noisy, timesteps, inputs.cond, residuals)

    def __call__(
        self,
        inputs: StepInputs,
        generator: torch.Generator,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> StepResult:
        """Compute the loss; with ``backward`` also run it, inside the multiplier's scope.

        The backward pass must see the same multiplier as the forward: with gradient
        checkpointing the forward is recomputed during backward, and a multiplier restored too
        early would silently give the gradients of another strength.
        """
        family, components = self.family, self.components
        noisy, noise, timesteps = family.add_noise(components, inputs.latents, generator)
        target = family.training_target(components, inputs.latents, noise, timesteps)

        frozen_residuals = None
        if self.training_mode == "lora" and self._uses_controlnet(inputs):
            # The frozen ControlNet does not depend on the slider: one no-grad pass serves every
            # denoiser forward of this micro-batch.
            with torch.no_grad():
                frozen_residuals = family.controlnet_residuals(
                    components,
                    noisy,
                    timesteps,
                    inputs.cond,
                    inputs.conditioning_pixels,
                    self.conditioning_scale,
                )

        if inputs.sign == "0" and self.neutral_mode == "preserve":
            # Pull the slider toward "no change" on neutral content at either end of its range.
            flip = torch.randint(0, 2, (1,), generator=generator).item()
            strength = self.max_strength if flip else -self.max_strength
            with torch.no_grad(), self.adapter.switched_off():
                target = self._forward(inputs, noisy, timesteps, frozen_residuals)
        elif inputs.sign == "0":
            strength = 1.0
        else:
            strength = inputs.slider_strength

        with self.adapter.multiplier(strength):
            prediction = self._forward(inputs, noisy, timesteps, frozen_residuals)
            loss = family.loss(components, prediction, target, timesteps)
            if backward is not None:
                backward(loss)
        return StepResult(loss=loss.detach(), strength=strength)
