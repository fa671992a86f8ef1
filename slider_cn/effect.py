"""A one-number check that a slider slides.

For the same noisy input and timestep, the clean latent the denoiser implies at multiplier +1
minus the one at -1 should point from the negative examples to the positive ones. The figure is
the cosine between that difference and (mean positive latent - mean negative latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def slider_effect_cosine(
    family,
    components,
    adapter,
    *,
    positive: torch.Tensor,
    negative: torch.Tensor,
    start: torch.Tensor,
    cond: dict[str, torch.Tensor],
    timestep: int = 500,
    draws: int = 4,
    seed: int = 0,
    conditioning_pixels: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> float:
    """Cosine between x0(+1) - x0(-1) and mean(positive) - mean(negative).

    ``start`` are clean latents (B, C, H, W) to noise; ``cond`` their text conditioning.
    """
    generator = torch.Generator().manual_seed(seed)
    direction = (positive.float().mean(0) - negative.float().mean(0)).flatten()
    timesteps = torch.full((start.shape[0],), timestep, dtype=torch.long, device=start.device)
    total = torch.zeros_like(direction)
    for _ in range(draws):
        noise = torch.randn(start.shape, generator=generator).to(start)
        noisy = family.noise_latents(components, start, noise, timesteps)
        estimates = []
        for strength in (1.0, -1.0):
            with adapter.multiplier(strength):
                residuals = None
                if components.controlnet is not None and conditioning_pixels is not None:
                    residuals = family.controlnet_residuals(
                        components, noisy, timesteps, cond, conditioning_pixels, conditioning_scale
                    )
                prediction = family.predict(components, noisy, timesteps, cond, residuals)
            estimates.append(family.clean_latent_estimate(components, noisy, timesteps, prediction))
        total += (estimates[0] - estimates[1]).float().mean(0).flatten()
    return F.cosine_similarity(total, direction, dim=0).item()
