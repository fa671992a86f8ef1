"""The architecture of the `shapes` pipeline: real SD1.x classes, sized for 32-pixel pictures.

- a word-level tokenizer over the world's vocabulary (``tokenizers``, wrapped as
  ``PreTrainedTokenizerFast``), 12 tokens long;
- ``CLIPTextModel`` (64 wide, 2 layers), trained with the UNet;
- ``AutoencoderKL`` with three levels: 32 px -> 8x8x4 latents;
- ``UNet2DConditionModel`` (64/128 channels, cross-attention at both levels) with
  ``addition_embed_type="text"``: a pooled text embedding added to the time embedding, the path
  that lets so small a model follow its captions;
- v-prediction on the cosine (``squaredcos_cap_v2``) schedule, which gives clean shapes at
  this size;
- a canny ``ControlNetModel`` made with ``from_unet`` (conditioning embedding downsamples 4x).
"""

from __future__ import annotations

import numpy as np
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from conditioning.canny import CannyEdges
from slider_cn.shapes import NATIVE_RESOLUTION
from slider_cn.shapes.world import COLOURS, SHAPES, SIZES

RESOLUTION = NATIVE_RESOLUTION
MAX_TOKENS = 12
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"
VOCABULARY: tuple[str, ...] = ("a", *SIZES, *COLOURS, *SHAPES)
CONDITIONING_CHANNELS = (16, 32, 64)  # three entries: 4x down, as the VAE
# What shapes-canny learns from: `slider-cn preprocess --detector canny` with its defaults.
_CANNY = CannyEdges({"low_threshold": 100, "high_threshold": 200, "detect_resolution": None})


def canny_map(image) -> np.ndarray:
    """The HxW uint8 canny map of a PIL picture, as shapes-canny saw them in training."""
    return _CANNY(np.asarray(image), image.size, "")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Words of the world -> one id each; any other word -> <unk>. CLIP-style BOS/EOS padding."""
    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for word in VOCABULARY:
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    )


def build_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS
    )
