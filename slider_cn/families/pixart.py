"""PixArt-Σ (`pixart`): DiT with adaLN-single, one T5 text encoder, SDXL's 4-channel VAE.

Conventions of PixArtSigmaPipeline that training follows:

- prompts go through the pipeline's own ``encode_prompt`` with ``clean_caption=False`` (the
  pipeline's caption cleaning needs bs4 and ftfy, which slider-cn does not install; validation
  passes ``clean_caption=False`` too, so training and inference see the same text): T5's last
  hidden states and the attention mask of its padding, both of which reach the transformer (its
  cross-attention reads the mask), at the pipeline's ``max_sequence_length`` (300);
- latents are SDXL-VAE latents times ``scaling_factor`` (0.13025), no shift;
- the objective is DDPM epsilon prediction on the linear beta schedule (0.0001..0.02, 1000
  steps) of the PixArt checkpoints, the shared DDPM code of sd.py (noise, target, clean and
  noise estimates, the sampling grid). The hub checkpoints ship a DPMSolverMultistepScheduler:
  its betas are the training schedule, so training reads them through a DDPMScheduler built
  from its config, and validation samples with DPM-Solver++ built from the same config, as the
  pipeline does;
- the transformer predicts a learned variance too (``out_channels = 2 x`` latent channels, the
  IDDPM layout of the original training). PixArtSigmaPipeline keeps only the first half (the
  epsilon) when ``out_channels // 2`` equals the latent channels and its scheduler never reads
  the other half, so ``predict`` returns that epsilon half and the loss is the plain epsilon MSE
  on it: what the slider changes is exactly what inference uses. (The original training's
  variational-bound term only fits the variance half, which no diffusers sampler of PixArt-Σ
  uses.)
- micro-conditioning: PixArtSigmaPipeline always passes ``added_cond_kwargs = {"resolution":
  None, "aspect_ratio": None}``; the Σ checkpoints are built with ``use_additional_conditions``
  false, so the transformer adds no size embedding. A transformer that wants them (PixArt-α
  1024 px) cannot run in PixArtSigmaPipeline and is refused when it loads.

diffusers 0.42.1 gives neither PixArtSigmaPipeline a LoRA loader nor PixArtTransformer2DModel
the PEFT adapter methods (``load_lora_adapter``, ``set_adapters``) every other transformer
has. The family's ``pipeline_class`` is therefore ``PixArtSigmaLoraPipeline``:
PixArtSigmaPipeline with diffusers' transformer-only LoRA loader (the one SanaPipeline uses;
nothing in it is Sana's), whose transformer gets PeftAdapterMixin's methods when the pipeline is
built. Saved folders are the stock ones (``PixArtSigmaPipeline``, ``PixArtTransformer2DModel``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.loaders.peft import PeftAdapterMixin

from slider_cn import precision
from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import load_pipeline
from slider_cn.families.sd import StableDiffusionFamily, tiny_vae
from slider_cn.families.sd3 import tiny_t5
from slider_cn.families.tiny_tokenizer import build_tiny_t5_tokenizer
from slider_cn.targets.spec import QKVO, SELF_ATTN1, ArchitectureTargets

# SDXL's VAE, which PixArt-Σ uses (vae/config.json of the Σ checkpoints).
SDXL_VAE_SCALING = 0.13025
TINY_LATENT_CHANNELS = 4

# PixArtTransformer2DModel with diffusers' PEFT adapter methods. It keeps the stock class's name
# and module, so that what it saves (config.json, model_index.json) names the stock class.
_PEFT_PIXART = type(
    PixArtTransformer2DModel.__name__,
    (PixArtTransformer2DModel, PeftAdapterMixin),
    {
        "__module__": PixArtTransformer2DModel.__module__,
        "__qualname__": PixArtTransformer2DModel.__qualname__,
        "__doc__": "PixArtTransformer2DModel with PeftAdapterMixin (slider_cn.families.pixart).",
    },
)


def with_peft_adapters(transformer: PixArtTransformer2DModel) -> PixArtTransformer2DModel:
    """Give a PixArt transformer PeftAdapterMixin's methods (``load_lora_adapter``, ...) in place:
    the object, its weights and its forward stay the same."""
    if not isinstance(transformer, PeftAdapterMixin):
        transformer.__class__ = _PEFT_PIXART
    return transformer


class PixArtSigmaLoraPipeline(PixArtSigmaPipeline, SanaLoraLoaderMixin):
    """PixArtSigmaPipeline with ``load_lora_weights`` / ``save_lora_weights`` /
    ``lora_state_dict`` (transformer LoRAs, keys ``transformer.*``), which diffusers 0.42.1 does
    not give it. It loads any PixArt-Σ folder or hub id."""

    def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler):
        if transformer is not None:
            with_peft_adapters(transformer)
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )


def pixart_noise_scheduler() -> DDPMScheduler:
    """The PixArt training schedule: linear betas 0.0001..0.02 over 1000 steps, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="linspace",
    )


class PixArtFamily(StableDiffusionFamily):
    name = "pixart"
    description = "PixArt-Σ (PixArtTransformer2DModel, T5 text encoder, SDXL VAE)"
    denoiser_model_class = PixArtTransformer2DModel
    controlnet_model_class = None
    controlnet_pipeline_class = None
    pipeline_class = PixArtSigmaLoraPipeline
    lora_component = "transformer"
    kohya_prefix = None  # kohya names PixArt by its original checkpoint's layout
    control_image_argument = "control_image"
    targets = ArchitectureTargets(
        slider=(
            *SELF_ATTN1,
            "pos_embed.proj",
            "adaln_single.emb.timestep_embedder.linear_1",
            "adaln_single.emb.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=QKVO,
        note="Self-attention is `attn1`; the patch embedding `pos_embed.proj` stands in for "
        "conv_in, the timestep MLP is under `adaln_single.emb`. The caption's "
        "`caption_projection` and the cross-attention `attn2` are never adapted.",
    )
    # PixArtSigmaPipeline's default; the `tiny` T5 reads 32 byte tokens.
    max_sequence_length_default = 300
    max_sequence_length_tiny = 32

    @property
    def max_sequence_length(self) -> int:
        return (
            self.max_sequence_length_tiny
            if self.config.is_tiny
            else self.max_sequence_length_default
        )

    @property
    def load_dtype(self) -> torch.dtype:
        # Load the checkpoint straight in the training precision (the loop casts to it anyway).
        return precision.autocast_dtype(self.config)

    def _lora_loader_kwargs(self, denoiser: torch.nn.Module) -> dict[str, Any]:
        return {}

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_t5_tokenizer(self.max_sequence_length_tiny)
        with seeded(seed):
            text_encoder = tiny_t5(tokenizer, d_model=32)
            vae = tiny_vae(scaling_factor=SDXL_VAE_SCALING)
            transformer = PixArtTransformer2DModel(
                num_attention_heads=2,
                attention_head_dim=16,
                in_channels=TINY_LATENT_CHANNELS,
                out_channels=2 * TINY_LATENT_CHANNELS,  # epsilon and the learned variance
                num_layers=2,
                cross_attention_dim=32,  # the transformer width (heads x head width)
                caption_channels=32,  # the T5 width
                sample_size=8,  # 64 px images, 8x8 latents
                patch_size=2,
                norm_type="ada_norm_single",
                use_additional_conditions=False,  # as the Σ checkpoints
            )
        components = Components(
            with_peft_adapters(transformer),
            vae,
            [text_encoder],
            [tokenizer],
            pixart_noise_scheduler(),
        )
        return components

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(PixArtSigmaLoraPipeline, path, self.load_dtype, "PixArt-Σ pipeline")
        transformer = pipe.transformer
        if transformer.use_additional_conditions:
            raise ConfigError(
                f"{path}: its transformer is micro-conditioned on resolution and aspect ratio "
                "(use_additional_conditions, PixArt-α 1024 px), which PixArtSigmaPipeline never "
                "passes; slider-cn trains PixArt-Σ checkpoints"
            )
        # the training schedule is the inference scheduler's betas (a DPM-Solver on the hub)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"{path}: prediction_type {scheduler.config.prediction_type!r} is not supported; "
                "PixArt-Σ predicts epsilon"
            )
        return Components(transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], scheduler)

    def load_controlnet(self, path: str) -> torch.nn.Module:
        raise ConfigError("diffusers has no PixArt-Σ ControlNet class; use training_mode 'lora'")

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        raise ConfigError("diffusers has no PixArt-Σ ControlNet class; use training_mode 'lora'")

    def save_pretrained(self, components: Components, folder: str | Path) -> None:
        """A stock PixArtSigmaPipeline folder with PixArt-Σ's own scheduler (DPM-Solver++)."""
        parts = self._pipeline_parts(components)
        parts["scheduler"] = self.inference_scheduler(components)
        PixArtSigmaPipeline(**parts).save_pretrained(str(folder), safe_serialization=True)

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> PixArtSigmaPipeline:
        return PixArtSigmaPipeline(
            tokenizer=components.tokenizers[0],
            text_encoder=components.text_encoders[0],
            vae=None,
            transformer=None,
            scheduler=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        encoder = components.text_encoders[0]
        embeds, mask, _, _ = self.text_pipeline(components).encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=next(encoder.parameters()).device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    # --- forward -------------------------------------------------------------------------
    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        raise ConfigError("diffusers has no PixArt-Σ ControlNet class; use training_mode 'lora'")

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        """The transformer's epsilon: the first half of its output when it also predicts the
        variance, as PixArtSigmaPipeline takes it (see the module docstring)."""
        transformer = components.denoiser
        out = transformer(
            noisy,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=timesteps.expand(noisy.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if transformer.config.out_channels // 2 == noisy.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict[str, Any]:
        return {
            "tokenizer": components.tokenizers[0],
            "text_encoder": components.text_encoders[0],
            "vae": components.vae,
            "transformer": components.denoiser,
            "scheduler": components.noise_scheduler,
        }

    def inference_scheduler(self, components: Components) -> DPMSolverMultistepScheduler:
        """PixArt-Σ's sampler (DPM-Solver++ 2nd order) on the training schedule's betas."""
        return DPMSolverMultistepScheduler.from_config(
            components.noise_scheduler.config, variance_type=None
        )

    def validation_pipeline(self, components: Components) -> PixArtSigmaLoraPipeline:
        view = dataclasses.replace(components, noise_scheduler=self.inference_scheduler(components))
        return self.pipeline_class(**self._pipeline_parts(view))

    def validation_call_kwargs(self, prompt: str, conditioning_image: Any, config) -> dict:
        """The base keyword arguments, with the caption handling and length training used, and
        the image drawn at exactly the configured size (the pipeline's resolution binning snaps
        sizes to its aspect-ratio table, which knows only the hub checkpoints' sample sizes)."""
        kwargs = super().validation_call_kwargs(prompt, conditioning_image, config)
        kwargs["clean_caption"] = False
        kwargs["max_sequence_length"] = self.max_sequence_length
        kwargs["use_resolution_binning"] = False
        return kwargs
