"""Stable Diffusion 3 / 3.5 (`sd3`): MMDiT transformer, two CLIP encoders + T5, flow matching."""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.controlnets.controlnet import zero_module
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_model,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.tiny_tokenizer import build_tiny_t5_tokenizer, build_tiny_tokenizer
from slider_cn.targets.spec import ATTN, JOINT_TEXT, QKVO, ArchitectureTargets

# SD3's VAE latents: 16 channels, scaled and shifted (vae/config.json of the SD3 checkpoints).
SD3_VAE_SCALING = 1.5305
SD3_VAE_SHIFT = 0.0609
# diffusers' from_transformer default: 12 transformer blocks in a fresh ControlNet.
FRESH_CONTROLNET_LAYERS = 12


def tiny_t5(tokenizer, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_clip_config(tokenizer, hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    description = "Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, CLIP-L + CLIP-G + T5)"
    denoiser_model_class = SD3Transformer2DModel
    targets = ArchitectureTargets(
        slider=(
            *ATTN,
            "pos_embed.proj",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        controlnet_slider=(
            *ATTN,
            "pos_embed.proj",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "pos_embed_input.proj"),
        note="MMDiT names the image stream's attention `attn.*` (the guide's `attn1.*` matches "
        "nothing); patch embedding and timestep MLP stand in for conv_in and time_embedding. "
        "SD3.5's `attn2` is a second image self-attention, left out so that `attn2` is never "
        "adapted anywhere.",
    )
    pipeline_class = StableDiffusion3Pipeline
    controlnet_pipeline_class = StableDiffusion3ControlNetPipeline
    controlnet_model_class = SD3ControlNetModel
    max_sequence_length_default = 256  # StableDiffusion3Pipeline's default

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizers = [
            build_tiny_tokenizer(),
            build_tiny_tokenizer(),
            build_tiny_t5_tokenizer(self.max_sequence_length_tiny),
        ]
        with seeded(seed):
            # CLIP-L and CLIP-G: penultimate hidden states concatenated (16 + 16 = the T5
            # width, 32), pooled projections concatenated (32 = pooled_projection_dim).
            clip_l = CLIPTextModelWithProjection(
                tiny_clip_config(tokenizers[0], 16, projection_dim=16)
            )
            clip_g = CLIPTextModelWithProjection(
                tiny_clip_config(tokenizers[1], 16, projection_dim=16)
            )
            t5 = tiny_t5(tokenizers[2], d_model=32)
            vae = tiny_flow_vae(SD3_VAE_SCALING, SD3_VAE_SHIFT)
            transformer = SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=TINY_LATENT_CHANNELS,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,
                caption_projection_dim=32,
                pooled_projection_dim=32,
                out_channels=TINY_LATENT_CHANNELS,
                pos_embed_max_size=16,
            )
        # SD3's scheduler: a static shift of 3.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return Components(transformer, vae, [clip_l, clip_g, t5], tokenizers, scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(StableDiffusion3Pipeline, path, self.load_dtype, "SD3 pipeline")
        if pipe.text_encoder_3 is None:
            raise ConfigError(f"{path}: the SD3 pipeline has no T5 text encoder (text_encoder_3)")
        return Components(
            pipe.transformer,
            pipe.vae,
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
            pipe.scheduler,
        )

    def load_controlnet(self, path: str) -> torch.nn.Module:
        return load_model(SD3ControlNetModel, path, self.load_dtype, "SD3 ControlNet")

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """What SD3ControlNetModel.from_transformer builds, without its side effect.

        diffusers 0.42.1's from_transformer writes num_layers and extra_conditioning_channels
        into the *transformer's* config (FrozenDict does not freeze), so a transformer rebuilt
        from that config later has the ControlNet's depth. Here the config is copied first.
        """
        wanted = 1 if self.config.is_tiny else FRESH_CONTROLNET_LAYERS
        config = {k: v for k, v in denoiser.config.items() if not k.startswith("_")}
        config.update(
            # fewer blocks than the transformer: its last block is context-only, shaped apart
            num_layers=max(1, min(wanted, denoiser.config.num_layers - 1)),
            extra_conditioning_channels=0,  # plain conditioning latents, no inpaint mask
            # reads the pooled text like the transformer, and takes shifted latents like any
            # SD3 latent (the class default, True, is InstantX's layout)
            force_zeros_for_pooled_projection=False,
        )
        controlnet = SD3ControlNetModel.from_config(config)
        controlnet.pos_embed.load_state_dict(denoiser.pos_embed.state_dict())
        controlnet.time_text_embed.load_state_dict(denoiser.time_text_embed.state_dict())
        controlnet.context_embedder.load_state_dict(denoiser.context_embedder.state_dict())
        controlnet.transformer_blocks.load_state_dict(
            denoiser.transformer_blocks.state_dict(), strict=False
        )
        controlnet.pos_embed_input = zero_module(controlnet.pos_embed_input)
        return controlnet

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> StableDiffusion3Pipeline:
        te1, te2, te3 = components.text_encoders
        tok1, tok2, tok3 = components.tokenizers
        return StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=te1,
            tokenizer=tok1,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            text_encoder_3=te3,
            tokenizer_3=tok3,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self._text_device(components),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    # --- forward -------------------------------------------------------------------------
    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        controlnet = components.controlnet
        config = controlnet.config
        # As StableDiffusion3ControlNetPipeline: InstantX-style ControlNets
        # (force_zeros_for_pooled_projection) get no shift and zero pooled text; SD3.5's
        # official ones (joint_attention_dim None) get no text sequence.
        zeros = config.force_zeros_for_pooled_projection
        control = self.conditioning_latents(components, conditioning_pixels, shift=not zeros)
        pooled = cond["pooled_prompt_embeds"]
        samples = controlnet(
            hidden_states=noisy,
            controlnet_cond=control.to(noisy.dtype),
            conditioning_scale=scale,
            encoder_hidden_states=cond["prompt_embeds"]
            if config.joint_attention_dim is not None
            else None,
            pooled_projections=torch.zeros_like(pooled) if zeros else pooled,
            timestep=timesteps,
            return_dict=False,
        )[0]
        return {"block_controlnet_hidden_states": samples}

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        return components.denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
            **(residuals or {}),
        )[0]

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict:
        te1, te2, te3 = components.text_encoders
        tok1, tok2, tok3 = components.tokenizers
        return dict(
            transformer=components.denoiser,
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=te1,
            tokenizer=tok1,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            text_encoder_3=te3,
            tokenizer_3=tok3,
        )

    def pipeline(self, components: Components) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(**self._pipeline_parts(components))

    def controlnet_pipeline(self, components: Components) -> StableDiffusion3ControlNetPipeline:
        return StableDiffusion3ControlNetPipeline(
            **self._pipeline_parts(components), controlnet=components.controlnet
        )
