"""The text-slider step (docs/design.md §5.4): a prompt micro-batch in, one loss out.

No training image: the frozen model makes its own x_t, and its own guidance difference is the
signal (Concept Sliders' text sliders).

1. x_T is pure noise; the frozen model (slider off) denoises it on the target prompt for a
   random number k of the entry's ``denoising_steps`` deterministic sampler steps
   (1 <= k < steps), which gives x_t at the k-th level of that schedule.
2. The frozen predictions for target, positive and negative at x_t, in one batched forward
   (no grad, slider off).
3. The adapted prediction on the *target* prompt only, at multiplier s, is trained toward
   eps(target) + sign(s) * action * eta * (eps(positive) - eps(negative)): the slider never
   sees the positive or negative prompt as an input; it must learn the direction itself.

A neutral (anchor) micro-batch draws x_t the same way on its anchor prompts and follows the
`preserve` rule: the slider at ±max|s| must reproduce the frozen prediction.

With a ControlNet and a conditioning image, every forward gets the ControlNet's residuals for
it, the partial denoising included. LoRA-only mode: the ControlNet is frozen, and the residuals
of the batched frozen forward are reused (their target part) by the adapted forward.
ControlNet mode: the slider is on the ControlNet, which is switched off for the frozen forwards
and runs with grad at multiplier s for the adapted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slider_cn.data.prompts import PromptTask
from slider_cn.families.base import Components, ModelFamily
from slider_cn.step import StepResult


@dataclass
class TextStepInputs:
    """One prompt micro-batch after encoding.

    ``cond`` holds, batch-first, the target, positive and negative prompts (3B rows, in that
    order) for a pair task, or the B anchor prompts for a neutral task.
    """

    task: PromptTask
    cond: dict[str, torch.Tensor]
    batch_size: int
    resolution: int
    slider_strength: float
    conditioning_pixels: torch.Tensor | None = None


def rows(value: Any, start: int, stop: int, total: int) -> Any:
    """Rows ``start:stop`` of every batch-first tensor in a (nested) residuals structure;
    anything that is not a batch of ``total`` rows (flags, scales) is kept as it is."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.ndim and value.shape[0] == total else value
    if isinstance(value, dict):
        return {k: rows(v, start, stop, total) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(rows(v, start, stop, total) for v in value)
    return value


def repeat_rows(tensor: torch.Tensor, times: int) -> torch.Tensor:
    return tensor.repeat(times, *([1] * (tensor.ndim - 1)))


@dataclass
class TextStepResult(StepResult):
    denoising_steps: int = 0  # k: the sampler steps run to reach x_t


class TextSliderStep:
    def __init__(
        self,
        family: ModelFamily,
        components: Components,
        adapter: Any,
        *,
        training_mode: str,
        max_strength: float,
        conditioning_scale: float = 1.0,
    ):
        self.family = family
        self.components = components
        self.adapter = adapter
        self.training_mode = training_mode
        self.max_strength = max_strength
        self.conditioning_scale = conditioning_scale

    def _residuals(self, noisy, timesteps, cond, pixels) -> dict[str, Any] | None:
        if pixels is None or self.components.controlnet is None:
            return None
        return self.family.controlnet_residuals(
            self.components, noisy, timesteps, cond, pixels, self.conditioning_scale
        )

    def _frozen(self, noisy, timesteps, cond, pixels):
        """A prediction of the model without the slider; returns it and its residuals."""
        residuals = self._residuals(noisy, timesteps, cond, pixels)
        prediction = self.family.predict(self.components, noisy, timesteps, cond, residuals)
        return prediction, residuals

    @torch.no_grad()
    def sample_xt(
        self,
        cond: dict[str, torch.Tensor],
        pixels: torch.Tensor | None,
        batch: int,
        resolution: int,
        steps: int,
        generator: torch.Generator,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x_t after k frozen sampler steps from pure noise; returns (x_t, its timesteps, k)."""
        family, components = self.family, self.components
        device = next(components.denoiser.parameters()).device
        noisy = family.initial_noise(components, batch, resolution, generator).to(device, dtype)
        grid = family.sampling_timesteps(components, steps, noisy)
        k = int(torch.randint(1, steps, (1,), generator=generator).item())
        with self.adapter.switched_off():
            for i in range(k):
                now = grid[i].expand(batch)
                prediction, _ = self._frozen(noisy, now, cond, pixels)
                noisy = family.denoise_step(
                    components, noisy, now, grid[i + 1].expand(batch), prediction
                )
        return noisy, grid[k].expand(batch), k

    def __call__(
        self,
        inputs: TextStepInputs,
        generator: torch.Generator,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> TextStepResult:
        """Compute the loss; with ``backward`` also run it inside the multiplier's scope (as
        SliderStep does, so that recomputed checkpointed forwards see the same multiplier)."""
        family, components, task = self.family, self.components, inputs.task
        b = inputs.batch_size
        dtype = next(iter(inputs.cond.values())).dtype
        pixels = inputs.conditioning_pixels
        target_cond = {k: v[:b] for k, v in inputs.cond.items()}
        noisy, timesteps, k = self.sample_xt(
            target_cond, pixels, b, inputs.resolution, task.denoising_steps, generator, dtype
        )

        with torch.no_grad(), self.adapter.switched_off():
            if task.kind == "pair":
                # target, positive and negative in one forward
                prediction, residuals = self._frozen(
                    repeat_rows(noisy, 3),
                    repeat_rows(timesteps, 3),
                    inputs.cond,
                    None if pixels is None else repeat_rows(pixels, 3),
                )
                eps_target, eps_positive, eps_negative = prediction.float().chunk(3)
                sign = 1.0 if inputs.slider_strength > 0 else -1.0
                direction = eps_positive - eps_negative
                target = eps_target + sign * task.action_sign * task.guidance_scale * direction
                residuals = rows(residuals, 0, b, 3 * b)
            else:
                target, residuals = self._frozen(noisy, timesteps, target_cond, pixels)

        if task.kind == "pair":
            strength = inputs.slider_strength
        else:
            # the anchors must not move at either end of the slider's range
            flip = torch.randint(0, 2, (1,), generator=generator).item()
            strength = self.max_strength if flip else -self.max_strength
        if self.training_mode == "controlnet":
            residuals = None  # the slider is on the ControlNet: run it again, with grad
        with self.adapter.multiplier(strength):
            if residuals is None:
                residuals = self._residuals(noisy, timesteps, target_cond, pixels)
            prediction = family.predict(components, noisy, timesteps, target_cond, residuals)
            loss = family.loss(components, prediction, target, timesteps)
            if backward is not None:
                backward(loss)
        return TextStepResult(loss=loss.detach(), strength=strength, denoising_steps=k)
