"""Slider targets of the architectures the guide names that slider-cn cannot train yet.

Plain data, kept here only until each gets its family: adding the family moves its entry into
``slider_cn/families/<name>.py`` (as ``targets``), and the entry here is deleted. The names and
classes are listed so that `slider-cn targets --list-families` can show what exists and
tests/test_targets.py can check every list against the real diffusers classes.
"""

from __future__ import annotations

from slider_cn.targets.spec import (
    QKVO,
    SELF_ATTN1,
    ArchitectureTargets,
)

NOT_YET_TRAINABLE: tuple[ArchitectureTargets, ...] = (
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
)
