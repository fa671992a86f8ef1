"""AuraFlow (`auraflow`): MMDiT joint blocks then single-stream blocks, a UMT5 text encoder.

Conventions of AuraFlowPipeline that training follows:

- prompts are encoded by the pipeline's own ``encode_prompt``: the UMT5 encoder's last hidden
  states, padded to ``max_sequence_length`` (256) and zeroed on the padding; the transformer
  takes no mask (it reads the zeroed padding, as at inference);
- latents are the SDXL-style 4-channel VAE's, scaled and not shifted, unpacked (B, C, H, W):
  the transformer patchifies them itself;
- the transformer's time is sigma (the pipeline passes ``t / 1000``) and it predicts the
  scheduler's velocity ``noise - x`` directly;
- the scheduler shifts its sigmas with a static ``shift`` (1.73 in the AuraFlow checkpoints);
  training shifts its sampled sigmas the same way (flow.py). (The pipeline lets the scheduler
  place its inference steps, evenly from 1 to its smallest training sigma before the shift; the
  text-slider sampler, ``sampling_timesteps``, uses flow.py's evenly spaced grid to 0, which
  agrees on the first step and differs slightly after it.)

The slider adapts the image stream's attention of the joint blocks and the attention of the
single blocks (which attend over [register + text; image] tokens together), the patch
embedding, the timestep MLP and the output projection; the text stream of the joint blocks
(``add_*_proj``, ``to_add_out``, ``ff_context``, ``norm1_context``) and ``context_embedder`` are
never adapted. diffusers has no AuraFlow ControlNet: LoRA mode only.
"""

from __future__ import annotations

import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import UMT5Config, UMT5EncoderModel

from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import TINY_LATENT_CHANNELS, FlowMatchingFamily, load_pipeline
from slider_cn.families.sd import tiny_vae
from slider_cn.families.tiny_tokenizer import build_tiny_t5_tokenizer
from slider_cn.targets.spec import ATTN, JOINT_TEXT, QKVO, ArchitectureTargets

# AuraFlow's VAE is SDXL's: 4 channels, scaled by 0.13025, no shift factor.
AURAFLOW_VAE_SCALING = 0.13025
# AuraFlow's scheduler: a static shift of 1.73 (scheduler/scheduler_config.json).
AURAFLOW_SHIFT = 1.73


class AuraFlowFamily(FlowMatchingFamily):
    name = "auraflow"
    description = "AuraFlow (AuraFlowTransformer2DModel, UMT5 text encoder)"
    denoiser_model_class = AuraFlowTransformer2DModel
    pipeline_class = AuraFlowPipeline
    targets = ArchitectureTargets(
        slider=(
            *ATTN,
            "pos_embed.proj",
            "time_step_proj.linear_1",
            "time_step_proj.linear_2",
            "proj_out",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        note="Joint and single blocks both name their image attention `attn.*`; the joint "
        "blocks' text stream (`add_*_proj`, `to_add_out`, `ff_context`) is never adapted.",
    )
    max_sequence_length_default = 256  # AuraFlowPipeline's default
    max_sequence_length_tiny = 64  # byte tokens: whole demo captions fit

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        tokenizer = build_tiny_t5_tokenizer(self.max_sequence_length_tiny)
        with seeded(seed):
            text_encoder = UMT5EncoderModel(
                UMT5Config(
                    vocab_size=len(tokenizer),
                    d_model=32,
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
            vae = tiny_vae(AURAFLOW_VAE_SCALING)
            transformer = AuraFlowTransformer2DModel(
                sample_size=8,  # 64 px
                patch_size=2,
                in_channels=TINY_LATENT_CHANNELS,
                out_channels=TINY_LATENT_CHANNELS,
                num_mmdit_layers=1,
                num_single_dit_layers=1,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,  # the text encoder's width
                caption_projection_dim=32,  # = the inner width (register tokens are that wide)
                pos_embed_max_size=64,  # an 8x8 patch grid: up to 128 px
            )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=AURAFLOW_SHIFT)
        return Components(transformer, vae, [text_encoder], [tokenizer], scheduler)

    def load_pretrained(self, path: str) -> Components:
        pipe = load_pipeline(AuraFlowPipeline, path, self.load_dtype, "AuraFlow pipeline")
        return Components(
            pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler
        )

    # --- encoding ------------------------------------------------------------------------
    def text_pipeline(self, components: Components) -> AuraFlowPipeline:
        return AuraFlowPipeline(
            tokenizer=components.tokenizers[0],
            text_encoder=components.text_encoders[0],
            vae=None,
            transformer=None,
            scheduler=None,
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, _, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            device=self._text_device(components),
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds}  # padding already zeroed by the pipeline

    # --- forward -------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, residuals=None):
        return components.denoiser(
            noisy,
            encoder_hidden_states=cond["prompt_embeds"],
            # the pipeline's t / 1000: sigma
            timestep=self.sigmas(components, timesteps).to(device=noisy.device, dtype=noisy.dtype),
            return_dict=False,
        )[0]

    # --- pipelines -----------------------------------------------------------------------
    def pipeline(self, components: Components) -> AuraFlowPipeline:
        return AuraFlowPipeline(
            tokenizer=components.tokenizers[0],
            text_encoder=components.text_encoders[0],
            vae=components.vae,
            transformer=components.denoiser,
            scheduler=components.noise_scheduler,
        )
