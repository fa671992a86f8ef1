"""What SD1.x/2.x (`sd1x.py`) and SDXL (`sdxl.py`) share: UNet + KL VAE + CLIP text encoder(s),
DDPM-style epsilon (or v) training, the ControlNet built with ``ControlNetModel.from_unet``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, ModelFamily
from slider_cn.shapes import builtin_model

# Small conditioning embedding for tiny ControlNets; four entries keep the 8x downsampling
# that matches the VAE.
TINY_CONDITIONING_CHANNELS = (8, 8, 16, 16)


def tiny_vae(scaling_factor: float) -> AutoencoderKL:
    # Four levels give the real 8x spatial factor, so conditioning images line up with latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_text_config(tokenizer, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def sd_noise_scheduler() -> DDPMScheduler:
    # The SD training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _load(cls, path: str, subfolder: str | None, what: str):
    try:
        builtin = builtin_model(path)  # `shapes` / `shapes-canny`: the shipped folders
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if builtin is not None:
        path = str(builtin)
    try:
        loaded = cls.from_pretrained(path, subfolder=subfolder)
        if builtin is not None and isinstance(loaded, torch.nn.Module):
            loaded.float()  # shipped as fp16 to halve the bytes; computed in fp32
        return loaded
    except (OSError, ValueError) as exc:
        where = f"{path}/{subfolder}" if subfolder else path
        hint = (
            ""
            if Path(path).exists()
            else " (not a local folder; hub ids need network access and HF_HUB_OFFLINE unset)"
        )
        raise ConfigError(f"could not load the {what} from {where}{hint}: {exc}") from None


class StableDiffusionFamily(ModelFamily):
    """Shared by SD1.x and SDXL: UNet denoiser, KL VAE, DDPM-style epsilon training."""

    denoiser_model_class = UNet2DConditionModel
    controlnet_model_class = ControlNetModel
    lora_component = "unet"
    # sd-scripts' names for UNet LoRA keys, which ComfyUI and A1111 read
    kohya_prefix = "lora_unet"
    control_image_argument = "image"
    pipeline_class: ClassVar[type] = StableDiffusionPipeline
    controlnet_pipeline_class: ClassVar[type] = StableDiffusionControlNetPipeline
    text_encoder_subfolders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_subfolders: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_encoder_classes: ClassVar[tuple[type, ...]] = (CLIPTextModel,)

    def _lora_loader_kwargs(self, denoiser: torch.nn.Module) -> dict[str, Any]:
        # the UNet's layout tells diffusers' kohya converter which blocks the keys name
        return {"unet_config": denoiser.config}

    @property
    def vae_scale_factor(self) -> int:
        return 8

    def load_pretrained(self, path: str) -> Components:
        unet = _load(UNet2DConditionModel, path, "unet", "UNet")
        vae = _load(AutoencoderKL, path, "vae", "VAE")
        encoders = [
            _load(cls, path, sub, "text encoder")
            for cls, sub in zip(
                self.text_encoder_classes, self.text_encoder_subfolders, strict=True
            )
        ]
        tokenizers = [
            _load(AutoTokenizer, path, sub, "tokenizer") for sub in self.tokenizer_subfolders
        ]
        scheduler = _load(DDPMScheduler, path, "scheduler", "noise scheduler")
        return Components(unet, vae, encoders, tokenizers, scheduler)

    def load_controlnet(self, path: str) -> torch.nn.Module:
        return _load(ControlNetModel, path, None, "ControlNet")

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        kwargs = {}
        if self.config.is_tiny:
            kwargs = {"conditioning_embedding_out_channels": TINY_CONDITIONING_CHANNELS}
        elif self.config.is_shapes:
            # the shapes VAE downsamples 4x: a conditioning embedding with one step less
            from slider_cn.shapes.models import CONDITIONING_CHANNELS

            kwargs = {"conditioning_embedding_out_channels": CONDITIONING_CHANNELS}
        return ControlNetModel.from_unet(denoiser, **kwargs)

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        # The distribution's mode: deterministic, so a cached latent is reproducible.
        latents = vae.encode(pixels).latent_dist.mode()
        return latents * vae.config.scaling_factor

    def _tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # --- training step: DDPM noise, epsilon / v targets ------------------------------------
    def add_noise(self, components, latents, generator):
        scheduler = components.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        ).to(latents.device)
        return scheduler.add_noise(latents, noise, timesteps), noise, timesteps

    def training_target(self, components, latents, noise, timesteps):
        scheduler = components.noise_scheduler
        if scheduler.config.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def _unet_kwargs(self, cond: dict[str, torch.Tensor], noisy: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        controlnet = components.controlnet
        down, mid = controlnet(
            noisy,
            timesteps,
            controlnet_cond=conditioning_pixels.to(device=noisy.device, dtype=noisy.dtype),
            conditioning_scale=scale,
            return_dict=False,
            **self._unet_kwargs(cond, noisy),
        )
        # A trained ControlNet is accelerate-prepared, and under mixed precision accelerate
        # returns its outputs in fp32: give them to the UNet in its own dtype (an fp32 residual
        # in a bf16 UNet makes fp32 activations, and on a CPU group_norm then fails).
        down = [residual.to(noisy.dtype) for residual in down]
        mid = mid.to(noisy.dtype)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        kwargs = self._unet_kwargs(cond, noisy)
        if residuals:
            kwargs.update(residuals)
        return components.denoiser(noisy, timesteps, return_dict=False, **kwargs)[0]

    def clean_latent_estimate(self, components, noisy, timesteps, prediction):
        scheduler = components.noise_scheduler
        alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
        alpha = alphas.sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas).sqrt().view(-1, 1, 1, 1)
        noisy, prediction = noisy.float(), prediction.float()
        if scheduler.config.prediction_type == "v_prediction":
            return alpha * noisy - sigma * prediction
        return (noisy - sigma * prediction) / alpha

    def noise_estimate(self, components, noisy, timesteps, prediction):
        scheduler = components.noise_scheduler
        if scheduler.config.prediction_type == "epsilon":
            return prediction.float()
        if scheduler.config.prediction_type != "v_prediction":
            raise ConfigError(
                f"prediction_type {scheduler.config.prediction_type!r} is not supported; "
                "slider-cn trains epsilon- and v-prediction models"
            )
        alphas = scheduler.alphas_cumprod.to(device=noisy.device, dtype=torch.float32)[timesteps]
        alpha = alphas.sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas).sqrt().view(-1, 1, 1, 1)
        return sigma * noisy.float() + alpha * prediction.float()

    def sampling_timesteps(self, components, steps, latents):
        last = components.noise_scheduler.config.num_train_timesteps - 1
        return torch.linspace(last, 0, steps + 1).round().long().to(latents.device)

    def save_pretrained(self, components: Components, folder: str | Path) -> None:
        """Write the base components as a diffusers pipeline folder (used for `tiny` runs)."""
        self.pipeline(components).save_pretrained(str(folder), safe_serialization=True)

    def pipeline(self, components: Components):
        """The plain text-to-image pipeline over the components (no ControlNet)."""
        return self.pipeline_class(**self._pipeline_parts(components))

    def _pipeline_parts(self, components: Components) -> dict[str, Any]:
        raise NotImplementedError

    # --- validation --------------------------------------------------------------------------
    def validation_pipeline(self, components: Components):
        parts = self._pipeline_parts(components)
        # DDIM (eta 0) for inference: deterministic and good at few steps; the training
        # scheduler's betas and prediction type carry over through its config.
        parts["scheduler"] = DDIMScheduler.from_config(components.noise_scheduler.config)
        if components.controlnet is None:
            return self.pipeline_class(**parts)
        return self.controlnet_pipeline_class(**parts, controlnet=components.controlnet)
