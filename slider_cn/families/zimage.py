"""Z-Image / Z-Image Turbo (`zimage`): single-stream transformer, Qwen3 text encoder.

Conventions of ZImagePipeline that training follows:

- the transformer takes a list of (C, 1, H, W) latents, the time as ``1 - sigma`` and a list of
  caption features (the Qwen3 encoder's penultimate hidden states of the chat-formatted prompt,
  padding removed); it predicts ``x - noise``, so the velocity is its output negated;
- captions have different lengths: the cache holds them padded to ``max_sequence_length`` with
  a ``prompt_mask``, and ``predict`` strips the padding again.

The Z-Image ControlNet shares the transformer's embedders and refiners
(``ZImageControlNetModel.from_transformer``). Because of that, its hints depend on any slider on
those shared modules: ``controlnet_residuals`` only prepares the conditioning latents, and the
ControlNet runs inside ``predict``, under the same slider multiplier (and grad mode) as the
transformer forward it feeds, which is what a pipeline with the LoRA loaded computes.

Z-Image Turbo is distilled: its training adapter (``assistant_lora_path``) is loaded frozen by
the training loop, and validation switches it off by default
(``assistant_lora_inference_strength: 0``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen3Config, Qwen3Model

from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_model,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.flux import FLUX_VAE_SCALING, FLUX_VAE_SHIFT
from slider_cn.families.tiny_tokenizer import build_tiny_qwen_tokenizer
from slider_cn.targets.spec import QKVO, ArchitectureTargets

log = logging.getLogger(__name__)

# Z-Image-Turbo-Fun-ControlNet's layout: a control block at every fifth transformer layer.
CONTROL_LAYER_EVERY = 5


def _with_checkpointing_flag(controlnet: ZImageControlNetModel) -> ZImageControlNetModel:
    # diffusers 0.42.1's ZImageControlNetModel reads self.gradient_checkpointing in forward but
    # never sets it in __init__, so any forward with grad enabled fails without this.
    if not hasattr(controlnet, "gradient_checkpointing"):
        controlnet.gradient_checkpointing = False
    return controlnet


def control_layer_places(n_layers: int) -> list[int]:
    step = CONTROL_LAYER_EVERY if n_layers >= 2 * CONTROL_LAYER_EVERY else 1
    return list(range(0, n_layers, step))


class ZImageFamily(FlowMatchingFamily):
    name = "zimage"
    description = "Z-Image / Z-Image Turbo (ZImageTransformer2DModel, Qwen3 text encoder)"
    denoiser_model_class = ZImageTransformer2DModel
    targets = ArchitectureTargets(
        slider=(
            "attention.to_q",
            "attention.to_k",
            "attention.to_v",
            "attention.to_out.0",
            "all_x_embedder.*",
            "t_embedder.mlp.0",
            "t_embedder.mlp.2",
            "all_final_layer.*.linear",
        ),
        ordinary=QKVO,
        controlnet_slider=(
            "control_layers.*.attention.to_q",
            "control_layers.*.attention.to_k",
            "control_layers.*.attention.to_v",
            "control_layers.*.attention.to_out.0",
            "control_noise_refiner.*.attention.to_q",
            "control_noise_refiner.*.attention.to_k",
            "control_noise_refiner.*.attention.to_v",
            "control_noise_refiner.*.attention.to_out.0",
            "control_all_x_embedder.*",
        ),
        controlnet_outputs=("before_proj", "after_proj"),
        note="Attention is `attention.*` (the guide's `attn1.*` matches nothing) in the main "
        "layers and the noise refiner; the caption's `context_refiner` is never adapted. The "
        "ControlNet shares the transformer's embedders and refiners: only its own `control_*` "
        "modules are adapted.",
    )
    pipeline_class = ZImagePipeline
    controlnet_pipeline_class = ZImageControlNetPipeline
    controlnet_model_class = ZImageControlNetModel
    max_sequence_length_default = 512  # ZImagePipeline's default
    max_sequence_length_tiny = 64  # the chat template alone is ~20 byte tokens

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_qwen_tokenizer(self.max_sequence_length_tiny)
        with seeded(seed):
            text_encoder = Qwen3Model(
                Qwen3Config(
                    vocab_size=len(tokenizer),
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=128,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
            vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)  # Z-Image uses Flux's VAE
            transformer = ZImageTransformer2DModel(
                all_patch_size=(2,),
                all_f_patch_size=(1,),
                in_channels=TINY_LATENT_CHANNELS,
                dim=32,
                n_layers=2,
                n_refiner_layers=1,
                n_heads=2,
                n_kv_heads=2,
                cap_feat_dim=16,  # the text encoder's width
                axes_dims=[8, 4, 4],  # sums to the head width, 32 / 2
                # caption positions (up to 64 tokens, padded to 32s) come before the image's
                axes_lens=[160, 32, 32],
            )
        # Z-Image's scheduler: a static shift of 3.
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return Components(transformer, vae, [text_encoder], [tokenizer], scheduler)

    def load_pretrained(self, path: str) -> Components:
        if "turbo" in path.lower() and not self.config.assistant_lora_path:
            # Training a distilled model without its training adapter erodes the distillation.
            log.warning(
                "%s looks like Z-Image Turbo but no assistant_lora_path is set: train Turbo "
                "with its training adapter loaded as the assistant",
                path,
            )
        pipe = load_pipeline(ZImagePipeline, path, self.load_dtype, "Z-Image pipeline")
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    def load_controlnet(self, path: str) -> torch.nn.Module:
        controlnet = load_model(ZImageControlNetModel, path, self.load_dtype, "Z-Image ControlNet")
        return _with_checkpointing_flag(controlnet)

    def load_components(self, *, with_controlnet: bool | None = None) -> Components:
        components = super().load_components(with_controlnet=with_controlnet)
        if components.controlnet is not None and not components.controlnet_is_fresh:
            # A loaded ControlNet has only its own blocks: it borrows the rest from the base.
            ZImageControlNetModel.from_transformer(components.controlnet, components.denoiser)
        return components

    def controlnet_from_denoiser(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        config = denoiser.config
        places = control_layer_places(config.n_layers)
        controlnet = ZImageControlNetModel(
            control_layers_places=places,
            control_in_dim=config.in_channels,  # conditioning latents, as many channels as x
            all_patch_size=tuple(config.all_patch_size),
            all_f_patch_size=tuple(config.all_f_patch_size),
            dim=config.dim,
            n_refiner_layers=config.n_refiner_layers,
            n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads,
            norm_eps=config.norm_eps,
            qk_norm=config.qk_norm,
        )
        # Start as a trainable copy of the base, as from_transformer does for SD3 and Flux:
        # each control block from the layer it feeds, the control refiner and patch embedder
        # from the transformer's. before_proj / after_proj stay zero (not in the copies).
        with torch.no_grad():
            for block, place in zip(controlnet.control_layers, places, strict=True):
                block.load_state_dict(denoiser.layers[place].state_dict(), strict=False)
            controlnet.control_noise_refiner.load_state_dict(denoiser.noise_refiner.state_dict())
            controlnet.control_all_x_embedder.load_state_dict(denoiser.all_x_embedder.state_dict())
        return _with_checkpointing_flag(
            ZImageControlNetModel.from_transformer(controlnet, denoiser)
        )

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> ZImagePipeline:
        return ZImagePipeline(
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
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        length = self.max_sequence_length
        width = embeds[0].shape[-1]
        padded = embeds[0].new_zeros(len(embeds), length, width)
        mask = embeds[0].new_zeros(len(embeds), length)
        for i, item in enumerate(embeds):
            padded[i, : len(item)] = item
            mask[i, : len(item)] = 1.0
        return {"prompt_embeds": padded, "prompt_mask": mask}

    # --- forward -------------------------------------------------------------------------
    def _inputs(self, components, noisy, timesteps, cond):
        latents = list(noisy.unsqueeze(2).unbind(0))  # (C, 1, H, W) each
        # The pipeline's (1000 - t) / 1000: the transformer's time runs from noise (0) to data.
        t = (1.0 - self.sigmas(components, timesteps)).to(noisy.dtype)
        captions = [
            embeds[mask.bool()]
            for embeds, mask in zip(cond["prompt_embeds"], cond["prompt_mask"], strict=True)
        ]
        return latents, t, captions

    def controlnet_residuals(self, components, noisy, timesteps, cond, conditioning_pixels, scale):
        control = self.conditioning_latents(components, conditioning_pixels).unsqueeze(2)
        extra = components.controlnet.config.control_in_dim - control.shape[1]
        if extra > 0:  # ControlNet 2.x takes extra (inpainting) channels: zeros, as the pipeline
            control = torch.cat(
                [control, control.new_zeros(control.shape[0], extra, *control.shape[2:])], 1
            )
        # The ControlNet itself runs in predict (see the module docstring).
        return {"control_context": control.to(noisy.dtype), "conditioning_scale": scale}

    def _controlnet_samples(
        self, components, latents, t, captions, residuals: dict[str, Any]
    ) -> dict[int, torch.Tensor]:
        return components.controlnet(
            latents,
            t,
            captions,
            residuals["control_context"],
            conditioning_scale=residuals["conditioning_scale"],
        )

    def predict(self, components, noisy, timesteps, cond, residuals=None):
        latents, t, captions = self._inputs(components, noisy, timesteps, cond)
        samples = None
        if residuals:
            samples = self._controlnet_samples(components, latents, t, captions, residuals)
        out = components.denoiser(
            latents, t, captions, controlnet_block_samples=samples, return_dict=False
        )[0]
        return -torch.stack(out).squeeze(2)

    # --- pipelines -----------------------------------------------------------------------
    def _pipeline_parts(self, components: Components) -> dict:
        return dict(
            scheduler=components.noise_scheduler,
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            transformer=components.denoiser,
        )

    def pipeline(self, components: Components) -> ZImagePipeline:
        return ZImagePipeline(**self._pipeline_parts(components))

    def controlnet_pipeline(self, components: Components) -> ZImageControlNetPipeline:
        return ZImageControlNetPipeline(
            **self._pipeline_parts(components), controlnet=components.controlnet
        )
