"""Stable Diffusion XL (`sdxl`): UNet2DConditionModel with text_time micro-conditioning, two
CLIP text encoders."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from slider_cn.families.base import Components, seeded
from slider_cn.families.sd import (
    StableDiffusionFamily,
    sd_noise_scheduler,
    tiny_text_config,
    tiny_vae,
)
from slider_cn.families.tiny_tokenizer import build_tiny_tokenizer
from slider_cn.targets.spec import (
    CONTROLNET_MODEL_OUTPUTS,
    CONTROLNET_MODEL_SLIDER,
    QKVO,
    UNET_SLIDER,
    ArchitectureTargets,
)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """The `tiny` SDXL UNet: text_time micro-conditioning, two text encoders' width."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # six micro-conditioning values of 8 dims each, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )


class SDXLFamily(StableDiffusionFamily):
    name = "sdxl"
    description = (
        "Stable Diffusion XL (UNet2DConditionModel with text_time embedding, two CLIP encoders)"
    )
    targets = ArchitectureTargets(
        slider=UNET_SLIDER,
        ordinary=QKVO,
        controlnet_slider=CONTROLNET_MODEL_SLIDER,
        controlnet_outputs=CONTROLNET_MODEL_OUTPUTS,
        note="As sd1x; `add_embedding` (pooled text + micro-conditioning) is never adapted.",
    )
    pipeline_class = StableDiffusionXLPipeline
    controlnet_pipeline_class = StableDiffusionXLControlNetPipeline
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    text_encoder_classes = (CLIPTextModel, CLIPTextModelWithProjection)

    def build_tiny(self, seed: int) -> Components:
        tokenizers = [build_tiny_tokenizer(), build_tiny_tokenizer()]
        with seeded(seed):
            encoder_1 = CLIPTextModel(tiny_text_config(tokenizers[0]))
            encoder_2 = CLIPTextModelWithProjection(
                tiny_text_config(tokenizers[1], projection_dim=32)
            )
            vae = tiny_vae(scaling_factor=0.13025)
            unet = tiny_sdxl_unet()
        return Components(unet, vae, [encoder_1, encoder_2], tokenizers, sd_noise_scheduler())

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for encoder, tokenizer in zip(components.text_encoders, components.tokenizers, strict=True):
            ids = self._tokenize(tokenizer, prompts).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            # SDXL conditions on the penultimate layer; the pooled embedding comes from encoder 2.
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def add_time_ids(
        self, batch_size: int, height: int, width: int | None = None, device=None, dtype=None
    ) -> torch.Tensor:
        """SDXL micro-conditioning without a source image: original size = target size, crop
        at the origin (what the pipeline passes at inference)."""
        width = height if width is None else width
        ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype)
        return ids.unsqueeze(0).repeat(batch_size, 1)

    def _unet_kwargs(self, cond, noisy):
        geometry = cond.get("image_geometry")
        if geometry is not None:
            # training images: their own original size, crop top-left and bucket
            # (slider_cn/data/loading.py Batch.geometry), as SDXL's training scripts give them
            repeat = noisy.shape[0] // geometry.shape[0]
            time_ids = geometry.to(noisy.device, noisy.dtype).repeat(repeat, 1)
        else:
            height = noisy.shape[-2] * self.vae_scale_factor
            width = noisy.shape[-1] * self.vae_scale_factor
            time_ids = self.add_time_ids(noisy.shape[0], height, width, noisy.device, noisy.dtype)
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "added_cond_kwargs": {
                "text_embeds": cond["pooled_prompt_embeds"],
                "time_ids": time_ids,
            },
        }

    def _pipeline_parts(self, components: Components) -> dict[str, Any]:
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "text_encoder_2": components.text_encoders[1],
            "tokenizer": components.tokenizers[0],
            "tokenizer_2": components.tokenizers[1],
            "unet": components.denoiser,
            "scheduler": components.noise_scheduler,
            # no invisible watermark: validation images are compared tile by tile
            "add_watermarker": False,
        }
