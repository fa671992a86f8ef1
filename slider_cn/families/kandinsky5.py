"""Kandinsky 5 text-to-image (`kandinsky5`): a text-then-visual transformer, Qwen2.5-VL + CLIP.

Conventions of Kandinsky5T2IPipeline that training follows:

- the transformer reads latents channels-last with a frame axis, (B, 1, H, W, C), patchifies
  them itself (1x2x2) and returns the same layout; slider-cn keeps (B, C, H, W) everywhere
  else (cache, noise, target, loss) and ``predict`` converts both ways;
- its time is the scheduler's timestep, ``sigma * 1000`` (cast to the transformer's dtype, as
  the pipeline does), and it predicts the scheduler's velocity ``noise - x`` directly;
- latents are the VAE's (Flux's 16-channel AutoencoderKL) times ``scaling_factor`` with no
  ``shift_factor``: the pipeline decodes ``latents / scaling_factor`` and never shifts, so
  ``encode_images`` does not shift either (unlike the other Flux-VAE families);
- prompts go through the pipeline's own ``encode_prompt``: a system-prompt chat template, the
  Qwen2.5-VL last hidden states with the template's 40 tokens dropped, and CLIP's pooled
  embedding. The transformer takes no text mask, so a batch the pipeline pads to its longest
  prompt attends to the padding; inference renders one prompt (and its negative) at a time,
  unpadded. Training does what that inference does: each prompt is encoded alone, the cache
  pads with a ``prompt_mask``, and ``predict`` runs each caption length unpadded;
- the scheduler shift is static (3.0 for Kandinsky 5.0 T2I Lite), as in flow.py;
- the pipeline renders only its listed resolutions (it snaps any other size to the nearest
  aspect ratio's 1024-px entry); validation adds the validation size to its pipeline's list so
  it renders what training trained.

The slider adapts the visual stream only: the visual blocks' self-attention, the visual patch
embedding, the timestep MLP and the final projection. The text blocks, the text and pooled-text
embeddings and every visual block's cross-attention are never adapted. The pipeline runs
full attention (no sparse/NABLA parameters) for text-to-image; the tiny model's config is
``attention_type="regular"`` too. diffusers has no Kandinsky 5 ControlNet: LoRA mode only.
"""

from __future__ import annotations

import dataclasses

import torch
from accelerate.utils import extract_model_from_parallel as unwrap_model
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5T2IPipeline,
    Kandinsky5Transformer3DModel,
)
from diffusers.pipelines.kandinsky5.pipeline_output import KandinskyImagePipelineOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.flux import FLUX_VAE_SCALING, FLUX_VAE_SHIFT
from slider_cn.families.sd3 import tiny_clip_config
from slider_cn.families.tiny_tokenizer import build_tiny_qwen_vl_processor, build_tiny_tokenizer
from slider_cn.targets.spec import ArchitectureTargets

# Kandinsky 5.0 T2I's sampler shift (its reference pipeline's scheduler_scale).
KANDINSKY5_SHIFT = 3.0


def to_transformer_layout(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W, C), the pipeline's latent layout."""
    return latents.unsqueeze(1).permute(0, 1, 3, 4, 2)


def from_transformer_layout(latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W, C) -> (B, C, H, W)."""
    return latents.permute(0, 1, 4, 2, 3).squeeze(1)


def tiny_qwen25_vl(processor) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with a 2-layer, 16-wide language model (and a one-block vision tower, which
    text prompts never reach); its multimodal rotary sections split the 8-wide heads."""
    tokenizer = processor.tokenizer
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=16,
            fullatt_block_indexes=[0],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


class ValidationPipeline(Kandinsky5T2IPipeline):
    """Kandinsky5T2IPipeline whose output names its pictures ``images``, as every other
    pipeline's does (diffusers 0.42.1's KandinskyImagePipelineOutput calls them ``image``)."""

    def __call__(self, *args, **kwargs):
        output = super().__call__(*args, **kwargs)
        if isinstance(output, KandinskyImagePipelineOutput):
            return ImagePipelineOutput(images=output.image)
        return output


class Kandinsky5Family(FlowMatchingFamily):
    name = "kandinsky5"
    description = (
        "Kandinsky 5 text-to-image (Kandinsky5Transformer3DModel, Qwen2.5-VL + CLIP-L pooled)"
    )
    denoiser_model_class = Kandinsky5Transformer3DModel
    pipeline_class = Kandinsky5T2IPipeline
    targets = ArchitectureTargets(
        slider=(
            "visual_transformer_blocks.*.self_attention.to_query",
            "visual_transformer_blocks.*.self_attention.to_key",
            "visual_transformer_blocks.*.self_attention.to_value",
            "visual_transformer_blocks.*.self_attention.out_layer",
            "visual_embeddings.in_layer",
            "time_embeddings.in_layer",
            "time_embeddings.out_layer",
            "^out_layer.out_layer",
        ),
        ordinary=("to_query", "to_key", "to_value"),  # text and cross-attention included
        exclude=("pooled_text_embeddings",),
        note="The guide's Kandinsky 5 list (`attn1.to_query`, `conv_in`, `time_embedding.*`) "
        "matches nothing: self-attention is `self_attention.*` in the visual blocks, "
        "embeddings are `visual_embeddings` / `time_embeddings`, the output `out_layer`. The "
        "text blocks, text embeddings and `cross_attention` are never adapted.",
    )
    max_sequence_length_default = 512  # Kandinsky5T2IPipeline's default
    max_sequence_length_tiny = 64

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        template = Kandinsky5T2IPipeline(*([None] * 7))  # the pipeline's prompt template
        processor = build_tiny_qwen_vl_processor(
            template.prompt_template_encode_start_idx + self.max_sequence_length_tiny,
            words_of=template.prompt_template,
        )
        clip_tokenizer = build_tiny_tokenizer()
        with seeded(seed):
            qwen = tiny_qwen25_vl(processor)
            clip = CLIPTextModel(tiny_clip_config(clip_tokenizer, 32))
            # Kandinsky 5 T2I uses Flux's VAE (its pipeline ignores the shift factor)
            vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
            transformer = Kandinsky5Transformer3DModel(
                in_visual_dim=TINY_LATENT_CHANNELS,
                out_visual_dim=TINY_LATENT_CHANNELS,
                in_text_dim=16,  # Qwen's width
                in_text_dim2=32,  # CLIP's pooled width
                time_dim=16,
                patch_size=(1, 2, 2),
                model_dim=32,
                ff_dim=64,
                num_text_blocks=1,
                num_visual_blocks=2,
                axes_dims=(4, 6, 6),  # head width 16: two heads
                attention_type="regular",
            )
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=KANDINSKY5_SHIFT
        )
        return Components(transformer, vae, [qwen, clip], [processor, clip_tokenizer], scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(Kandinsky5T2IPipeline, path, self.load_dtype, "Kandinsky 5 pipeline")
        return Components(
            pipe.transformer,
            pipe.vae,
            [pipe.text_encoder, pipe.text_encoder_2],
            [pipe.tokenizer, pipe.tokenizer_2],
            pipe.scheduler,
        )

    # --- latents -------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        # the mode (a cached latent is reproducible), scaled but not shifted, as the pipeline
        # decodes it
        return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> Kandinsky5T2IPipeline:
        (qwen, clip), (processor, clip_tokenizer) = components.text_encoders, components.tokenizers
        return Kandinsky5T2IPipeline(
            transformer=None,
            vae=None,
            text_encoder=qwen,
            tokenizer=processor,
            text_encoder_2=clip,
            tokenizer_2=clip_tokenizer,
            scheduler=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.text_pipeline(components)
        device = self._text_device(components)
        embeds, pooled = [], []
        for prompt in prompts:  # one at a time: unpadded, as a one-prompt pipeline call
            qwen, clip, _ = pipe.encode_prompt(
                prompt=prompt, max_sequence_length=self.max_sequence_length, device=device
            )
            embeds.append(qwen[0])
            pooled.append(clip[0])
        length = max(self.max_sequence_length, *(len(e) for e in embeds))
        padded = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
        mask = embeds[0].new_zeros(len(embeds), length)
        for i, item in enumerate(embeds):
            padded[i, : len(item)] = item
            mask[i, : len(item)] = 1.0
        return {
            "prompt_embeds": padded,
            "prompt_mask": mask,
            "pooled_prompt_embeds": torch.stack(pooled),
        }

    # --- forward -------------------------------------------------------------------------
    def _forward(self, denoiser, noisy, timesteps, embeds, pooled) -> torch.Tensor:
        model = unwrap_model(denoiser)  # DDP / compile wrap it in training
        dtype = model.dtype  # the pipeline casts every input to the transformer's dtype
        _, _, height, width = noisy.shape
        _, patch_h, patch_w = model.config.patch_size
        device = noisy.device
        out = denoiser(
            hidden_states=to_transformer_layout(noisy).to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=timesteps.to(device=device, dtype=dtype),
            visual_rope_pos=[
                torch.arange(1, device=device),
                torch.arange(height // patch_h, device=device),
                torch.arange(width // patch_w, device=device),
            ],
            text_rope_pos=torch.arange(embeds.shape[1], device=device),
            scale_factor=[1.0, 1.0, 1.0],
            sparse_params=None,
            return_dict=False,
        )
        return from_transformer_layout(out).to(noisy.dtype)

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        lengths = cond["prompt_mask"].sum(1).long().tolist()
        timesteps = timesteps.reshape(-1).expand(noisy.shape[0])
        outputs: list[torch.Tensor | None] = [None] * len(lengths)
        for length in sorted(set(lengths)):  # each caption length unpadded (module docstring)
            rows = [i for i, n in enumerate(lengths) if n == length]
            index = torch.tensor(rows, device=noisy.device)
            out = self._forward(
                components.denoiser,
                noisy[index],
                timesteps[index],
                embeds[index, :length],
                pooled[index],
            )
            for j, i in enumerate(rows):
                outputs[i] = out[j]
        return torch.stack(outputs)

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict:
        (qwen, clip), (processor, clip_tokenizer) = components.text_encoders, components.tokenizers
        return dict(
            transformer=components.denoiser,
            vae=components.vae,
            text_encoder=qwen,
            tokenizer=processor,
            text_encoder_2=clip,
            tokenizer_2=clip_tokenizer,
            scheduler=components.noise_scheduler,
        )

    def pipeline(self, components: Components) -> Kandinsky5T2IPipeline:
        return Kandinsky5T2IPipeline(**self._pipeline_parts(components))

    def validation_pipeline(self, components: Components) -> Kandinsky5T2IPipeline:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config)
        view = dataclasses.replace(components, noise_scheduler=scheduler)
        pipe = ValidationPipeline(**self._pipeline_parts(view))
        # render at the validation size, not at the listed size nearest in aspect ratio
        size = self.validation_call_kwargs("", None, self.config)
        size = (size["width"], size["height"])
        if size not in pipe.resolutions:
            pipe.resolutions = [*pipe.resolutions, size]
        return pipe
