"""Stable Diffusion 1.x / 2.x (`sd1x`): UNet2DConditionModel, one CLIP text encoder."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

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


def tiny_sd1x_unet() -> UNet2DConditionModel:
    """The `tiny` SD1.x UNet: the real class, two levels, 32/64 channels."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


class SD1xFamily(StableDiffusionFamily):
    name = "sd1x"
    description = "Stable Diffusion 1.x / 2.x (UNet2DConditionModel, CLIP text encoder)"
    targets = ArchitectureTargets(
        slider=UNET_SLIDER,
        ordinary=QKVO,  # diffusers' LoRA default: self- and cross-attention
        controlnet_slider=CONTROLNET_MODEL_SLIDER,
        controlnet_outputs=CONTROLNET_MODEL_OUTPUTS,
        note="The guide's general list, less the fused `to_qkv` names (only present after "
        "fuse_qkv_projections()).",
    )

    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_tokenizer()
        with seeded(seed):
            text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
            vae = tiny_vae(scaling_factor=0.18215)
            unet = tiny_sd1x_unet()
        return Components(unet, vae, [text_encoder], [tokenizer], sd_noise_scheduler())

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        (encoder,), (tokenizer,) = components.text_encoders, components.tokenizers
        ids = self._tokenize(tokenizer, prompts).to(encoder.device)
        return {"encoder_hidden_states": encoder(ids)[0]}

    def _pipeline_parts(self, components: Components) -> dict[str, Any]:
        return {
            "vae": components.vae,
            "text_encoder": components.text_encoders[0],
            "tokenizer": components.tokenizers[0],
            "unet": components.denoiser,
            "scheduler": components.noise_scheduler,
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
