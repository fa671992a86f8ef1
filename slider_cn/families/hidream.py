"""HiDream-I1 (`hidream`): a sparse (mixture-of-experts) DiT with four text encoders.

Conventions of HiDreamImagePipeline that training follows:

- text: CLIP-L and CLIP-G (with projection) give only their pooled embeddings, concatenated
  (``pooled_embeds``); T5 gives a sequence; Llama 3.1 gives the hidden states of *every* layer,
  stacked (layers, B, L, D), and block ``i`` of the transformer reads layer ``llama_layers[i]``.
  The cache holds that stack batch-first (B, layers, L, D); ``predict`` swaps it back;
- the transformer takes the latents as (B, C, H, W), the timestep as ``sigma * 1000`` and
  predicts ``x - noise`` (the pipeline negates it), so the velocity is its output negated;
- in train mode (the recipe puts the trained model in train mode) the transformer returns
  patch tokens (B, C, H/2 * W/2, 4) instead of an image: ``predict`` unpatchifies them;
- the noise schedule is the shift of whichever scheduler the checkpoint holds: HiDream-I1-Full
  samples with UniPC on flow sigmas (``use_flow_sigmas``, a static ``flow_shift`` of 3: the
  tiny model's scheduler), Dev / Fast with flow-matching Euler / LCM schedulers (a static
  ``shift``, 6 / 3). A scheduler with ``use_dynamic_shifting`` gets the pipeline's ``mu``,
  computed from the transformer's ``max_seq``, not from the image size;
- prompts: T5 and Llama are cut at ``min(max_sequence_length, tokenizer.model_max_length)``,
  CLIP is padded to ``min(max_sequence_length, 218)`` (its pooled output, at the end token
  under a causal mask, does not depend on the padding).

HiDream's diffusers repos hold no Llama (Meta's licence): a model whose ``model_index.json``
names none gets ``meta-llama/Meta-Llama-3.1-8B-Instruct``, as the pipeline's own example loads.

The feed-forward of the image stream (``ff_i``) is a mixture of experts: a shared SwiGLU
expert plus routed experts picked per token by a gate (top-k of a softmax). In eval mode
diffusers runs the routed experts under ``torch.no_grad`` (``moe_infer``), which would cut the
gradient of everything upstream of them; in train mode it runs the differentiable dispatch,
which computes the same function. ``predict`` with gradients enabled on a model left in eval
mode switches those MoE layers to the differentiable path for the forward.

The pipeline renders at an area of 1024² whatever size it is asked for (``default_sample_size``
128): validation sets it from the training resolution, so a tiny run renders at 64 px.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    UniPCMultistepScheduler,
)
from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift
from transformers import (
    AutoTokenizer,
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
)

from slider_cn.errors import ConfigError
from slider_cn.families.base import Components, seeded
from slider_cn.families.flow import (
    TINY_LATENT_CHANNELS,
    FlowMatchingFamily,
    load_pipeline,
    tiny_flow_vae,
)
from slider_cn.families.flux import FLUX_VAE_SCALING, FLUX_VAE_SHIFT
from slider_cn.families.sd3 import tiny_clip_config, tiny_t5
from slider_cn.families.tiny_tokenizer import (
    build_tiny_llama_tokenizer,
    build_tiny_t5_tokenizer,
    build_tiny_tokenizer,
)
from slider_cn.targets.spec import ArchitectureTargets

log = logging.getLogger(__name__)

# HiDream's diffusers repos leave the Llama encoder out (its licence is Meta's); the pipeline's
# own example loads it from here.
LLAMA_ENCODER = "meta-llama/Meta-Llama-3.1-8B-Instruct"
TINY_LLAMA_LAYERS = 2  # one per transformer block: 1 double-stream + 1 single-stream
# HiDream's CLIP encoders are long-context (Long-CLIP's 248 positions): the pipeline pads CLIP
# prompts to min(max_sequence_length, 218) tokens, whatever the tokenizer's own limit.
CLIP_POSITIONS = 248


@contextlib.contextmanager
def differentiable_moe(model: torch.nn.Module):
    """Route the MoE feed-forwards through diffusers' differentiable (train-mode) dispatch while
    gradients are on; eval mode's ``moe_infer`` runs under no_grad. Same function either way."""
    if not torch.is_grad_enabled():
        yield
        return
    saved = []
    for module in model.modules():
        if isinstance(module, MOEFeedForwardSwiGLU):
            saved.append((module, module.training, module._force_inference_output))
            module.training, module._force_inference_output = True, False
    try:
        yield
    finally:
        for module, training, forced in saved:
            module.training, module._force_inference_output = training, forced


def unpatchify_tokens(out: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Train mode's output (B, C, S, p*p), tokens row-major, -> (B, C, H, W) latents."""
    b, c = out.shape[:2]
    ph, pw = height // patch, width // patch
    out = out[:, :, : ph * pw].reshape(b, c, ph, pw, patch, patch)
    return out.permute(0, 1, 2, 4, 3, 5).reshape(b, c, height, width)


class HiDreamFamily(FlowMatchingFamily):
    name = "hidream"
    description = (
        "HiDream-I1 Full / Dev / Fast (HiDreamImageTransformer2DModel, CLIP-L + CLIP-G + T5 + "
        "Llama 3.1, MoE feed-forward)"
    )
    denoiser_model_class = HiDreamImageTransformer2DModel
    targets = ArchitectureTargets(
        slider=(
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out",  # a Linear here, no `.0`
            "x_embedder.proj",
            "t_embedder.timestep_embedder.linear_1",
            "t_embedder.timestep_embedder.linear_2",
            "final_layer.linear",
        ),
        ordinary=("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"),
        exclude=("to_q_t", "to_k_t", "to_v_t", "to_out_t", "ff_t", "p_embedder"),
        note="`attn1.to_out` is a Linear (no `.0`). The double-stream blocks' text stream is "
        "`to_*_t` / `ff_t`, the pooled CLIP text `p_embedder`, the T5/Llama inputs "
        "`caption_projection`: none is adapted. Single-stream blocks run `attn1` over the joint "
        "image+text sequence (as Flux's single blocks). The mixture-of-experts feed-forward "
        "(`ff_i`: shared expert, routed experts, gate) is left alone: the gate is a bare "
        "parameter a LoRA cannot wrap, and an adapter on routed experts acts only on the tokens "
        "routed to them; the slider adapts attention, patch/time embedders and the output.",
    )
    pipeline_class = HiDreamImagePipeline
    max_sequence_length_default = 128  # HiDreamImagePipeline's default
    max_sequence_length_tiny = 32

    # --- building ------------------------------------------------------------------------
    def build_tiny(self, seed: int) -> Components:
        length = self.max_sequence_length_tiny
        tokenizers = [
            build_tiny_tokenizer(CLIP_POSITIONS),
            build_tiny_tokenizer(CLIP_POSITIONS),
            build_tiny_t5_tokenizer(length),
            build_tiny_llama_tokenizer(length),
        ]
        llama_tok = tokenizers[3]
        with seeded(seed):
            # CLIP-L and CLIP-G: projections concatenated into the pooled text (8 + 8 = 16).
            clip_l = CLIPTextModelWithProjection(
                tiny_clip_config(tokenizers[0], 16, projection_dim=8)
            )
            clip_g = CLIPTextModelWithProjection(
                tiny_clip_config(tokenizers[1], 16, projection_dim=8)
            )
            t5 = tiny_t5(tokenizers[2], d_model=16)
            llama = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=len(llama_tok),
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=TINY_LLAMA_LAYERS,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=2 * length,
                    bos_token_id=llama_tok.bos_token_id,
                    eos_token_id=llama_tok.eos_token_id,
                )
            )
            vae = tiny_flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT)  # HiDream uses Flux's VAE
            transformer = HiDreamImageTransformer2DModel(
                patch_size=2,
                in_channels=TINY_LATENT_CHANNELS,
                out_channels=TINY_LATENT_CHANNELS,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                caption_channels=[16, 16],  # [T5 width, Llama width]
                text_emb_dim=16,  # the two CLIP projections
                num_routed_experts=2,  # HiDream-I1: 4 routed experts, 2 per token
                num_activated_experts=1,
                axes_dims_rope=(8, 4, 4),  # sums to the head width
                max_resolution=(16, 16),  # latent pixels: up to 128 px images
                # one Llama layer per block (1 double + 1 single)
                llama_layers=list(range(TINY_LLAMA_LAYERS)),
            )
        # HiDream-I1-Full's scheduler: UniPC on flow sigmas with a static shift of 3.
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
        )
        return Components(transformer, vae, [clip_l, clip_g, t5, llama], tokenizers, scheduler)

    def load_pretrained(self, path: str) -> Components:
        extra = {}
        if not self._has_llama(path):
            # HiDream's own repos ship no Llama: load it as the pipeline's example does.
            log.info("%s has no Llama text encoder: loading %s", path, LLAMA_ENCODER)
            text_encoder_4, tokenizer_4 = self._load_llama(LLAMA_ENCODER)
            extra = {"text_encoder_4": text_encoder_4, "tokenizer_4": tokenizer_4}
        pipe = load_pipeline(
            HiDreamImagePipeline, path, self.load_dtype, "HiDream pipeline", **extra
        )
        return Components(
            pipe.transformer,
            pipe.vae,
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.text_encoder_4],
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3, pipe.tokenizer_4],
            pipe.scheduler,
        )

    @staticmethod
    def _has_llama(path: str) -> bool:
        """Whether the folder or repo's model_index.json names a Llama encoder and tokenizer."""
        try:
            index = HiDreamImagePipeline.load_config(path)
        except (OSError, ValueError):
            return True  # no readable index: load_pipeline reports the path's real problem
        return all((index.get(key) or [None])[0] for key in ("text_encoder_4", "tokenizer_4"))

    def _load_llama(self, path: str):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = LlamaForCausalLM.from_pretrained(path, torch_dtype=self.load_dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"could not load HiDream's Llama text encoder from {path} (a gated hub model: "
                "accept its licence and log in, or use a HiDream folder that has text_encoder_4 "
                f"and tokenizer_4): {exc}"
            ) from None
        return model, tokenizer

    # --- the noise schedule ----------------------------------------------------------------
    def _shift(self, components: Components, u: torch.Tensor, latents: torch.Tensor):
        config = self.config
        if config.flow_schedule_shift is not None or config.flow_schedule_auto_shift:
            return super()._shift(components, u, latents)
        scheduler = components.noise_scheduler
        sched = scheduler.config
        if sched.get("use_flow_sigmas", False):
            # UniPC (HiDream-I1-Full): the pipeline passes no mu, the static flow_shift applies
            shift = float(sched.get("flow_shift", 1.0))
            return shift * u / (1 + (shift - 1) * u)
        if sched.get("use_dynamic_shifting", False):
            # the pipeline's mu: from the transformer's max_seq, whatever the image size
            mu = calculate_shift(components.denoiser.max_seq)
            if hasattr(scheduler, "time_shift"):
                return scheduler.time_shift(mu, 1.0, u)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return super()._shift(components, u, latents)

    # --- encoding ------------------------------------------------------------------------
    def _text_parts(self, components: Components) -> dict:
        te1, te2, te3, te4 = components.text_encoders
        tok1, tok2, tok3, tok4 = components.tokenizers
        return dict(
            text_encoder=te1,
            tokenizer=tok1,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            text_encoder_3=te3,
            tokenizer_3=tok3,
            text_encoder_4=te4,
            tokenizer_4=tok4,
        )

    def text_pipeline(self, components: Components) -> HiDreamImagePipeline:
        return HiDreamImagePipeline(
            scheduler=None, vae=None, transformer=None, **self._text_parts(components)
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        t5, _, llama, _, pooled, _ = self.text_pipeline(components).encode_prompt(
            prompt=list(prompts),
            device=self._text_device(components),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {
            "prompt_embeds_t5": t5,
            # (layers, B, L, D) -> batch first for the cache
            "prompt_embeds_llama3": llama.transpose(0, 1).contiguous(),
            "pooled_prompt_embeds": pooled,
        }

    # --- forward -------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, residuals=None):
        model = components.denoiser
        config = model.config
        b, _, h, w = noisy.shape
        patch = config.patch_size
        if h != w and (h // patch) * (w // patch) > model.max_seq:
            raise ConfigError(
                f"hidream: a {w * 8}x{h * 8} image has more patches than the transformer's "
                f"max_resolution {tuple(config.max_resolution)} allows for non-square latents"
            )
        with differentiable_moe(model):
            out = model(
                hidden_states=noisy,
                timesteps=timesteps.to(noisy.device),
                encoder_hidden_states_t5=cond["prompt_embeds_t5"],
                encoder_hidden_states_llama3=cond["prompt_embeds_llama3"].transpose(0, 1),
                pooled_embeds=cond["pooled_prompt_embeds"],
                return_dict=False,
            )[0]
        if model.training and not config.force_inference_output:
            out = unpatchify_tokens(out, h, w, patch)
        return -out

    # --- pipelines -----------------------------------------------------------------------
    def pipeline(self, components: Components) -> HiDreamImagePipeline:
        return HiDreamImagePipeline(
            scheduler=components.noise_scheduler,
            vae=components.vae,
            transformer=components.denoiser,
            **self._text_parts(components),
        )

    def validation_pipeline(self, components: Components) -> HiDreamImagePipeline:
        # the training scheduler's own class (UniPC for Full, a flow-matching one for Dev/Fast)
        scheduler_class = type(components.noise_scheduler)
        if not hasattr(scheduler_class, "from_config"):
            scheduler_class = FlowMatchEulerDiscreteScheduler
        scheduler = scheduler_class.from_config(components.noise_scheduler.config)
        pipe = self.pipeline(dataclasses.replace(components, noise_scheduler=scheduler))
        # HiDreamImagePipeline rescales every request to the area of default_sample_size
        # latents squared (1024 px): render at the training resolution instead.
        pipe.default_sample_size = self.config.resolution // pipe.vae_scale_factor
        return pipe
