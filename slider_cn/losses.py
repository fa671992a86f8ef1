"""The denoising loss of every training forward (`loss_type`, `huber_c`, `huber_schedule`).

SimpleTuner's choices, with its formulas (those of diffusers' and kohya's training scripts):

- ``l2``: the mean squared error;
- ``huber``: the pseudo-Huber loss ``2 c (sqrt(d^2 + c^2) - c)``: about ``d^2`` for ``|d| << c``
  and ``2 c |d|`` beyond, so outlying errors pull less;
- ``smooth_l1``: ``2 (sqrt(d^2 + c^2) - c)``, the same curve divided by ``c`` (about ``|d|``
  far from zero).

The threshold ``c`` per sample follows ``huber_schedule``: ``constant`` (``huber_c``),
``exponential`` (``huber_c ** (t / T)``: 1 at t = 0 down to ``huber_c`` at the last timestep) or
``snr`` (SimpleTuner's default: ``(1 - huber_c) / (1 + r)^2 + huber_c``, with ``r`` the noise
level over the signal level of the noisy input, sqrt((1 - alpha_bar) / alpha_bar) for DDPM
families and sigma / (1 - sigma) for flow matching; the family gives ``r``).

Per-element weights (flow_loss_weighting) multiply the element losses before the mean, for
every loss type. Families call :func:`denoising_loss` from their ``loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def huber_threshold(
    schedule: str,
    huber_c: float,
    timesteps: torch.Tensor,
    *,
    num_train_timesteps: int,
    noise_ratio: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The threshold ``c`` of each sample, shape (B,), float32 (see the module docstring)."""
    t = timesteps.detach().float().reshape(-1)
    if schedule == "constant":
        return torch.full_like(t, float(huber_c))
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / num_train_timesteps)
    if schedule == "snr":
        r = noise_ratio().detach().float().reshape(-1).to(t.device)
        return (1.0 - huber_c) / (1.0 + r) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}; known: {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_type: str,
    huber_c: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The loss of every element (fp32), before weighting and the mean."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a threshold huber_c")
    c = torch.as_tensor(huber_c, dtype=torch.float32, device=diff.device)
    if c.ndim:  # one threshold per sample: broadcast over the sample's elements
        c = c.reshape(-1, *([1] * (diff.ndim - 1)))
    if loss_type == "huber":
        return 2.0 * c * (torch.sqrt(diff**2 + c**2) - c)
    if loss_type == "smooth_l1":
        return 2.0 * (torch.sqrt(diff**2 + c**2) - c)
    raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")


def denoising_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean loss of one forward: ``loss_type`` per element, times ``weights`` if given."""
    if loss_type == "l2" and weights is None:
        # exactly the plain MSE (runs before loss_type existed reproduce bit for bit)
        return F.mse_loss(prediction.float(), target.float())
    if loss_type == "l2":
        return (weights * (prediction.float() - target.float()) ** 2).mean()
    loss = elementwise_loss(prediction, target, loss_type, huber_c)
    return (loss if weights is None else weights * loss).mean()
