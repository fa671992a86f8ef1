"""Tiny, random-weight instances of the real diffusers denoiser and ControlNet classes.

Each builder makes the smallest config that still has every kind of block the class has
(double and single stream, refiners, dual attention, ...), so target lists are checked against
the module names diffusers really uses. Construction takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def wrapper() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build()

    wrapper.__name__ = build.__name__
    return wrapper


@_seeded
def unet_sd1x() -> nn.Module:
    from slider_cn.families.sd1x import tiny_sd1x_unet

    return tiny_sd1x_unet()


@_seeded
def unet_sdxl() -> nn.Module:
    from slider_cn.families.sdxl import tiny_sdxl_unet

    return tiny_sdxl_unet()


@_seeded
def sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )


@_seeded
def sd35() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    # SD3.5: the first block has a second (image-only) attention, `attn2`, and qk norms.
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


@_seeded
def flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


@_seeded
def flux2() -> nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(2, 2, 2, 2),
    )


@_seeded
def chroma() -> nn.Module:
    from diffusers import ChromaTransformer2DModel

    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )


@_seeded
def auraflow() -> nn.Module:
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )


@_seeded
def lumina2() -> nn.Module:
    from diffusers import Lumina2Transformer2DModel

    return Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=16,
        cap_feat_dim=8,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(32, 32, 32),
    )


@_seeded
def wan() -> nn.Module:
    from diffusers import WanTransformer3DModel

    # An image-to-video config: its cross-attention also carries the image context (add_k/v_proj).
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
        image_dim=8,
        added_kv_proj_dim=16,
    )


@_seeded
def hidream() -> nn.Module:
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[8, 4],
        text_emb_dim=8,
        num_routed_experts=2,
        num_activated_experts=1,
        axes_dims_rope=(4, 4),
        max_resolution=(16, 16),
        llama_layers=[0, 1],
    )


@_seeded
def ltxvideo() -> nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    )


@_seeded
def qwenimage() -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )


@_seeded
def cosmos() -> nn.Module:
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=1,
        attention_head_dim=24,
        num_layers=1,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 16, 16),
        patch_size=(1, 2, 2),
    )


@_seeded
def stable_cascade() -> nn.Module:
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=16,
        patch_size=1,
        conditioning_dim=16,
        block_out_channels=(16, 16),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        clip_text_pooled_in_channels=8,
        clip_seq=2,
        clip_text_in_channels=8,
        dropout=(0.0, 0.0),
        self_attn=True,
        timestep_conditioning_type=("sca", "crp"),
        switch_level=(False,),
    )


@_seeded
def kandinsky5() -> nn.Module:
    from diffusers import Kandinsky5Transformer3DModel

    return Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        in_text_dim=32,
        in_text_dim2=16,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=48,
        ff_dim=96,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(8, 8, 8),
    )


@_seeded
def zimage() -> nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[32, 32, 32],
    )


@_seeded
def sana() -> nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    )


@_seeded
def pixart() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=8,
        norm_num_groups=1,
    )


DENOISERS: dict[str, Callable[[], nn.Module]] = {
    "sd1x": unet_sd1x,
    "sdxl": unet_sdxl,
    "sd3": sd3,
    "sd35": sd35,
    "flux": flux,
    "flux2": flux2,
    "chroma": chroma,
    "auraflow": auraflow,
    "lumina2": lumina2,
    "wan": wan,
    "hidream": hidream,
    "ltxvideo": ltxvideo,
    "qwenimage": qwenimage,
    "cosmos": cosmos,
    "stable_cascade": stable_cascade,
    "kandinsky5": kandinsky5,
    "zimage": zimage,
    "sana": sana,
    "pixart": pixart,
}
# Instances whose architecture name differs from the key.
DENOISER_ARCH = {"sd35": "sd3"}


# --- ControlNets, built the way a fresh one is made for training ----------------------------
def controlnet_for(arch: str) -> tuple[nn.Module, nn.Module]:
    """(ControlNet, denoiser) for an architecture; the ControlNet is freshly initialised."""
    denoiser = DENOISERS[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return _CONTROLNETS[arch](denoiser), denoiser


def _controlnet_model(unet: nn.Module) -> nn.Module:
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))


def _sd3_controlnet(transformer: nn.Module) -> nn.Module:
    from diffusers import SD3ControlNetModel

    return SD3ControlNetModel.from_transformer(transformer, num_layers=1)


def _flux_controlnet(transformer: nn.Module) -> nn.Module:
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=4
    )


def _qwenimage_controlnet(transformer: nn.Module) -> nn.Module:
    from diffusers import QwenImageControlNetModel

    return QwenImageControlNetModel.from_transformer(
        transformer, num_layers=1, attention_head_dim=8, num_attention_heads=4
    )


def _sana_controlnet(transformer: nn.Module) -> nn.Module:
    from diffusers import SanaControlNetModel

    # diffusers has no from_transformer for Sana: the ControlNet repeats the transformer's config.
    cfg = transformer.config
    keys = (
        "in_channels",
        "out_channels",
        "num_attention_heads",
        "attention_head_dim",
        "num_layers",
        "num_cross_attention_heads",
        "cross_attention_head_dim",
        "cross_attention_dim",
        "caption_channels",
        "sample_size",
    )
    return SanaControlNetModel(**{key: cfg[key] for key in keys})


def _zimage_controlnet(transformer: nn.Module) -> nn.Module:
    from diffusers import ZImageControlNetModel

    cfg = transformer.config
    controlnet = ZImageControlNetModel(
        control_layers_places=[0, 1],
        control_in_dim=16,
        all_patch_size=tuple(cfg.all_patch_size),
        all_f_patch_size=tuple(cfg.all_f_patch_size),
        dim=cfg.dim,
        n_refiner_layers=cfg.n_refiner_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
    )
    # Share the embedders and refiners with the transformer, as the Z-Image pipeline does.
    return ZImageControlNetModel.from_transformer(controlnet, transformer)


_CONTROLNETS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "sd1x": _controlnet_model,
    "sdxl": _controlnet_model,
    "sd3": _sd3_controlnet,
    "flux": _flux_controlnet,
    "qwenimage": _qwenimage_controlnet,
    "sana": _sana_controlnet,
    "zimage": _zimage_controlnet,
}
CONTROLNET_ARCHS = tuple(_CONTROLNETS)
