"""Flux.1 (`flux`): double/single-stream transformer on 2x2-packed latents, CLIP + T5.

The transformer reads latents packed into 2x2 patches (B, H/2 * W/2, 4C) with position ids per
patch (img_ids) and per text token (txt_ids, zeros), its timestep as sigma (t / 1000), and, for
guidance-distilled checkpoints (dev: ``guidance_embeds``), a guidance value
(``flux_guidance_value`` in training). Latents stay unpacked (B, C, H, W) everywhere else in
slider-cn (cache, noise, target, loss): ``predict`` packs and unpacks with the pipeline's own
static helpers, so the layout is the one FluxPipeline uses.
"""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_model,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.sd3 import tiny_clip_config, tiny_t5
from slider_cn.families.tiny_tokenizer import build_tiny_t5_tokenizer, build_tiny_tokenizer
from slider_cn.targets.spec import ATTN, JOINT_TEXT, QKVO, ArchitectureTargets

# Flux's VAE latents: 16 channels, scaled and shifted (the FLUX.1 vae/config.json).
FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159
# diffusers' from_transformer defaults: 4 double-stream and 10 single-stream blocks.
FRESH_CONTROLNET_LAYERS = (4, 10)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), FluxPipeline's layout."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W); height and width in latent pixels."""
    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor=1)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    description = "Flux.1 (FluxTransformer2DModel, CLIP-L + T5, packed latents, guidance input)"
    denoiser_model_class = FluxTransformer2DModel
    targets = ArchitectureTargets(
        slider=(
            *ATTN,
            "proj_out",  # single blocks' attention+MLP output, and the final projection
            "x_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        controlnet_slider=(
            *ATTN,
            "proj_out",
            "x_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=(
            "controlnet_blocks.*",
            "controlnet_single_blocks.*",
            "controlnet_x_embedder",
            "input_hint_block.conv_out",  # only when built with conditioning_embedding_channels
        ),
        note="Single-stream blocks have no `to_out`: their attention and MLP leave through "
        "`proj_out`, which replaces the guide's `to_out.0` there.",
    )
    pipeline_class = FluxPipeline
    controlnet_pipeline_class = FluxControlNetPipeline
    controlnet_model_class = FluxControlNetModel
    max_sequence_length_default = 512  # FluxPipeline's default

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizers = [
            build_tiny_tokenizer(),
            build_tiny_t5_tokenizer(self.max_sequence_length_tiny),
        ]
        with seeded(seed):
            clip = CLIPTextModel(tiny_clip_config(tokenizers[0], 32))
            t5 = tiny_t5(tokenizers[1], d_model=32)
            vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=4 * TINY_LATENT_CHANNELS,  # 2x2-packed latents
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,  # T5 width
                pooled_projection_dim=32,  # CLIP pooled width
                guidance_embeds=True,  # like FLUX.1-dev
                axes_dims_rope=(2, 2, 4),
            )
        # FLUX.1-dev's scheduler: the shift grows with the image's token count.
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return Components(transformer, vae, [clip, t5], tokenizers, scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(FluxPipeline, path, self.load_dtype, "Flux pipeline")
        return Components(
            pipe.transformer,
            pipe.vae,
            [pipe.text_encoder, pipe.text_encoder_2],
            [pipe.tokenizer, pipe.tokenizer_2],
            pipe.scheduler,
        )

    def load_controlnet(self, path: str) -> torch.nn.Module:
        controlnet = load_model(FluxControlNetModel, path, self.load_dtype, "Flux ControlNet")
        if controlnet.union:
            raise ConfigError(
                f"controlnet_model_name_or_path {path}: a Flux ControlNet-Union needs a control "
                "mode per image, which slider-cn does not pass; use a single-condition ControlNet"
            )
        return controlnet

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        config = denoiser.config
        double, single = (1, 1) if self.config.is_tiny else FRESH_CONTROLNET_LAYERS
        return FluxControlNetModel.from_transformer(
            denoiser,
            num_layers=min(double, config.num_layers),
            num_single_layers=min(single, config.num_single_layers),
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
        )

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> FluxPipeline:
        (clip, t5), (tok, tok_2) = components.text_encoders, components.tokenizers
        return FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=clip,
            tokenizer=tok,
            text_encoder_2=t5,
            tokenizer_2=tok_2,
            transformer=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self._text_device(components),
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # --- forward -------------------------------------------------------------------------
    def _guidance(self, model: torch.nn.Module, noisy: torch.Tensor) -> torch.Tensor | None:
        if not model.config.guidance_embeds:
            return None
        return torch.full(
            (noisy.shape[0],), self.config.flux_guidance_value, device=noisy.device
        ).float()

    def _common(self, noisy, timesteps, cond) -> dict:
        b, _, h, w = noisy.shape
        embeds = cond["prompt_embeds"]
        return dict(
            hidden_states=pack(noisy),
            timestep=(timesteps.float() / 1000).to(noisy.dtype),
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=embeds.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(
                b, h // 2, w // 2, noisy.device, noisy.dtype
            ),
        )

    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        controlnet = components.controlnet
        if controlnet.input_hint_block is None:
            # InstantX layout: packed VAE latents of the conditioning image.
            control = pack(self.conditioning_latents(components, conditioning_pixels))
            repeat = False
        else:
            # XLabs layout: pixels in [-1, 1] through its own hint block; blocks repeat.
            control = conditioning_pixels * 2.0 - 1.0
            repeat = True
        block, single = controlnet(
            controlnet_cond=control.to(device=noisy.device, dtype=noisy.dtype),
            conditioning_scale=scale,
            guidance=self._guidance(controlnet, noisy),
            return_dict=False,
            **self._common(noisy, timesteps, cond),
        )
        return {
            "controlnet_block_samples": block,
            "controlnet_single_block_samples": single,
            "controlnet_blocks_repeat": repeat,
        }

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        out = components.denoiser(
            guidance=self._guidance(components.denoiser, noisy),
            return_dict=False,
            **self._common(noisy, timesteps, cond),
            **(residuals or {}),
        )[0]
        return unpack(out, noisy.shape[-2], noisy.shape[-1])

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict:
        (clip, t5), (tok, tok_2) = components.text_encoders, components.tokenizers
        return dict(
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=clip,
            tokenizer=tok,
            text_encoder_2=t5,
            tokenizer_2=tok_2,
            transformer=components.denoiser,
        )

    def pipeline(self, components: Components) -> FluxPipeline:
        return FluxPipeline(**self._pipeline_parts(components))

    def controlnet_pipeline(self, components: Components) -> FluxControlNetPipeline:
        return FluxControlNetPipeline(
            **self._pipeline_parts(components), controlnet=components.controlnet
        )
