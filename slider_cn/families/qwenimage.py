"""Qwen-Image (`qwenimage`): double-stream transformer on 2x2-packed latents, Qwen2.5-VL text.

Conventions of QwenImagePipeline that training follows:

- latents come from AutoencoderKLQwenImage, a video VAE: images go in as one frame
  (B, 3, 1, H, W) and come out as (B, 16, 1, H/8, W/8), normalised per channel with the VAE's
  ``latents_mean`` / ``latents_std`` (``(z - mean) / std``; there is no scaling or shift factor).
  slider-cn keeps them as (B, C, H/8, W/8) everywhere (cache, noise, target, loss), and
  ``predict`` packs them into 2x2 patches (B, H/16 * W/16, 4C) with the pipeline's own static
  helpers, with ``img_shapes`` (1, H/16, W/16) for the rotary embedding;
- the transformer takes its time as sigma (t / 1000) and predicts the velocity ``noise - x``;
- prompts: the pipeline's ``encode_prompt`` wraps the prompt in its chat template, runs the
  Qwen2.5-VL language model and keeps the last hidden states after the template's first 34
  tokens, padding removed. The cache holds them padded to ``max_sequence_length`` with a
  ``prompt_embeds_mask``; ``predict`` trims the padding to the batch's longest prompt and, as
  ``encode_prompt`` does, passes no mask when nothing is padded, so a one-prompt batch is
  exactly what inference computes;
- the scheduler shifts sigmas by the packed token count (``use_dynamic_shifting``, an
  exponential time shift: Qwen-Image's base_shift 0.5, max_shift 0.9 over 256..8192 tokens);
  its ``shift_terminal`` only shapes inference schedules (validation drops it for a one-step
  schedule, which diffusers' stretch turns into NaN).

Guidance: Qwen-Image has no distilled guidance input (its ``guidance_scale`` is ignored);
classifier-free guidance is ``true_cfg_scale`` and runs only with a negative prompt. So
``validation_guidance`` is the pipeline's ``true_cfg_scale`` (4 by default, as the pipeline),
with the model card's blank negative prompt " " when it is above 1; 1 or less samples without
CFG (Lightning-distilled checkpoints).

ControlNet: QwenImageControlNetModel (InstantX's layout) reads the packed latents plus the
packed, normalised VAE latents of the conditioning image (``controlnet_x_embedder``) and
returns one hint per block, which the transformer adds after its blocks (spread evenly).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_model,
    load_pipeline,
)
from slider_cn.families.tiny_tokenizer import build_tiny_qwen_vl_processor
from slider_cn.targets.spec import ATTN, JOINT_TEXT, QKVO, ArchitectureTargets

# Qwen/Qwen-Image's scheduler/scheduler_config.json.
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)
# The first channels' statistics of Qwen-Image's VAE (vae/config.json), for the tiny one.
TINY_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]
TINY_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]
# QwenImageControlNetModel.from_transformer's default depth (InstantX's ControlNets have 5).
FRESH_CONTROLNET_LAYERS = 5


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), QwenImagePipeline's layout."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W); height and width in latent pixels."""
    return QwenImagePipeline._unpack_latents(packed, height, width, vae_scale_factor=1).squeeze(2)


def normalise(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, C, 1, h, w) -> the transformer's scale, as the pipelines compute it."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return (latents - mean) * inv_std


def tiny_qwen_vae() -> AutoencoderKLQwenImage:
    """A small AutoencoderKLQwenImage with the real 8x spatial factor (three downsamples).

    Its posterior is made as narrow as a trained VAE's (log-variance -30), so the ControlNet
    pipeline, which *samples* the conditioning image's latent, gets training's mode.
    """
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=TINY_LATENT_CHANNELS,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=TINY_LATENTS_MEAN,
        latents_std=TINY_LATENTS_STD,
    )
    with torch.no_grad():
        vae.quant_conv.weight[TINY_LATENT_CHANNELS:].zero_()
        vae.quant_conv.bias[TINY_LATENT_CHANNELS:].fill_(-30.0)
    return vae


def tiny_qwen25_vl(vocab_size: int, pad_token_id: int, eos_token_id: int):
    """Qwen2.5-VL with a 2-layer, 16-wide language model (and a one-block vision tower, which
    text prompts never reach). Its multimodal rotary sections split the 8-wide heads."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            pad_token_id=pad_token_id,
            bos_token_id=None,
            eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=16,
            fullatt_block_indexes=[0],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


class QwenImageFamily(FlowMatchingFamily):
    name = "qwenimage"
    description = (
        "Qwen-Image (QwenImageTransformer2DModel, Qwen2.5-VL text encoder, packed latents)"
    )
    denoiser_model_class = QwenImageTransformer2DModel
    targets = ArchitectureTargets(
        slider=(
            *ATTN,
            "img_in",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        controlnet_slider=(
            *ATTN,
            "img_in",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "controlnet_x_embedder"),
        note="The guide's general list matches only `proj_out`: the image stream is `attn.*`, "
        "`img_in`, and the text stream (`txt_*`, `add_*`) is never adapted.",
    )
    pipeline_class = QwenImagePipeline
    controlnet_pipeline_class = QwenImageControlNetPipeline
    controlnet_model_class = QwenImageControlNetModel
    max_sequence_length_default = 512  # QwenImagePipeline's default
    # the caption (byte tokens) and the template's 5 closing tokens
    max_sequence_length_tiny = 64

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        # Byte-level, with merges that spell the template's words as Qwen2's vocabulary does:
        # its system prompt is 34 tokens, the pipeline's prompt_template_encode_start_idx.
        empty = QwenImagePipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None
        )
        tokenizer = build_tiny_qwen_vl_processor(
            1024, words_of=empty.prompt_template_encode
        ).tokenizer
        with seeded(seed):
            text_encoder = tiny_qwen25_vl(
                len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
            )
            vae = tiny_qwen_vae()
            transformer = QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=4 * TINY_LATENT_CHANNELS,  # 2x2-packed latents
                out_channels=TINY_LATENT_CHANNELS,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=16,  # the text encoder's width
                axes_dims_rope=(2, 2, 4),  # sums to the head width
            )
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
        return Components(transformer, vae, [text_encoder], [tokenizer], scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(QwenImagePipeline, path, self.load_dtype, "Qwen-Image pipeline")
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    def load_controlnet(self, path: str) -> torch.nn.Module:
        controlnet = load_model(
            QwenImageControlNetModel, path, self.load_dtype, "Qwen-Image ControlNet"
        )
        if controlnet.config.extra_condition_channels:
            raise ConfigError(
                f"controlnet_model_name_or_path {path}: an inpainting Qwen-Image ControlNet "
                f"(extra_condition_channels={controlnet.config.extra_condition_channels}) needs "
                "a mask per image, which slider-cn does not pass; use a ControlNet for plain "
                "conditioning images (e.g. InstantX/Qwen-Image-ControlNet-Union)"
            )
        return controlnet

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """QwenImageControlNetModel.from_transformer, with the text norm copied too.

        from_transformer copies the transformer's config first (no side effect on it), its
        embedders and first blocks, and zero-initialises ``controlnet_x_embedder`` and the
        ``controlnet_blocks``; but it leaves ``txt_norm`` (an RMSNorm with learned weights in
        the transformer) at ones, so the fresh ControlNet would read the prompt through another
        norm than the blocks it copies were trained with. Here it is copied as well.
        """
        config = denoiser.config
        layers = 1 if self.config.is_tiny else FRESH_CONTROLNET_LAYERS
        controlnet = QwenImageControlNetModel.from_transformer(
            denoiser,
            num_layers=min(layers, config.num_layers),
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
        )
        controlnet.txt_norm.load_state_dict(denoiser.txt_norm.state_dict())
        return controlnet

    # --- latents -------------------------------------------------------------------------
    def encode_images(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        frames = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
        # The distribution's mode: deterministic, so a cached latent is reproducible.
        return normalise(vae, vae.encode(frames).latent_dist.mode()).squeeze(2)

    @torch.no_grad()
    def conditioning_latents(
        self, components: Components, conditioning_pixels: torch.Tensor, *, shift: bool = True
    ) -> torch.Tensor:
        """Conditioning pixels in [0, 1] -> normalised latents (B, C, h, w), as the ControlNet
        pipeline makes them (to [-1, 1], one frame through the VAE, latents_mean / std)."""
        return self.encode_images(components, conditioning_pixels * 2.0 - 1.0)

    def initial_noise(self, components, batch, resolution, generator) -> torch.Tensor:
        vae = components.vae.config
        side = resolution // 2 ** len(vae.temperal_downsample)  # as the pipeline computes it
        return torch.randn((batch, vae.z_dim, side, side), generator=generator)

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> QwenImagePipeline:
        return QwenImagePipeline(
            scheduler=None,
            vae=None,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            device=self._text_device(components),
            max_sequence_length=self.max_sequence_length,
        )
        batch, length, width = embeds.shape
        padded = embeds.new_zeros(batch, self.max_sequence_length, width)
        padded[:, :length] = embeds
        full_mask = embeds.new_zeros(batch, self.max_sequence_length)
        full_mask[:, :length] = 1.0 if mask is None else mask.to(embeds.dtype)
        return {"prompt_embeds": padded, "prompt_embeds_mask": full_mask}

    # --- forward -------------------------------------------------------------------------
    @staticmethod
    def _text(cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached prompt embeddings trimmed to the batch's longest prompt; no mask when
        none is padded (what encode_prompt returns for these prompts)."""
        embeds, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        valid = mask.bool()
        length = int(valid.any(0).nonzero().max()) + 1 if valid.any() else embeds.shape[1]
        embeds, valid = embeds[:, :length], valid[:, :length]
        return embeds, None if bool(valid.all()) else valid

    def _common(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> dict:
        b, _, h, w = noisy.shape
        embeds, mask = self._text(cond)
        return dict(
            hidden_states=pack(noisy),
            timestep=(timesteps.float() / 1000).to(noisy.dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
        )

    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        control = pack(self.conditioning_latents(components, conditioning_pixels))
        samples = components.controlnet(
            controlnet_cond=control.to(device=noisy.device, dtype=noisy.dtype),
            conditioning_scale=scale,
            return_dict=False,
            **self._common(noisy, timesteps, cond),
        )
        return {"controlnet_block_samples": samples}

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        out = components.denoiser(
            return_dict=False, **self._common(noisy, timesteps, cond), **(residuals or {})
        )[0]
        return unpack(out, noisy.shape[-2], noisy.shape[-1])

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict:
        return dict(
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=components.denoiser,
        )

    def pipeline(self, components: Components) -> QwenImagePipeline:
        return QwenImagePipeline(**self._pipeline_parts(components))

    def controlnet_pipeline(self, components: Components) -> QwenImageControlNetPipeline:
        return QwenImageControlNetPipeline(
            **self._pipeline_parts(components), controlnet=components.controlnet
        )

    def validation_pipeline(self, components: Components):
        pipe = super().validation_pipeline(components)
        if self.config.validation_num_inference_steps < 2 and pipe.scheduler.config.get(
            "shift_terminal"
        ):
            # diffusers stretches a schedule to shift_terminal by dividing by 1 - its last
            # sigma, which is 0 in a one-step schedule: NaN latents, black images.
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                pipe.scheduler.config, shift_terminal=None
            )
        return pipe

    def validation_call_kwargs(self, prompt, conditioning_image, config) -> dict:
        """``validation_guidance`` is the pipeline's ``true_cfg_scale`` (see the module
        docstring): above 1 it runs CFG against the blank negative prompt " "."""
        kwargs = super().validation_call_kwargs(prompt, conditioning_image, config)
        scale = float(kwargs.pop("guidance_scale"))
        kwargs["true_cfg_scale"] = scale
        if scale > 1.0:
            kwargs["negative_prompt"] = " "
        return kwargs
