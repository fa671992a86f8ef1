"""Slider targets of the architectures the guide names that slider-cn cannot train yet.

Plain data, kept here only until each gets its family: adding the family moves its entry into
``slider_cn/families/<name>.py`` (as ``targets``), and the entry here is deleted. The names and
classes are listed so that `slider-cn targets --list-families` can show what exists and
tests/test_targets.py can check every list against the real diffusers classes.
"""

from __future__ import annotations

from slider_cn.targets.spec import (
    ATTN,
    JOINT_TEXT,
    QKVO,
    SELF_ATTN1,
    ArchitectureTargets,
)

NOT_YET_TRAINABLE: tuple[ArchitectureTargets, ...] = (
    ArchitectureTargets(
        name="flux2",
        description="Flux.2 (Flux2Transformer2DModel)",
        denoiser_classes=("Flux2Transformer2DModel",),
        slider=(
            *ATTN,
            "attn.to_qkv_mlp_proj",  # single blocks: fused q/k/v + MLP input
            "single_transformer_blocks.*.attn.to_out",  # single blocks: a Linear, no `.0`
            "x_embedder",
            "time_guidance_embed.timestep_embedder.linear_1",
            "time_guidance_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(
            *QKVO,
            *JOINT_TEXT,
            "to_qkv_mlp_proj",
            "single_transformer_blocks.*.attn.to_out",
        ),
        note="Double blocks use `attn.to_q/k/v/to_out.0`; single blocks fuse q/k/v and the MLP "
        "input into `attn.to_qkv_mlp_proj` and project out with `attn.to_out` (no `.0`).",
    ),
    ArchitectureTargets(
        name="chroma",
        description="Chroma (ChromaTransformer2DModel)",
        denoiser_classes=("ChromaTransformer2DModel",),
        slider=(
            *ATTN,
            "proj_out",
            "x_embedder",
            "distilled_guidance_layer.in_proj",
            "distilled_guidance_layer.out_proj",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        note="As flux; Chroma has no pooled text: its timestep/guidance embedding is the "
        "`distilled_guidance_layer` approximator.",
    ),
    ArchitectureTargets(
        name="auraflow",
        description="AuraFlow (AuraFlowTransformer2DModel)",
        denoiser_classes=("AuraFlowTransformer2DModel",),
        slider=(
            *ATTN,
            "pos_embed.proj",
            "time_step_proj.linear_1",
            "time_step_proj.linear_2",
            "proj_out",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        note="Joint and single blocks both name their image attention `attn.*`.",
    ),
    ArchitectureTargets(
        name="lumina2",
        description="Lumina-Image 2.0 (Lumina2Transformer2DModel)",
        denoiser_classes=("Lumina2Transformer2DModel",),
        slider=(
            *ATTN,
            "x_embedder",
            "time_caption_embed.timestep_embedder.linear_1",
            "time_caption_embed.timestep_embedder.linear_2",
            "norm_out.linear_2",  # the final projection to latent patches
        ),
        ordinary=QKVO,
        note="The guide's general list matches nothing here: attention is `attn.*` in the "
        "main layers and the noise refiner (the caption's `context_refiner` is never adapted), "
        "there is no proj/conv in/out and the timestep MLP lives in `time_caption_embed`.",
    ),
    ArchitectureTargets(
        name="wan",
        description="Wan 2.x (WanTransformer3DModel)",
        denoiser_classes=("WanTransformer3DModel",),
        slider=(
            *SELF_ATTN1,
            "patch_embedding",
            "condition_embedder.time_embedder.linear_1",
            "condition_embedder.time_embedder.linear_2",
            "condition_embedder.time_proj",
            "proj_out",
        ),
        ordinary=(*QKVO, "add_k_proj", "add_v_proj"),
        exclude=("image_embedder",),  # image-to-video CLIP context, fed to cross-attention
        note="Self-attention is `attn1`; patch embedding and `condition_embedder.time_*` stand "
        "in for conv_in and time_embedding.",
    ),
    ArchitectureTargets(
        name="hidream",
        description="HiDream-I1 (HiDreamImageTransformer2DModel)",
        denoiser_classes=("HiDreamImageTransformer2DModel",),
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
        note="`attn1.to_out` is a Linear (no `.0`); the text stream of the double blocks is "
        "`to_*_t` / `ff_t`, the pooled text `p_embedder`.",
    ),
    ArchitectureTargets(
        name="ltxvideo",
        description="LTX-Video (LTXVideoTransformer3DModel)",
        denoiser_classes=("LTXVideoTransformer3DModel",),
        slider=(
            *SELF_ATTN1,
            "proj_in",
            "proj_out",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
        ),
        ordinary=QKVO,
        note="The guide's general list fits, with the timestep MLP under `time_embed.emb`.",
    ),
    ArchitectureTargets(
        name="qwenimage",
        description="Qwen-Image (QwenImageTransformer2DModel)",
        denoiser_classes=("QwenImageTransformer2DModel",),
        slider=(
            *ATTN,
            "img_in",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=(*QKVO, *JOINT_TEXT),
        controlnet_classes=("QwenImageControlNetModel",),
        controlnet_slider=(
            *ATTN,
            "img_in",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "controlnet_x_embedder"),
        note="The guide's general list matches only `proj_out`: the image stream is `attn.*`, "
        "`img_in`, and the text stream (`txt_*`, `add_*`) is never adapted.",
    ),
    ArchitectureTargets(
        name="cosmos",
        description="Cosmos (CosmosTransformer3DModel)",
        denoiser_classes=("CosmosTransformer3DModel",),
        slider=(
            *SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.t_embedder.linear_1",
            "time_embed.t_embedder.linear_2",
            "proj_out",
        ),
        ordinary=QKVO,
        note="Self-attention is `attn1`; patch embedding and `time_embed.t_embedder` stand in "
        "for conv_in and time_embedding.",
    ),
    ArchitectureTargets(
        name="stable_cascade",
        description="Stable Cascade (StableCascadeUNet)",
        denoiser_classes=("StableCascadeUNet",),
        slider=(
            # Self-attention over [image; text] tokens, like a single-stream block; the text
            # enters through kv_mapper, which is never adapted.
            "attention.to_q",
            "attention.to_k",
            "attention.to_v",
            "attention.to_out.0",
            "^embedding.1",  # the input conv
            "^clf.1",  # the output conv
            "mapper",  # timestep-ratio embedding of each block
            "mapper_*",  # extra timestep conditionings (sca, crp)
        ),
        ordinary=(*QKVO, "kv_mapper.1"),  # the whole attention block, text mapper included
        exclude=("clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper"),
        note="The guide's general list matches nothing: attention is `attention.*`, the input "
        "and output convs are `embedding.1` / `clf.1`, the timestep blocks' `mapper*`.",
    ),
    ArchitectureTargets(
        name="kandinsky5",
        description="Kandinsky 5 (Kandinsky5Transformer3DModel)",
        denoiser_classes=("Kandinsky5Transformer3DModel",),
        slider=(
            "visual_transformer_blocks.*.self_attention.to_query",
            "visual_transformer_blocks.*.self_attention.to_key",
            "visual_transformer_blocks.*.self_attention.to_value",
            "visual_transformer_blocks.*.self_attention.out_layer",
            "visual_embeddings.in_layer",
            "time_embeddings.in_layer",
            "time_embeddings.out_layer",
            "^out_layer.out_layer",
        ),
        ordinary=("to_query", "to_key", "to_value"),  # text and cross-attention included
        exclude=("pooled_text_embeddings",),
        note="The guide's Kandinsky 5 list (`attn1.to_query`, `conv_in`, `time_embedding.*`) "
        "matches nothing: self-attention is `self_attention.*` in the visual blocks, "
        "embeddings are `visual_embeddings` / `time_embeddings`, the output `out_layer`.",
    ),
    ArchitectureTargets(
        name="sana",
        description="Sana (SanaTransformer2DModel)",
        denoiser_classes=("SanaTransformer2DModel",),
        slider=(
            *SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=QKVO,
        controlnet_classes=("SanaControlNetModel",),
        controlnet_slider=(
            *SELF_ATTN1,
            "patch_embed.proj",
            "time_embed.emb.timestep_embedder.linear_1",
            "time_embed.emb.timestep_embedder.linear_2",
        ),
        controlnet_outputs=("controlnet_blocks.*", "input_block"),
        note="Self-attention is `attn1`; patch embedding and the timestep MLP under "
        "`time_embed.emb` stand in for conv_in and time_embedding.",
    ),
    ArchitectureTargets(
        name="pixart",
        description="PixArt-α / Σ (PixArtTransformer2DModel)",
        denoiser_classes=("PixArtTransformer2DModel",),
        slider=(
            *SELF_ATTN1,
            "pos_embed.proj",
            "adaln_single.emb.timestep_embedder.linear_1",
            "adaln_single.emb.timestep_embedder.linear_2",
            "proj_out",
        ),
        ordinary=QKVO,
        note="Self-attention is `attn1`; the timestep MLP is under `adaln_single.emb`.",
    ),
)
