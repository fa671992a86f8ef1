"""Cosmos-Predict2 text-to-image (`cosmos`): a video DiT on one-frame Wan-VAE latents, T5.

What Cosmos2TextToImagePipeline integrates, and so what training trains:

- the state is EDM's ``x = x0 + sigma * n`` (variance exploding, ``sigma`` from
  ``sigma_max`` 80 down to ``sigma_min`` 0.002 on a Karras rho-7 grid: FlowMatchEulerDiscrete
  with ``use_karras_sigmas``, the sigma bounds registered on it by the pipeline), started at
  ``sigma_max * n``;
- the transformer's prediction ``F`` is preconditioned as NVIDIA's ``RectifiedFlowScaling``:
  ``t = sigma / (sigma + 1)``, input ``c_in * x`` with ``c_in = 1 - t``, time input ``t``, and
  the clean estimate ``D = c_skip * x + c_out * F`` with ``c_skip = 1 - t``, ``c_out = -t``;
  the scheduler's Euler step then integrates ``(x - D) / sigma`` in ``sigma``.

Written in ``t``, that is rectified flow: ``c_in * x = (1 - t) x0 + t n`` is the flow
interpolant, ``D = x0`` exactly when ``F = n - x0`` (the velocity), and the EDM Euler step from
``sigma`` to ``sigma'`` is the flow Euler step ``x + (t' - t) F`` from ``t`` to ``t'`` (both
put the clean and noise estimates at the next level). So slider-cn trains Cosmos with flow.py's
objective on the flow interpolant, with ``predict`` returning the transformer's raw output ``F``,
which every sampler step of the pipeline uses (``D``, the CFG mix and the Euler velocity are
affine in it with coefficients the cond and uncond branches share):

- the loss is the plain velocity MSE ``|F - (n - x0)|^2``. Cosmos-Predict2's own training loss
  is the x0 MSE ``|D - x0|^2`` weighted by ``(1 + sigma)^2 / sigma^2`` (``RectifiedFlowScaling``
  with ``loss_weight_uniform``, its text-to-image configs); since ``D - x0 = -t (F - v)`` and
  ``t = sigma / (1 + sigma)``, that is exactly the velocity MSE;
- its noise levels are ``log sigma ~ N(0, 1)``, i.e. ``t = sigmoid(N(0, 1))``: flow.py's default
  logit-normal draw, unshifted (the scheduler's ``shift`` is 1; the Karras grid shapes only
  inference and is ignored by training, as flow.py says). timesteps are ``1000 t`` as in the
  other flow families; the transformer gets ``t`` itself;
- the text-slider sampler (``sampling_timesteps``) walks the pipeline's own Karras grid in
  ``t``, from ``t(sigma_max) = 0.988``, and then to 0.

Latents: the Wan VAE's posterior mean, normalised as the pipeline decodes them,
``(z - latents_mean) / latents_std * sigma_data`` (``sigma_data`` 1), kept 4-D (B, C, H, W) in
slider-cn and given to the transformer as one frame (B, C, 1, H, W) with a zero padding mask,
as the pipeline does. Prompts go through the pipeline's ``encode_prompt`` (T5 last hidden
states, padding positions zeroed, no mask to the transformer) at its ``max_sequence_length``
(512).

diffusers 0.42.1 gives Cosmos2TextToImagePipeline no LoRA loader, although its transformer has
PEFT's adapter methods and diffusers' Cosmos 2.5 pipelines load LoRAs with
CosmosLoraLoaderMixin: the family's ``pipeline_class`` is ``Cosmos2TextToImageLoraPipeline``,
the same pipeline with that mixin.

The pipeline refuses to run without NVIDIA's guardrail (``cosmos_guardrail``'s
CosmosSafetyChecker, as the model license requires). Validation of a real checkpoint builds it
(install ``cosmos_guardrail``); only the `tiny` model, random weights that are no Cosmos model
and cannot reach the guardrail's checkpoints offline, uses ``PassThroughSafetyChecker``, and
its ``base/`` folder names that class in ``model_index.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    ConfigMixin,
    Cosmos2TextToImagePipeline,
    CosmosTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,  # in this namespace, diffusers finds PassThroughSafetyChecker's loader
)
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import CosmosLoraLoaderMixin
from transformers import AutoTokenizer, T5EncoderModel

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import FlowMatchingFamily
from slider_cn.families.sd3 import tiny_t5
from slider_cn.families.tiny_tokenizer import build_tiny_t5_tokenizer
from slider_cn.targets.spec import QKVO, SELF_ATTN1, ArchitectureTargets

log = logging.getLogger(__name__)

# What Cosmos2TextToImagePipeline registers on its scheduler (its __init__).
SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
SIGMA_DATA = 1.0
KARRAS_RHO = 7.0
TINY_LATENT_CHANNELS = 4
# The Wan 2.1 VAE's per-channel latent statistics (its config), the first four for `tiny`.
TINY_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]
TINY_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """A stand-in for Cosmos Guardrail that lets everything through.

    Used by the `tiny` model only (and by the text-only pipeline that encodes prompts, which
    checks nothing): random weights are no Cosmos model, and the guardrail's own checkpoints are
    not reachable offline. Real checkpoints validate with the real guardrail.
    """

    @register_to_config
    def __init__(self) -> None:
        super().__init__()
        # one saved value: diffusers loads a model folder only with a weights file in it
        self.register_buffer("_device_tracker", torch.zeros(1))

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames


class Cosmos2TextToImageLoraPipeline(Cosmos2TextToImagePipeline, CosmosLoraLoaderMixin):
    """Cosmos2TextToImagePipeline with ``load_lora_weights`` / ``save_lora_weights`` /
    ``lora_state_dict`` (diffusers' CosmosLoraLoaderMixin, transformer LoRAs with keys
    ``transformer.*``), which diffusers 0.42.1 gives its Cosmos 2.5 pipelines only."""


def cosmos_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The Cosmos-Predict2 text-to-image scheduler: Karras sigmas, unshifted (the pipeline
    registers its sigma bounds on it when it is built)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_karras_sigmas=True
    )


def karras_sigmas(steps: int, sigma_max: float, sigma_min: float, rho: float = KARRAS_RHO):
    """``steps`` EDM noise levels from sigma_max down to sigma_min (Karras et al., eq. 5)."""
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class CosmosFamily(FlowMatchingFamily):
    name = "cosmos"
    description = "Cosmos-Predict2 text-to-image (CosmosTransformer3DModel, T5, Wan VAE)"
    denoiser_model_class = CosmosTransformer3DModel
    pipeline_class = Cosmos2TextToImageLoraPipeline
    targets = ArchitectureTargets(
        slider=(
            *SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.t_embedder.linear_1",
            "time_embed.t_embedder.linear_2",
            "proj_out",
        ),
        ordinary=QKVO,
        note="Self-attention is `attn1`; patch embedding and `time_embed.t_embedder` stand in "
        "for conv_in and time_embedding. The text's cross-attention `attn2` (and "
        "`crossattn_proj`, where a checkpoint has it) is never adapted.",
    )
    max_sequence_length_default = 512  # Cosmos2TextToImagePipeline's default

    def __init__(self, config):
        super().__init__(config)
        # whether the loaded model's folder names the pass-through safety checker (`tiny`)
        self._pass_through_checker = config.is_tiny
        self._guardrail: torch.nn.Module | None = None  # built once, on first validation

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_t5_tokenizer(self.max_sequence_length_tiny)
        with seeded(seed):
            text_encoder = tiny_t5(tokenizer, d_model=32)
            vae = AutoencoderKLWan(
                base_dim=8,
                z_dim=TINY_LATENT_CHANNELS,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],  # 8x spatially, as the real one
                latents_mean=TINY_LATENTS_MEAN,
                latents_std=TINY_LATENTS_STD,
            )
            transformer = CosmosTransformer3DModel(
                in_channels=TINY_LATENT_CHANNELS,
                out_channels=TINY_LATENT_CHANNELS,
                num_attention_heads=2,
                attention_head_dim=16,
                num_layers=2,
                mlp_ratio=2.0,
                text_embed_dim=32,  # the T5 width
                adaln_lora_dim=8,
                max_size=(4, 32, 32),  # latents up to 32x32: 256 px images
                patch_size=(1, 2, 2),
            )
        return Components(transformer, vae, [text_encoder], [tokenizer], cosmos_scheduler())

    def load_pretrained(self, path: str) -> Components:
        # The components one by one: the pipeline would build the guardrail, which training
        # does not need (validation builds it, see validation_pipeline).
        dtype = self.load_dtype
        transformer = _load(CosmosTransformer3DModel, path, "transformer", dtype=dtype)
        vae = _load(AutoencoderKLWan, path, "vae", dtype=dtype)
        text_encoder = _load(T5EncoderModel, path, "text_encoder", dtype=dtype)
        tokenizer = _load(AutoTokenizer, path, "tokenizer")
        scheduler = _load(FlowMatchEulerDiscreteScheduler, path, "scheduler")
        self._pass_through_checker = self._names_pass_through_checker(path)
        if not self._pass_through_checker and self._validates() and not _guardrail_available():
            log.warning(
                "Cosmos validation images need NVIDIA's guardrail (pip install cosmos_guardrail); "
                "without it validation stops the run with an error"
            )
        return Components(transformer, vae, [text_encoder], [tokenizer], scheduler)

    @staticmethod
    def _names_pass_through_checker(path: str) -> bool:
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return False
        entry = Cosmos2TextToImagePipeline.load_config(str(Path(path))).get("safety_checker")
        return bool(entry) and entry[-1] == PassThroughSafetyChecker.__name__

    def _validates(self) -> bool:
        return self.config.validation_steps > 0 and bool(self.config.validation_prompt)

    def load_controlnet(self, path: str) -> torch.nn.Module:
        raise _no_controlnet()

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        raise _no_controlnet()

    # --- latents -------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 8

    def _latent_stats(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        std = torch.tensor(vae.config.latents_std).view(shape)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def _sigma_data(self, components: Components) -> float:
        return float(components.noise_scheduler.config.get("sigma_data") or SIGMA_DATA)

    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # one frame
        # The distribution's mode: deterministic, so a cached latent is reproducible.
        latents = vae.encode(pixels).latent_dist.mode().squeeze(2)
        mean, std = self._latent_stats(vae, latents)
        return (latents - mean) / std * self._sigma_data(components)

    def initial_noise(self, components, batch, resolution, generator):
        side = resolution // self.vae_scale_factor
        channels = components.vae.config.z_dim
        return torch.randn((batch, channels, side, side), generator=generator)

    # --- the objective (flow.py's; see the module docstring) -----------------------------
    def sampling_timesteps(self, components, steps, latents):
        """The pipeline's Karras grid (``steps`` levels, sigma_max .. sigma_min) in
        ``1000 t``, then clean."""
        sched = components.noise_scheduler.config
        sigmas = karras_sigmas(
            steps,
            float(sched.get("sigma_max") or SIGMA_MAX),
            float(sched.get("sigma_min") or SIGMA_MIN),
        )
        t = torch.cat([sigmas / (sigmas + 1.0), torch.zeros(1, dtype=sigmas.dtype)])
        return (t * self.num_train_timesteps(components)).float().to(latents.device)

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> Cosmos2TextToImagePipeline:
        return Cosmos2TextToImagePipeline(
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=None,
            vae=None,
            scheduler=None,
            safety_checker=PassThroughSafetyChecker(),  # encode_prompt checks nothing
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self._text_device(components),
        )
        return {"prompt_embeds": embeds}

    # --- forward -------------------------------------------------------------------------
    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        raise _no_controlnet()

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        """The transformer's output ``F`` on the flow interpolant (the pipeline's ``c_in * x``)
        at time ``t`` (its ``c_noise``): the velocity ``noise - x0``."""
        b, _, h, w = noisy.shape
        t = self.sigmas(components, timesteps).to(device=noisy.device, dtype=noisy.dtype)
        out = components.denoiser(
            hidden_states=noisy.unsqueeze(2),
            timestep=t.expand(b),
            encoder_hidden_states=cond["prompt_embeds"],
            padding_mask=noisy.new_zeros(1, 1, h, w),
            return_dict=False,
        )[0]
        return out.squeeze(2)

    # --- pipelines -----------------------------------------------------------------------
    def _safety_checker(self) -> torch.nn.Module:
        if self._pass_through_checker:
            return PassThroughSafetyChecker()
        if self._guardrail is None:
            # cosmos_guardrail's class where it is installed, else diffusers' stub that says so
            from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import (
                CosmosSafetyChecker,
            )

            try:
                self._guardrail = CosmosSafetyChecker()
            except ImportError as exc:
                raise ConfigError(
                    "Cosmos2TextToImagePipeline renders only with NVIDIA's guardrail, as the "
                    f"model license requires: {exc}"
                ) from None
        return self._guardrail

    def _pipeline_parts(self, components: Components, safety_checker) -> dict:
        return dict(
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=components.denoiser,
            vae=components.vae,
            scheduler=components.noise_scheduler,
            safety_checker=safety_checker,
        )

    def pipeline(self, components: Components) -> Cosmos2TextToImageLoraPipeline:
        return self.pipeline_class(**self._pipeline_parts(components, self._safety_checker()))

    def save_pretrained(self, components: Components, folder: str | Path) -> None:
        """A stock Cosmos2TextToImagePipeline folder (a `tiny` run's ``base/``; its
        model_index.json names the pass-through safety checker)."""
        parts = self._pipeline_parts(components, self._safety_checker())
        Cosmos2TextToImagePipeline(**parts).save_pretrained(str(folder), safe_serialization=True)

    def validation_pipeline(self, components: Components) -> Cosmos2TextToImageLoraPipeline:
        # the pipeline registers its sigma bounds on the scheduler: give it its own
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config)
        return self.pipeline(dataclasses.replace(components, noise_scheduler=scheduler))


def _no_controlnet() -> ConfigError:
    return ConfigError(
        "diffusers has no ControlNet for Cosmos-Predict2 text-to-image; use training_mode 'lora'"
    )


def _load(cls, path: str, subfolder: str, **kwargs):
    """One component of a Cosmos-Predict2 folder or hub id; failures become a ConfigError."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        hint = (
            ""
            if Path(path).exists()
            else " (not a local folder; hub ids need network access and HF_HUB_OFFLINE unset)"
        )
        raise ConfigError(
            f"could not load the Cosmos {subfolder} from {path}{hint}: {exc}"
        ) from None


def _guardrail_available() -> bool:
    try:
        import cosmos_guardrail  # noqa: F401
    except ImportError:
        return False
    return True
