"""Chroma (`chroma`): Flux.1-schnell's double/single-stream layout, T5 only, no pooled text.

Chroma is Flux.1 with the CLIP encoder and the pooled-text/guidance embedding removed: the
modulations of every block come from ``distilled_guidance_layer``, an MLP ("approximator") over
the timestep alone. What training shares with `flux` (slider_cn/families/flux.py, whose helpers
it reuses): latents packed into 2x2 patches for the transformer and unpacked everywhere else,
Flux.1's 16-channel VAE, position ids per patch and per text token (zeros), the timestep as
sigma (t / 1000), and the resolution-dependent shift of the scheduler (``use_dynamic_shifting``:
``mu`` from the packed token count, as ChromaPipeline computes it). What differs, as
ChromaPipeline does it:

- prompts: T5 *with* its attention mask; the transformer then attends to the caption's tokens
  and the first padding token only (``encode_prompt`` returns that mask, and the pipeline
  appends ones for the image tokens);
- no pooled text and no guidance input: ChromaPipeline's ``guidance_scale`` is real
  classifier-free guidance (an empty negative prompt), 5 by default.

What the slider adapts: as `flux` — the double-stream blocks' image attention
(``attn.to_q/k/v/to_out.0``), the single-stream blocks' ``attn.to_q/k/v`` and ``proj_out`` (their
fused attention + MLP output), ``x_embedder`` and the final ``proj_out`` — with the approximator's
input and output projections (``distilled_guidance_layer.in_proj`` / ``out_proj``) in place of
Flux's timestep MLP. The text stream (``add_*_proj``, ``to_add_out``, ``ff_context``,
``context_embedder``) is never adapted. diffusers has no Chroma ControlNet: LoRA mode only.
"""

from __future__ import annotations

import torch
from diffusers import (
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)

from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.flux import FLUX_VAE_SCALING, FLUX_VAE_SHIFT, pack, unpack
from slider_cn.families.sd3 import tiny_t5
from slider_cn.families.tiny_tokenizer import build_tiny_t5_tokenizer
from slider_cn.targets.spec import ATTN, JOINT_TEXT, QKVO, ArchitectureTargets


class ChromaFamily(FlowMatchingFamily):
    name = "chroma"
    description = "Chroma (ChromaTransformer2DModel, T5 with attention mask, packed latents)"
    denoiser_model_class = ChromaTransformer2DModel
    targets = ArchitectureTargets(
        slider=(
            *ATTN,
            "proj_out",  # single blocks' attention+MLP output, and the final projection
            "x_embedder",
            "distilled_guidance_layer.in_proj",
            "distilled_guidance_layer.out_proj",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        note="As flux; Chroma has no pooled text: its timestep embedding is the "
        "`distilled_guidance_layer` approximator, whose input and output projections stand in "
        "for Flux's `time_text_embed.timestep_embedder`.",
    )
    pipeline_class = ChromaPipeline
    max_sequence_length_default = 512  # ChromaPipeline's default
    max_sequence_length_tiny = 32

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_t5_tokenizer(self.max_sequence_length_tiny)
        with seeded(seed):
            t5 = tiny_t5(tokenizer, d_model=32)
            vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)  # Chroma uses Flux.1's VAE
            transformer = ChromaTransformer2DModel(
                patch_size=1,
                in_channels=4 * TINY_LATENT_CHANNELS,  # 2x2-packed latents
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,  # T5 width
                axes_dims_rope=(2, 2, 4),
                approximator_num_channels=16,
                approximator_hidden_dim=32,
                approximator_layers=1,
            )
        # Chroma1-HD's scheduler (Flux.1's): the shift grows with the image's token count.
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return Components(transformer, vae, [t5], [tokenizer], scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(ChromaPipeline, path, self.load_dtype, "Chroma pipeline")
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> ChromaPipeline:
        return ChromaPipeline(
            scheduler=None,
            vae=None,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, mask, *_ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            device=self._text_device(components),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        # the caption's tokens and the first padding token (the pipeline's mask)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    # --- forward -------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, residuals=None):
        b, _, h, w = noisy.shape
        embeds, mask = cond["prompt_embeds"], cond["prompt_attention_mask"]
        image_tokens = (h // 2) * (w // 2)
        # ChromaPipeline._prepare_attention_mask: the text mask, then every image token
        attention_mask = torch.cat(
            [mask, torch.ones(b, image_tokens, device=mask.device, dtype=torch.bool)], dim=1
        )
        out = components.denoiser(
            hidden_states=pack(noisy),
            timestep=(timesteps.float() / 1000).to(noisy.dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=embeds.dtype),
            img_ids=ChromaPipeline._prepare_latent_image_ids(
                b, h // 2, w // 2, noisy.device, noisy.dtype
            ),
            attention_mask=attention_mask,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    # --- pipelines -----------------------------------------------------------------------
    def pipeline(self, components: Components) -> ChromaPipeline:
        return ChromaPipeline(
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=components.denoiser,
        )
