"""Sana (`sana`): linear-attention DiT on DC-AE latents, Gemma2 text encoder, with its ControlNet.

Conventions of SanaPipeline / SanaControlNetPipeline that training follows:

- prompts go through the pipeline's own ``encode_prompt``, with the *complex human instruction*
  the pipeline's ``__call__`` applies by default (a fixed preamble put in front of every caption;
  only the BOS token and the last ``max_sequence_length - 1`` tokens are kept, so the caption,
  not the preamble, fills the window) and right padding; the Gemma2 last hidden states and their
  attention mask both reach the transformer (its cross-attention reads the mask). Validation
  passes the same instruction and length explicitly, so training and inference agree. The
  `tiny` model uses a one-line instruction of the same form, keeping its text encoder fast;
- latents are DC-AE latents times ``scaling_factor`` (no shift, no posterior: ``encode`` is
  deterministic), 32x smaller than the image (``2 ** (stages - 1)``; the `tiny` DC-AE has four
  stages, 8x, so 64 px images give 8x8 latents);
- the objective is rectified flow (flow.py): Sana's scheduler is DPMSolverMultistepScheduler
  with ``prediction_type="flow_prediction"`` and ``use_flow_sigmas``: its sigmas are shifted by
  the static ``flow_shift`` (3 for the 1024 px checkpoints; the key is not flow.py's ``shift``),
  timesteps are ``sigma * 1000`` and the transformer predicts the velocity ``noise - x``;
- the plain pipeline scales the timestep by the transformer's ``timestep_scale`` (1 for Sana),
  the ControlNet pipeline does not: ``predict`` does what the pipeline in use does;
- the ControlNet takes the DC-AE latents of the conditioning image (pixels in [-1, 1]), adds
  them through its zero-initialised ``input_block`` after its own patch embedding, and its
  ``controlnet_blocks`` outputs are added after transformer blocks 1..N.

diffusers has no ``from_transformer`` for SanaControlNetModel; a fresh one is built as the other
ControlNets are: the transformer's config with fewer blocks (7, the Sana ControlNet checkpoints'
depth, at most one less than the transformer: the output after the last block is never used),
its patch embedding, time and caption embeddings and first blocks copied, and the output
projections (``input_block``, ``controlnet_blocks``) left at zero.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    SanaControlNetModel,
    SanaControlNetPipeline,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import Gemma2Config, Gemma2Model

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import FlowMatchingFamily, load_model, load_pipeline
from slider_cn.families.tiny_tokenizer import build_tiny_gemma_tokenizer
from slider_cn.targets.spec import QKVO, SELF_ATTN1, ArchitectureTargets

log = logging.getLogger(__name__)

# The instruction SanaPipeline.__call__ puts in front of every prompt unless told otherwise.
PIPELINE_INSTRUCTION: tuple[str, ...] = tuple(
    inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
)
# The tiny model's: the same form (the caption follows "User Prompt: "), one line long.
TINY_INSTRUCTION: tuple[str, ...] = ("Describe the picture.", "User Prompt: ")
# The 1024 px Sana checkpoints' scheduler (scheduler/scheduler_config.json).
SANA_FLOW_SHIFT = 3.0
# DC-AE f32c32's scaling factor (vae/config.json of the Sana checkpoints).
DCAE_SCALING = 0.41407
# The Sana ControlNet checkpoints' depth (SanaControlNetModel's default num_layers).
CONTROLNET_LAYERS = 7
TINY_LATENT_CHANNELS = 4


def sana_scheduler(flow_shift: float = SANA_FLOW_SHIFT) -> DPMSolverMultistepScheduler:
    """Sana's scheduler: flow-matching DPM-Solver++ (2nd order) with shifted flow sigmas."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        final_sigmas_type="zero",
    )


def tiny_dcae() -> AutoencoderDC:
    """A DC-AE with four plain ResBlock stages (8x; the real one has six, 32x)."""
    stages = 4
    return AutoencoderDC(
        in_channels=3,
        latent_channels=TINY_LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16, 16, 16),
        decoder_block_out_channels=(8, 16, 16, 16),
        encoder_layers_per_block=(1,) * stages,
        decoder_layers_per_block=(1,) * stages,
        encoder_qkv_multiscales=((),) * stages,
        decoder_qkv_multiscales=((),) * stages,
        scaling_factor=DCAE_SCALING,
    )


class SanaFamily(FlowMatchingFamily):
    name = "sana"
    description = "Sana (SanaTransformer2DModel, Gemma2 text encoder, DC-AE)"
    denoiser_model_class = SanaTransformer2DModel
    targets = ArchitectureTargets(
        slider=(
            *SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=QKVO,
        controlnet_slider=(
            *SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "input_block"),
        note="Self-attention (Sana's linear attention) is `attn1`; the patch embedding and the "
        "timestep MLP under `time_embed.emb` stand in for conv_in and time_embedding. The "
        "cross-attention `attn2` and the `caption_projection` are never adapted; nor are the "
        "GLUMBConv feed-forwards (`ff.conv_*`), which the guide's list leaves out. On the "
        "ControlNet the patch embedding embeds both the latents and the conditioning latents.",
    )
    pipeline_class = SanaPipeline
    controlnet_pipeline_class = SanaControlNetPipeline
    controlnet_model_class = SanaControlNetModel
    max_sequence_length_default = 300  # SanaPipeline's default
    max_sequence_length_tiny = 32

    @property
    def vae_scale_factor(self) -> int:
        return 8 if self.config.is_tiny else 32

    @property
    def complex_human_instruction(self) -> list[str]:
        return list(TINY_INSTRUCTION if self.config.is_tiny else PIPELINE_INSTRUCTION)

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_gemma_tokenizer(2048)
        with seeded(seed):
            text_encoder = Gemma2Model(
                Gemma2Config(
                    vocab_size=len(tokenizer),
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=2048,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                )
            )
            vae = tiny_dcae()
            transformer = SanaTransformer2DModel(
                in_channels=TINY_LATENT_CHANNELS,
                out_channels=TINY_LATENT_CHANNELS,
                num_attention_heads=2,
                attention_head_dim=16,
                num_layers=2,
                num_cross_attention_heads=2,
                cross_attention_head_dim=16,
                cross_attention_dim=32,
                caption_channels=16,  # the text encoder's width
                sample_size=8,
                patch_size=1,
            )
        return Components(transformer, vae, [text_encoder], [tokenizer], sana_scheduler())

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(SanaPipeline, path, self.load_dtype, "Sana pipeline")
        if pipe.transformer.config.get("guidance_embeds"):
            raise ConfigError(
                f"{path} is a Sana Sprint model (a guidance-embedding transformer sampled in one "
                "to four SCM steps by SanaSprintPipeline); the sana family trains SanaPipeline "
                "models"
            )
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    def load_controlnet(self, path: str) -> torch.nn.Module:
        """A SanaControlNetModel folder or hub id, or a SanaControlNetPipeline one (the
        published Sana ControlNets ship as whole pipelines, the ControlNet under controlnet/)."""
        try:
            return load_model(SanaControlNetModel, path, self.load_dtype, "Sana ControlNet")
        except ConfigError:
            try:
                return SanaControlNetModel.from_pretrained(
                    path, subfolder="controlnet", torch_dtype=self.load_dtype
                )
            except (OSError, ValueError, TypeError):
                pass
            raise

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        accepted = inspect.signature(SanaControlNetModel.__init__).parameters
        config = {k: v for k, v in denoiser.config.items() if k in accepted}
        config["num_layers"] = max(1, min(CONTROLNET_LAYERS, denoiser.config.num_layers - 1))
        controlnet = SanaControlNetModel(**config)
        with torch.no_grad():
            for part in ("patch_embed", "time_embed", "caption_projection", "caption_norm"):
                getattr(controlnet, part).load_state_dict(getattr(denoiser, part).state_dict())
            for block, source in zip(
                controlnet.transformer_blocks, denoiser.transformer_blocks, strict=False
            ):
                missing, unexpected = block.load_state_dict(source.state_dict(), strict=False)
                if missing or unexpected:
                    # SanaControlNetModel's blocks take no qk_norm (Sana 1.5 has one)
                    log.warning(
                        "the fresh Sana ControlNet's blocks differ from the transformer's "
                        "(not copied: %s): they start from the rest of the copy",
                        ", ".join([*missing, *unexpected]),
                    )
        return controlnet

    # --- encoding ------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def conditioning_latents(self, components, conditioning_pixels, *, shift: bool = True):
        """Conditioning pixels in [0, 1] -> the latents SanaControlNetPipeline gives its
        ControlNet (normalised to [-1, 1], DC-AE, times the scaling factor)."""
        return self.encode_images(components, conditioning_pixels * 2.0 - 1.0)

    def initial_noise(self, components, batch, resolution, generator):
        vae = components.vae.config
        side = resolution // 2 ** (len(vae.encoder_block_out_channels) - 1)
        return torch.randn((batch, vae.latent_channels, side, side), generator=generator)

    def text_pipeline(self, components: Components) -> SanaPipeline:
        return SanaPipeline(
            tokenizer=components.tokenizers[0],
            text_encoder=components.text_encoders[0],
            vae=None,
            transformer=None,
            scheduler=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.text_pipeline(components).encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self._text_device(components),
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.complex_human_instruction,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    # --- the objective -----------------------------------------------------------------------
    def _shift(self, components: Components, u: torch.Tensor, latents: torch.Tensor):
        sched = components.noise_scheduler.config
        if self.config.flow_schedule_shift is not None:
            shift = float(self.config.flow_schedule_shift)
        elif self.config.flow_schedule_auto_shift or sched.get("use_dynamic_shifting", False):
            # The exponential time shift with mu from the latent token count (patch 1 or 2),
            # which is the static shift exp(mu).
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            patch = int(components.denoiser.config.patch_size)
            seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            shift = math.exp(
                calculate_shift(
                    seq_len,
                    sched.get("base_image_seq_len", 256),
                    sched.get("max_image_seq_len", 4096),
                    sched.get("base_shift", 0.5),
                    sched.get("max_shift", 1.15),
                )
            )
        else:
            # DPMSolverMultistepScheduler's flow_shift; a FlowMatchEuler scheduler's shift
            shift = float(sched.get("flow_shift", sched.get("shift", 1.0)))
        return shift * u / (1 + (shift - 1) * u)

    # --- forward -------------------------------------------------------------------------
    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        controlnet = components.controlnet
        control = self.conditioning_latents(components, conditioning_pixels)
        samples = controlnet(
            noisy.to(controlnet.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(controlnet.dtype),
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=timesteps,  # SanaControlNetPipeline applies no timestep_scale
            controlnet_cond=control,
            conditioning_scale=scale,
            return_dict=False,
        )[0]
        return {"controlnet_block_samples": tuple(s.to(noisy.dtype) for s in samples)}

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        transformer = components.denoiser
        if not residuals:
            timesteps = timesteps * transformer.config.timestep_scale  # as SanaPipeline
        return transformer(
            noisy.to(transformer.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(transformer.dtype),
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=timesteps,
            return_dict=False,
            **(residuals or {}),
        )[0]

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict:
        return dict(
            tokenizer=components.tokenizers[0],
            text_encoder=components.text_encoders[0],
            vae=components.vae,
            transformer=components.denoiser,
            scheduler=components.noise_scheduler,
        )

    def pipeline(self, components: Components) -> SanaPipeline:
        return SanaPipeline(**self._pipeline_parts(components))

    def controlnet_pipeline(self, components: Components) -> SanaControlNetPipeline:
        return SanaControlNetPipeline(
            **self._pipeline_parts(components), controlnet=components.controlnet
        )

    def validation_pipeline(self, components: Components):
        # Sana samples with its own scheduler class (DPM-Solver++ on flow sigmas), not flow.py's
        # FlowMatchEuler, which would read no flow_shift from this config.
        scheduler = type(components.noise_scheduler).from_config(components.noise_scheduler.config)
        view = dataclasses.replace(components, noise_scheduler=scheduler)
        if components.controlnet is not None:
            return self.controlnet_pipeline(view)
        return self.pipeline(view)

    def validation_call_kwargs(self, prompt: str, conditioning_image: Any, config) -> dict:
        kwargs = super().validation_call_kwargs(prompt, conditioning_image, config)
        kwargs["complex_human_instruction"] = self.complex_human_instruction
        # Render at the training resolution: binning would snap it to the model's aspect-ratio
        # table (e.g. 512 px on a 1024 px model renders at 1024 and resizes back).
        kwargs["use_resolution_binning"] = False
        return kwargs
