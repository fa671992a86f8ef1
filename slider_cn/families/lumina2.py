"""Lumina-Image 2.0 (`lumina2`): a unified single-stream transformer, Gemma2 text encoder.

Conventions of Lumina2Pipeline that training follows:

- prompts are encoded by the pipeline's own ``encode_prompt``: the system prompt and
  `` <Prompt Start> `` go in front of the caption, Gemma2's penultimate hidden states are taken,
  padded to ``max_sequence_length`` (256 by default, the system prompt included) with an
  attention mask, which the transformer reads to drop the padding;
- the transformer takes unpacked latents (B, C, H, W) and patchifies them itself; its time runs
  the other way from the scheduler's: the pipeline passes ``1 - t / 1000`` (1 = clean), and the
  transformer predicts ``x - noise``, which the pipeline negates into the scheduler's velocity
  ``noise - x`` before each Euler step (so ``predict`` negates it too);
- the pipeline shifts its sigmas with the scheduler's static ``shift`` (Lumina-Image 2.0 uses
  no dynamic shifting); training shifts its sampled sigmas the same way (flow.py). With a
  dynamic-shifting scheduler, Lumina2Pipeline (diffusers 0.42.1) would compute ``mu`` from
  ``latents.shape[1]``, the channel count, not the token count training uses: loading such a
  checkpoint warns.

The slider adapts the attention of the noise refiner and of the joint layers (which attend over
the caption and image tokens together, as Z-Image's do), the patch embedder, the timestep MLP
and the final projection; the caption's own path (``time_caption_embed.caption_embedder`` and
the ``context_refiner`` blocks) is never adapted. diffusers has no Lumina 2 ControlNet: LoRA
mode only.
"""

from __future__ import annotations

import logging

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
from transformers import Gemma2Config, Gemma2Model

from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.flux import FLUX_VAE_SCALING, FLUX_VAE_SHIFT
from slider_cn.families.tiny_tokenizer import build_tiny_gemma_tokenizer
from slider_cn.targets.spec import ATTN, QKVO, ArchitectureTargets

log = logging.getLogger(__name__)

# Lumina-Image 2.0's scheduler: a static shift of 6 (scheduler/scheduler_config.json).
LUMINA2_SHIFT = 6.0


class Lumina2Family(FlowMatchingFamily):
    name = "lumina2"
    description = "Lumina-Image 2.0 (Lumina2Transformer2DModel, Gemma2 text encoder)"
    denoiser_model_class = Lumina2Transformer2DModel
    pipeline_class = Lumina2Pipeline
    targets = ArchitectureTargets(
        slider=(
            *ATTN,
            "x_embedder",
            "time_caption_embed.timestep_embedder.linear_1",
            "time_caption_embed.timestep_embedder.linear_2",
            "norm_out.linear_2",  # the final projection to latent patches
        ),
        ordinary=QKVO,
        note="The guide's general list matches nothing here: attention is `attn.*` in the "
        "main layers and the noise refiner (the caption's `context_refiner` is never adapted), "
        "there is no proj/conv in/out and the timestep MLP lives in `time_caption_embed`.",
    )
    # Lumina2Pipeline's default; the system prompt alone is ~165 byte tokens in `tiny`, so the
    # tiny model keeps the real length and the caption is not truncated away.
    max_sequence_length_default = 256
    max_sequence_length_tiny = 256

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_gemma_tokenizer(self.max_sequence_length_tiny)
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
                    max_position_embeddings=512,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
            vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)  # Lumina 2 uses Flux's VAE
            transformer = Lumina2Transformer2DModel(
                sample_size=8,  # 64 px
                patch_size=2,
                in_channels=TINY_LATENT_CHANNELS,
                hidden_size=32,
                num_layers=2,
                num_refiner_layers=1,
                num_attention_heads=2,
                num_kv_heads=1,
                multiple_of=16,
                cap_feat_dim=16,  # the text encoder's width
                axes_dim_rope=(8, 4, 4),  # sums to the head width, 32 / 2
                # caption positions (up to 256 tokens) come before the image's
                axes_lens=(320, 32, 32),
            )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=LUMINA2_SHIFT)
        return Components(transformer, vae, [text_encoder], [tokenizer], scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(Lumina2Pipeline, path, self.load_dtype, "Lumina 2 pipeline")
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            log.warning(
                "%s: the scheduler shifts dynamically; Lumina2Pipeline computes that shift from "
                "the latent channel count, training from the latent token count, so validation "
                "samples at other noise levels than training used",
                path,
            )
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> Lumina2Pipeline:
        return Lumina2Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            device=self._text_device(components),
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask.to(embeds.dtype)}

    # --- forward -------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, residuals=None):
        # The pipeline's 1 - t / 1000 (float32, as the pipeline passes it): the transformer's
        # time runs from noise (0) to data (1).
        t = (1.0 - self.sigmas(components, timesteps)).to(noisy.device)
        out = components.denoiser(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=cond["prompt_embeds"],
            # the tokenizer's integer mask, as the pipeline passes it (the cache stores floats)
            encoder_attention_mask=cond["prompt_attention_mask"].round().long(),
            return_dict=False,
        )[0]
        return -out  # x - noise -> the scheduler's velocity noise - x

    # --- pipelines -----------------------------------------------------------------------
    def pipeline(self, components: Components) -> Lumina2Pipeline:
        return Lumina2Pipeline(
            transformer=components.denoiser,
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
        )
