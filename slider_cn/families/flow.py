"""What the flow-matching families (`sd3`, `flux`, `zimage`) share.

The objective, as diffusers' FlowMatchEulerDiscreteScheduler defines it:

- a noise level ``sigma`` in (0, 1) per sample; ``noisy = (1 - sigma) * x + sigma * noise``;
- the target is the velocity ``noise - x`` (what the scheduler's Euler step integrates:
  ``x_next = x + (sigma_next - sigma) * v``), so the clean estimate is ``noisy - sigma * v``;
- timesteps are ``sigma * num_train_timesteps``, the scale the scheduler and its pipelines use.

Sampling sigma (SimpleTuner's keys): ``u`` is logit-normal, ``sigmoid(N(0, 1) *
flow_sigmoid_scale)`` (the SD3 paper's choice: more weight on the middle of the schedule), or
uniform with ``flow_use_uniform_schedule``. ``u`` is then shifted as the scheduler shifts its
inference sigmas: a static ``shift * u / (1 + (shift - 1) * u)`` (SD3, Z-Image), or the
resolution-dependent shift of ``use_dynamic_shifting`` schedulers (Flux), with ``mu`` from the
latent token count exactly as the pipelines compute it. ``flow_schedule_shift`` forces a static
shift, ``flow_schedule_auto_shift`` forces the resolution-dependent one. Scheduler options that
only shape an inference schedule (karras/exponential/beta sigmas, shift_terminal) do not apply
to training and are ignored.

Loss weighting (``flow_loss_weighting``): ``none`` (plain MSE, default), or diffusers'
``sigma_sqrt`` / ``cosmap`` weights (diffusers.training_utils.compute_loss_weighting_for_sd3),
multiplying the element losses of ``loss_type`` (slider_cn/losses.py).

Text conditioning is computed by the family's own diffusers pipeline (``encode_prompt``), so
what training sees is what inference sees. ControlNet conditioning images are encoded with the
VAE inside ``controlnet_residuals`` (these ControlNets take latents, not pixels).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL

from slider_cn import precision
from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, ModelFamily
from slider_cn.losses import denoising_loss

# Tiny VAEs: four levels give the real 8x spatial factor, so 64 px images make 8x8 latents.
TINY_VAE_BLOCKS = (8, 16, 16, 16)
TINY_LATENT_CHANNELS = 4


def tiny_flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A small AutoencoderKL laid out like SD3's / Flux's (no quant convs, a shift factor).

    Its posterior is made as narrow as a trained VAE's (log-variance -30), so pipelines that
    *sample* the latent of a conditioning image get the same latent as training's mode.
    """
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=TINY_VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        conv_out = vae.encoder.conv_out
        conv_out.weight[TINY_LATENT_CHANNELS:].zero_()
        conv_out.bias[TINY_LATENT_CHANNELS:].fill_(-30.0)
    return vae


def load_pipeline(pipeline_class: type, path: str, dtype: torch.dtype, what: str, **kwargs):
    """A diffusers pipeline from a folder or hub id; failures become a ConfigError."""
    try:
        return pipeline_class.from_pretrained(path, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        hint = (
            ""
            if Path(path).exists()
            else " (not a local folder; hub ids need network access and HF_HUB_OFFLINE unset)"
        )
        raise ConfigError(f"could not load the {what} from {path}{hint}: {exc}") from None


def load_model(model_class: type, path: str, dtype: torch.dtype, what: str):
    try:
        return model_class.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as exc:
        hint = (
            ""
            if Path(path).exists()
            else " (not a local folder; hub ids need network access and HF_HUB_OFFLINE unset)"
        )
        raise ConfigError(f"could not load the {what} from {path}{hint}: {exc}") from None


class FlowMatchingFamily(ModelFamily):
    """A transformer denoiser trained with the rectified-flow objective (see module docstring)."""

    # Keyword prefix of the pipeline's save_lora_weights (``transformer_lora_layers``).
    lora_component: ClassVar[str] = "transformer"
    # kohya-format export exists only for UNet families: kohya names these transformers by
    # their original (fused-qkv) layout, which diffusers names do not map onto one-to-one.
    kohya_prefix: ClassVar[str | None] = None
    # The pipeline's default max_sequence_length, so training encodes prompts as inference does.
    max_sequence_length_default: ClassVar[int] = 512
    max_sequence_length_tiny: ClassVar[int] = 16

    @property
    def vae_scale_factor(self) -> int:
        return 8

    @property
    def max_sequence_length(self) -> int:
        return (
            self.max_sequence_length_tiny
            if self.config.is_tiny
            else self.max_sequence_length_default
        )

    @property
    def load_dtype(self) -> torch.dtype:
        # Load big checkpoints straight in the training precision (the loop casts to it anyway).
        return precision.autocast_dtype(self.config)

    # --- latents ---------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        # The distribution's mode: deterministic, so a cached latent is reproducible.
        latents = vae.encode(pixels).latent_dist.mode()
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def conditioning_latents(
        self, components: Components, conditioning_pixels: torch.Tensor, *, shift: bool = True
    ) -> torch.Tensor:
        """Conditioning pixels in [0, 1] -> the latents these ControlNets take, as the
        family's ControlNet pipeline makes them (normalised to [-1, 1], VAE, shift and scale)."""
        vae = components.vae
        pixels = (conditioning_pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        offset = (vae.config.get("shift_factor") or 0.0) if shift else 0.0
        return (latents - offset) * vae.config.scaling_factor

    # --- the objective ---------------------------------------------------------------------
    def num_train_timesteps(self, components: Components) -> int:
        return int(components.noise_scheduler.config.num_train_timesteps)

    def sigmas(self, components: Components, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.num_train_timesteps(components)

    def _shift(self, components: Components, u: torch.Tensor, latents: torch.Tensor):
        scheduler = components.noise_scheduler
        sched = scheduler.config
        dynamic = sched.get("use_dynamic_shifting", False)
        if self.config.flow_schedule_shift is not None:
            shift, dynamic = float(self.config.flow_schedule_shift), False
        else:
            shift = float(sched.get("shift", 1.0))
            dynamic = dynamic or self.config.flow_schedule_auto_shift
        if not dynamic:
            return shift * u / (1 + (shift - 1) * u)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        # As the pipelines compute it: tokens of the 2x2-packed latent.
        seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        mu = calculate_shift(
            seq_len,
            sched.get("base_image_seq_len", 256),
            sched.get("max_image_seq_len", 4096),
            sched.get("base_shift", 0.5),
            sched.get("max_shift", 1.15),
        )
        return scheduler.time_shift(mu, 1.0, u)

    def sample_sigmas(
        self, components: Components, latents: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        batch = latents.shape[0]
        if self.config.flow_use_uniform_schedule:
            u = torch.rand((batch,), generator=generator)
        else:
            u = torch.sigmoid(
                torch.randn((batch,), generator=generator) * self.config.flow_sigmoid_scale
            )
        # Keep away from the exact ends, where 1/u - 1 and sigma^-2 weights are infinite.
        u = u.clamp(1e-5, 1.0 - 1e-5)
        return self._shift(components, u, latents).float()

    def noise_latents(self, components, latents, noise, timesteps):
        sigma = self.sigmas(components, timesteps).to(latents.device)
        sigma = sigma.view(-1, *([1] * (latents.ndim - 1)))
        return ((1.0 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def add_noise(self, components, latents, generator):
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        sigmas = self.sample_sigmas(components, latents, generator)
        timesteps = (sigmas * self.num_train_timesteps(components)).to(latents.device)
        return self.noise_latents(components, latents, noise, timesteps), noise, timesteps

    def training_target(self, components, latents, noise, timesteps):
        return noise - latents

    def clean_latent_estimate(self, components, noisy, timesteps, prediction):
        sigma = self.sigmas(components, timesteps).to(noisy.device)
        sigma = sigma.view(-1, *([1] * (noisy.ndim - 1)))
        return noisy.float() - sigma * prediction.float()

    def noise_estimate(self, components, noisy, timesteps, prediction):
        # noisy = (1 - sigma) x + sigma n and v = n - x, so n = noisy + (1 - sigma) v
        sigma = self.sigmas(components, timesteps).to(noisy.device)
        sigma = sigma.view(-1, *([1] * (noisy.ndim - 1)))
        return noisy.float() + (1.0 - sigma) * prediction.float()

    def sampling_timesteps(self, components, steps, latents):
        # the noise levels inference uses: evenly spaced, then shifted as training shifts them
        u = torch.linspace(1.0, 0.0, steps + 1)
        sigmas = self._shift(components, u, latents).float().clamp(0.0, 1.0)
        return (sigmas * self.num_train_timesteps(components)).to(latents.device)

    def loss(self, components, prediction, target, timesteps) -> torch.Tensor:
        # `loss_type` per element (slider_cn/losses.py), times the flow_loss_weighting weights
        scheme = self.config.flow_loss_weighting
        weights = None
        if scheme != "none":
            from diffusers.training_utils import compute_loss_weighting_for_sd3

            sigma = self.sigmas(components, timesteps).to(prediction.device)
            shape = (-1,) + (1,) * (prediction.ndim - 1)
            weights = compute_loss_weighting_for_sd3(scheme, sigma.view(shape))
        threshold = self.huber_threshold(components, timesteps)
        return denoising_loss(prediction, target, self.config.loss_type, threshold, weights)

    def noise_ratio(self, components, timesteps) -> torch.Tensor:
        # noisy = (1 - sigma) x + sigma * noise: noise level over signal level
        sigma = self.sigmas(components, timesteps).float().reshape(-1).clamp(max=1.0 - 1e-6)
        return sigma / (1.0 - sigma)

    # --- pipelines -------------------------------------------------------------------------
    def pipeline(self, components: Components):
        """The family's diffusers pipeline over these components (no ControlNet)."""
        raise NotImplementedError

    def controlnet_pipeline(self, components: Components):
        """The family's diffusers ControlNet pipeline over these components."""
        raise NotImplementedError

    def text_pipeline(self, components: Components):
        """A pipeline with only the text encoders, for its ``encode_prompt``."""
        raise NotImplementedError

    def save_pretrained(self, components: Components, folder: str | Path) -> None:
        """Write the base components as a diffusers pipeline folder (used for `tiny` runs)."""
        self.pipeline(components).save_pretrained(str(folder), safe_serialization=True)

    def validation_pipeline(self, components: Components):
        """The pipeline validation renders with: the ControlNet one when a ControlNet is loaded.

        It holds the very modules of ``components`` (slider and assistant included) and its
        own scheduler built from the training one's config (pipelines mutate theirs).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config)
        view = dataclasses.replace(components, noise_scheduler=scheduler)
        if components.controlnet is not None:
            return self.controlnet_pipeline(view)
        return self.pipeline(view)

    def validation_call_kwargs(self, prompt: str, conditioning_image: Any, config) -> dict:
        """Keyword arguments of one validation call of ``validation_pipeline`` (no generator).

        Prompts are encoded at the length training used; the guidance scale is the pipeline's
        ``guidance_scale`` (CFG for SD3 and Z-Image, the distilled guidance input for Flux dev).
        """
        kwargs = super().validation_call_kwargs(prompt, conditioning_image, config)
        kwargs["max_sequence_length"] = self.max_sequence_length
        return kwargs

    def _text_device(self, components: Components) -> torch.device:
        return next(components.text_encoders[0].parameters()).device
