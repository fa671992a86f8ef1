"""Flux.2 [dev] (`flux2`): double/single-stream transformer, Mistral Small 3 text encoder.

Conventions of Flux2Pipeline that training follows:

- latents: the VAE (AutoencoderKLFlux2, 32 channels) latent is patchified 2x2 into 4x the
  channels at half the size and normalised per channel with the VAE's batch-norm statistics
  (``vae.bn``), as ``Flux2Pipeline._encode_vae_image`` does. slider-cn keeps latents in that
  layout, (B, 4C, H/16, W/16): noise is drawn there (as ``prepare_latents`` draws it), and
  ``predict`` packs it into one token per cell with position ids (T, H, W, L) as the pipeline does;
- prompts: the chat-formatted prompt (with the pipeline's system message) through
  Mistral3ForConditionalGeneration, hidden states of layers 10, 20 and 30 stacked on the width
  (``encode_prompt``); text position ids come from ``_prepare_text_ids``;
- the timestep is sigma (t / 1000); FLUX.2 [dev] is guidance-distilled (``guidance_embeds``):
  its guidance input gets ``flux_guidance_value`` in training and ``validation_guidance``
  (the pipeline's ``guidance_scale``, 4 by default) at validation;
- the noise schedule: the scheduler is FLUX.1-dev's (``use_dynamic_shifting``), but Flux2Pipeline
  does not use its base/max shift: it computes ``mu = compute_empirical_mu(image_seq_len,
  num_inference_steps)`` (BFL's fit, which depends on the step count below 4300 image tokens)
  and shifts with the scheduler's ``time_shift``. Training draws sigma with the ``mu`` of the
  pipeline's default 50 steps (``MU_STEPS``); ``sampling_timesteps(steps)`` uses the step count it
  is given, as a pipeline call with that many steps would.

What the slider adapts: the double-stream blocks' image attention (``attn.to_q/k/v/to_out.0``),
and in the single-stream blocks the fused input projection ``attn.to_qkv_mlp_proj`` and the fused
output ``attn.to_out``; plus ``x_embedder``, the timestep MLP and ``proj_out``. The fused
projection computes q, k, v *and* the MLP input of the parallel block in one Linear, so a LoRA on
it also adapts the single blocks' MLP input: a LoRA cannot adapt only some rows of a Linear. It
is adapted anyway, because (1) the single blocks are 48 of FLUX.2 [dev]'s 56 blocks, and without
it a slider could not change their attention at all, only rescale what leaves them; (2) the
fused output ``attn.to_out`` (attention *and* MLP out, Flux.1's ``proj_out``) is adapted in every
Flux list already, so the MLP path is not left alone either way; (3) nothing in it is text-only:
single blocks process the joint [text; image] sequence, as Flux.1's single-block ``to_q/k/v`` do;
(4) it is where Flux.2 LoRAs adapt the single blocks (diffusers' own Flux.2 LoRA tests
target ``to_qkv_mlp_proj``), so the slider's file has the layout other Flux.2 loaders expect.
The text stream (``add_*_proj``, ``to_add_out``, ``ff_context``, ``context_embedder``) and the
guidance embedder are never adapted.

`tiny`: the real classes (Mistral3ForConditionalGeneration with 30 text layers of width 16, so
the pipeline's default layers 10/20/30 exist; a Pixtral processor over a byte-level Mistral-style
tokenizer in which the pipeline's system message is one token; AutoencoderKLFlux2 with non-trivial
batch-norm statistics).

FLUX.2 [klein] (Qwen3 text encoder, Flux2KleinPipeline, real CFG) is a different pipeline and
is refused with that reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
)

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import FlowMatchingFamily, load_pipeline
from slider_cn.families.tiny_tokenizer import MISTRAL_CHAT_TEMPLATE, build_tiny_mistral_tokenizer
from slider_cn.targets.spec import ATTN, JOINT_TEXT, QKVO, ArchitectureTargets

# The pipeline's default step count, whose mu training's noise levels follow.
MU_STEPS = 50
# The text encoder layers Flux2Pipeline stacks (its text_encoder_out_layers default).
TEXT_LAYERS = (10, 20, 30)
TINY_LATENT_CHANNELS = 4
TINY_WIDTH = 16  # the tiny text encoder's width; the prompt embedding is 3x that


def tiny_flux2_vae(seed: int) -> AutoencoderKLFlux2:
    """A small AutoencoderKLFlux2 (8x spatial, 2x2 patches), with batch-norm statistics that are
    not the identity, so that the normalisation is exercised."""
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    )
    generator = torch.Generator().manual_seed(seed)
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
    vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae


def tiny_mistral3(tokenizer) -> Mistral3ForConditionalGeneration:
    """Mistral3ForConditionalGeneration with 30 text layers (the pipeline reads layers 10, 20
    and 30) of width 16, and a one-layer Pixtral vision tower that text prompts never run."""
    return Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=MistralConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_WIDTH,
                intermediate_size=2 * TINY_WIDTH,
                num_hidden_layers=max(TEXT_LAYERS),
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            vision_config=PixtralVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=8,
                image_size=32,
                patch_size=16,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=2,
        )
    )


def tiny_pixtral_processor(max_length: int) -> PixtralProcessor:
    # The pipeline's system message is one token, so the caption fits a short sequence.
    tokenizer = build_tiny_mistral_tokenizer(max_length, phrases=(SYSTEM_MESSAGE,))
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(),
        tokenizer=tokenizer,
        patch_size=16,
        spatial_merge_size=2,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def _pipeline_name(path: str) -> str | None:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text()).get("_class_name")


class Flux2Family(FlowMatchingFamily):
    name = "flux2"
    description = (
        "Flux.2 [dev] (Flux2Transformer2DModel, Mistral Small 3 text encoder, patchified latents, "
        "guidance input)"
    )
    denoiser_model_class = Flux2Transformer2DModel
    targets = ArchitectureTargets(
        slider=(
            *ATTN,  # double-stream blocks: the image stream's attention
            "single_transformer_blocks.*.attn.to_qkv_mlp_proj",  # fused q/k/v + MLP input
            "single_transformer_blocks.*.attn.to_out",  # fused attention + MLP output (no `.0`)
            "x_embedder",
            "time_guidance_embed.timestep_embedder.linear_1",
            "time_guidance_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(
            *QKVO,
            *JOINT_TEXT,
            "to_qkv_mlp_proj",
            "single_transformer_blocks.*.attn.to_out",
        ),
        note="Double blocks use `attn.to_q/k/v/to_out.0`; single blocks fuse q/k/v and the MLP "
        "input into `attn.to_qkv_mlp_proj` and project out with `attn.to_out` (no `.0`). The "
        "slider adapts the fused projection, and with it the single blocks' MLP input: a LoRA "
        "cannot take only its q/k/v rows, and without it the 48 single blocks' attention could "
        "not change (the fused output already carries the MLP in every Flux list).",
    )
    pipeline_class = Flux2Pipeline
    max_sequence_length_default = 512  # Flux2Pipeline's default
    max_sequence_length_tiny = 64  # chat markers and the system message (one token) take 6

    @property
    def vae_scale_factor(self) -> int:
        return 16  # 8x VAE, then 2x2 patches: one latent cell per 16x16 pixels

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        processor = tiny_pixtral_processor(self.max_sequence_length_tiny)
        with seeded(seed):
            text_encoder = tiny_mistral3(processor.tokenizer)
            vae = tiny_flux2_vae(seed)
            transformer = Flux2Transformer2DModel(
                patch_size=1,
                in_channels=4 * TINY_LATENT_CHANNELS,  # 2x2-patchified latents
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=len(TEXT_LAYERS) * TINY_WIDTH,
                timestep_guidance_channels=32,
                axes_dims_rope=(2, 2, 2, 2),
                guidance_embeds=True,  # like FLUX.2 [dev]
            )
        # FLUX.2 [dev] ships FLUX.1-dev's scheduler; its pipeline computes mu itself.
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return Components(transformer, vae, [text_encoder], [processor], scheduler)

    def load_pretrained(self, path: str) -> Components:
        found = _pipeline_name(path)
        if found is not None and found != "Flux2Pipeline":
            raise ConfigError(self._not_flux2_dev(path, found))
        pipe = load_pipeline(Flux2Pipeline, path, self.load_dtype, "Flux.2 pipeline")
        if not isinstance(pipe.text_encoder, Mistral3ForConditionalGeneration):
            raise ConfigError(self._not_flux2_dev(path, type(pipe.text_encoder).__name__))
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    @staticmethod
    def _not_flux2_dev(path: str, found: str) -> str:
        return (
            f"{path} is not a FLUX.2 [dev] pipeline ({found}): the flux2 family trains "
            "Flux2Pipeline models (Mistral Small 3 text encoder, guidance-distilled); FLUX.2 "
            "[klein] (Flux2KleinPipeline, Qwen3 text encoder, classifier-free guidance) is not "
            "supported yet"
        )

    # --- latents ---------------------------------------------------------------------------
    def _vae_pipeline(self, components: Components) -> Flux2Pipeline:
        return Flux2Pipeline(
            scheduler=None, vae=components.vae, text_encoder=None, tokenizer=None, transformer=None
        )

    @torch.no_grad()
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        # the distribution's mode, patchified and batch-normalised, as the pipeline encodes
        return self._vae_pipeline(components)._encode_vae_image(pixels, generator=None)

    def initial_noise(self, components, batch, resolution, generator):
        vae = components.vae.config
        channels = vae.latent_channels * math.prod(vae.patch_size)
        side = resolution // (2 ** (len(vae.block_out_channels) - 1) * 2)
        return torch.randn((batch, channels, side, side), generator=generator)

    # --- the noise schedule -----------------------------------------------------------------
    def _shift(self, components, u, latents, steps: int | None = None):
        scheduler = components.noise_scheduler
        sched = scheduler.config
        if self.config.flow_schedule_shift is not None:
            shift = float(self.config.flow_schedule_shift)
            return shift * u / (1 + (shift - 1) * u)
        if not (sched.get("use_dynamic_shifting", False) or self.config.flow_schedule_auto_shift):
            shift = float(sched.get("shift", 1.0))
            return shift * u / (1 + (shift - 1) * u)
        # As Flux2Pipeline computes it: one image token per cell of the patchified latent.
        seq_len = latents.shape[-2] * latents.shape[-1]
        mu = compute_empirical_mu(image_seq_len=seq_len, num_steps=steps or MU_STEPS)
        return scheduler.time_shift(mu, 1.0, u)

    def sampling_timesteps(self, components, steps, latents):
        u = torch.linspace(1.0, 0.0, steps + 1)
        sigmas = self._shift(components, u, latents, steps=steps).float().clamp(0.0, 1.0)
        return (sigmas * self.num_train_timesteps(components)).to(latents.device)

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> Flux2Pipeline:
        return Flux2Pipeline(
            scheduler=None,
            vae=None,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            device=self._text_device(components),
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=TEXT_LAYERS,
        )
        return {"prompt_embeds": embeds}

    # --- forward -------------------------------------------------------------------------
    def _guidance(self, model: torch.nn.Module, noisy: torch.Tensor) -> torch.Tensor | None:
        if not model.config.guidance_embeds:
            return None
        return torch.full(
            (noisy.shape[0],), self.config.flux_guidance_value, device=noisy.device
        ).float()

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        b, c, h, w = noisy.shape
        embeds = cond["prompt_embeds"]
        out = components.denoiser(
            hidden_states=Flux2Pipeline._pack_latents(noisy),  # (B, H*W, C)
            encoder_hidden_states=embeds,
            timestep=(timesteps.float() / 1000).to(noisy.dtype),
            img_ids=Flux2Pipeline._prepare_latent_ids(noisy).to(noisy.device),
            txt_ids=Flux2Pipeline._prepare_text_ids(embeds).to(noisy.device),
            guidance=self._guidance(components.denoiser, noisy),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    # --- pipelines -----------------------------------------------------------------------
    def pipeline(self, components: Components) -> Flux2Pipeline:
        return Flux2Pipeline(
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=components.denoiser,
        )

    def validation_call_kwargs(self, prompt, conditioning_image, config) -> dict:
        kwargs = super().validation_call_kwargs(prompt, conditioning_image, config)
        kwargs["text_encoder_out_layers"] = TEXT_LAYERS
        return kwargs
