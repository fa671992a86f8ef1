"""The training config: a typed schema, JSON loading, ``--key value`` overrides, clear errors.

Key names follow SimpleTuner where SimpleTuner has one, so a SimpleTuner config can be brought
over (its ``"--key"`` spelling and ``"controlnet": true`` are accepted too).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from slider_cn.data.config import BucketOptions
from slider_cn.errors import ConfigError, read_json, suggest
from slider_cn.families import FLOW_OPTIONS, family_card

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_overrides", "read_json"]


log = logging.getLogger("slider_cn.config")

# Keys whose values are file-system paths: relative values resolve against the config file's
# folder (or the working directory for command-line overrides).
PATH_KEYS = (
    "data_backend_config",
    "output_dir",
    "cache_dir",
    "lycoris_config",
    "user_prompt_library",
    "validation_conditioning_image",
    "assistant_lora_path",
    "slider_prompts",
)
# Keys that are a local folder *or* a hub id: resolved only when the relative path exists.
MODEL_KEYS = ("pretrained_model_name_or_path", "controlnet_model_name_or_path")
# Keys only some families read (each family's registry line lists its own); setting one for a
# family that ignores it is a warning.
FAMILY_OPTIONS = frozenset({*FLOW_OPTIONS, "flux_guidance_value"})
# `tiny` models train at this resolution unless told otherwise (they are for tests).
TINY_RESOLUTION = 64
# Model names built into slider-cn; never resolved as relative paths.
BUILTIN_MODEL_NAMES = ("tiny", "shapes", "shapes-canny")
# Keys that must name an existing file or folder when set (checked after resolution).
MUST_EXIST_KEYS = (
    "data_backend_config",
    "lycoris_config",
    "user_prompt_library",
    "validation_conditioning_image",
    "assistant_lora_path",
    "slider_prompts",
)


class TrainConfig(BucketOptions):
    """Every key slider-cn's training understands. See the README's config reference.

    The aspect-bucket keys (`resolution_type`, `crop`, ...) come from BucketOptions: here they
    are the defaults of every backend of the dataloader config.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model -------------------------------------------------------------------------
    model_type: Literal["lora"] = Field(
        "lora",
        description="SimpleTuner's `model_type`: only `lora` (a slider is an adapter; `lora_type` picks PEFT or LyCORIS). `full` is refused.",
    )
    model_family: str = Field(
        "sd1x",
        description="Model family: `sd1x` (SD 1.x/2.x), `sdxl`, `sd3` (SD3/3.5), `flux` (Flux.1), `zimage` (Z-Image / Turbo), `qwenimage`, `sana`, `flux2`, `chroma`, `hidream`, `lumina2`, `auraflow`, `pixart` (PixArt-Σ), `cosmos` (Cosmos 2) or `kandinsky5` (see Model families).",
    )
    pretrained_model_name_or_path: str = Field(
        "tiny",
        description="Diffusers folder or hub id of the base model; `tiny` builds a small random model offline; `shapes` is the small shipped model that draws coloured shapes (32 px).",
    )
    training_mode: Literal["lora", "controlnet"] = Field(
        "lora",
        description="`lora`: slider on the base denoiser (a ControlNet, if any, stays frozen). `controlnet`: slider on the ControlNet.",
    )
    controlnet: bool = Field(
        False, description="SimpleTuner's spelling of `training_mode: controlnet`."
    )
    controlnet_model_name_or_path: str | None = Field(
        None,
        description="ControlNet folder or hub id (`shapes-canny`: the shipped canny ControlNet of `shapes`); unset in controlnet mode builds a fresh one from the denoiser.",
    )
    controlnet_conditioning_scale: float = Field(
        1.0, ge=0.0, description="Scale of the ControlNet residuals fed to the denoiser."
    )

    # --- adapter -------------------------------------------------------------------------
    lora_type: Literal["standard", "lycoris"] = Field(
        "standard",
        description="`standard`: PEFT LoRA. `lycoris`: the lycoris-lora library, configured by `lycoris_config`.",
    )
    lora_rank: int = Field(16, ge=1, description="LoRA rank (standard LoRA).")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; unset means alpha = rank (scale 1)."
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lycoris_config: str | None = Field(
        None,
        description="lycoris_config.json (algo, linear_dim, linear_alpha, ...) for `lora_type: lycoris`.",
    )
    slider_lora_target: bool = Field(
        True,
        description="Adapt only the slider targets (self-attention, conv/proj, time embedding; never text or cross-attention); `false` uses the family's ordinary LoRA targets.",
    )
    slider_neutral_mode: Literal["preserve", "regular"] = Field(
        "preserve",
        description="Neutral batches: `preserve` matches the frozen base at ±max|s|; `regular` is a plain loss at strength 1.",
    )
    slider_prompts: str | list[dict[str, Any]] | None = Field(
        None,
        description="Text sliders: a JSON file or inline list of {target, positive, negative, ...} entries (see Text sliders); trained alone or beside image backends.",
    )
    slider_allow_unbalanced: bool = Field(
        False, description="Allow positive and negative groups of different sizes."
    )
    assistant_lora_path: str | None = Field(
        None,
        description="A LoRA file loaded frozen into the base (e.g. a turbo model's training adapter).",
    )
    assistant_lora_strength: float = Field(
        1.0, description="Strength of the assistant adapter during training."
    )
    assistant_lora_inference_strength: float = Field(
        0.0, description="Strength of the assistant adapter during validation."
    )

    # --- flow matching (sd3, flux, zimage) ----------------------------------------------
    flow_use_uniform_schedule: bool = Field(
        False,
        description="Flow-matching families: draw noise levels uniformly instead of logit-normal.",
    )
    flow_sigmoid_scale: float = Field(
        1.0,
        gt=0.0,
        description="Flow-matching families: scale of the normal draw under the sigmoid (logit-normal spread).",
    )
    flow_schedule_shift: float | None = Field(
        None,
        gt=0.0,
        description="Flow-matching families: a static shift of the noise levels; unset uses the scheduler's own (static or resolution-dependent).",
    )
    flow_schedule_auto_shift: bool = Field(
        False,
        description="Flow-matching families: shift the noise levels by resolution, as Flux's scheduler does.",
    )
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="Flow-matching families: per-noise-level loss weights (diffusers' SD3 schemes); `none` is plain MSE.",
    )
    flux_guidance_value: float = Field(
        1.0,
        ge=0.0,
        description="Flux with a guidance embedding (dev): the guidance value fed to it during training.",
    )

    # --- data ----------------------------------------------------------------------------
    data_backend_config: str | None = Field(
        None, description="JSON list of dataset backends (required to train)."
    )
    resolution: int | None = Field(
        None,
        ge=8,
        description="Training resolution in pixels (square), a multiple of 8; unset uses the family's (512 for sd1x, 1024 for sdxl / sd3 / flux / zimage; 32 for `shapes`, 64 for `tiny`).",
    )
    cache_dir: str | None = Field(
        None,
        description="Folder of the cached VAE latents and text embeddings; unset uses `<output_dir>/cache`.",
    )
    caption_dropout_probability: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Each image caption is replaced by the empty caption with this probability (drawn from the run's seeded noise generator, so resume is exact); text-slider prompts are never dropped. Unset or 0: no dropout.",
    )

    # --- schedule ------------------------------------------------------------------------
    output_dir: str = Field(
        "output", description="Where checkpoints and the final adapter are written."
    )
    max_train_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps to train; overrides num_train_epochs when set (0, as in SimpleTuner, means unset).",
    )
    num_train_epochs: int = Field(
        1,
        ge=0,
        description="Epochs to train when max_train_steps is unset; 0 (SimpleTuner's way) means train for max_train_steps, which must then be set.",
    )
    train_batch_size: int = Field(1, ge=1, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(1e-4, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    lr_num_cycles: int = Field(
        1, ge=1, description="`cosine_with_restarts`: the number of hard restarts."
    )
    lr_power: float = Field(
        1.0,
        gt=0.0,
        description="`polynomial`: the power of the decay (diffusers' default 1.0; SimpleTuner's is 0.8).",
    )
    optimizer: Literal["adamw", "adamw_8bit", "prodigy"] = Field(
        "adamw",
        description="`adamw` (torch; SimpleTuner's `adamw_bf16` is read as it: the slider's master weights are fp32), `adamw_8bit` / `adamw8bit` (bitsandbytes), `prodigy` (the prodigyopt package; learning_rate is its multiplier, usually 1.0).",
    )
    optimizer_config: str | dict[str, Any] | None = Field(
        None,
        description="Extra optimizer arguments, SimpleTuner's `key=value,key=value` (e.g. `d_coef=0.5,use_bias_correction=true` for prodigy) or an object.",
    )
    adam_beta1: float = Field(
        0.9, ge=0.0, lt=1.0, description="AdamW / Prodigy beta1 (SimpleTuner's `optimizer_beta1`)."
    )
    adam_beta2: float = Field(
        0.999,
        ge=0.0,
        lt=1.0,
        description="AdamW / Prodigy beta2 (SimpleTuner's `optimizer_beta2`).",
    )
    adam_weight_decay: float = Field(1e-2, ge=0.0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    max_grad_norm: float = Field(
        1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping."
    )
    grad_clip_method: Literal["norm", "value"] = Field(
        "norm",
        description="`norm`: scale the gradients to a total norm of max_grad_norm; `value`: clamp each element to ±max_grad_norm (SimpleTuner's two).",
    )
    loss_type: Literal["l2", "huber", "smooth_l1"] = Field(
        "l2",
        description="Denoising loss of every forward: `l2` (MSE), `huber` / `smooth_l1` (pseudo-Huber with threshold `huber_c`, SimpleTuner's and diffusers' formulas); composed with flow_loss_weighting.",
    )
    huber_c: float = Field(
        0.1, gt=0.0, le=1.0, description="Threshold of the `huber` / `smooth_l1` losses."
    )
    huber_schedule: Literal["snr", "exponential", "constant"] = Field(
        "snr",
        description="How the threshold varies with the noise level: `snr` (SimpleTuner's default: from 1 on clean inputs toward huber_c on noisy ones), `exponential` (huber_c ** (t / T)), `constant`.",
    )
    use_ema: bool = Field(
        False,
        description="Keep an exponential moving average of the slider's weights; saved in checkpoints and written beside the slider as `*_ema.safetensors`.",
    )
    ema_decay: float = Field(
        0.995,
        gt=0.0,
        lt=1.0,
        description="EMA decay (SimpleTuner's default); early updates use min(ema_decay, (1 + n) / (10 + n)) as diffusers' EMAModel does.",
    )
    ema_update_interval: int | None = Field(
        None, ge=1, description="Update the EMA every N optimizer steps (unset: every step)."
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="Autocast precision; `auto` is `bf16` on a GPU that computes it natively (Ampere and newer) and `no` elsewhere.",
    )
    base_model_precision: Literal["no", "fp8", "int8", "nf4"] = Field(
        "no",
        description="How the frozen denoiser (and a frozen ControlNet) is stored: `no` (training dtype), `fp8` / `int8` (torchao weight-only), `nf4` (bitsandbytes, CUDA only); SimpleTuner's `int8-quanto`, `fp8-torchao`, `nf4-bnb`... map to these. The slider stays full precision.",
    )
    text_encoder_precision: Literal["no", "fp8", "int8", "nf4"] = Field(
        "no", description="The same for the frozen text encoders."
    )
    offload_text_encoders: bool = Field(
        False,
        description="Keep the text encoders in CPU memory; they go to the GPU only to encode captions the text cache lacks and for validation images.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    seed: int = Field(42, ge=0, description="Seed of weights (tiny), noise and the sampler.")

    # --- checkpoints ---------------------------------------------------------------------
    checkpointing_steps: int = Field(
        500, ge=1, description="Write a checkpoint every N optimizer steps."
    )
    checkpoints_total_limit: int | None = Field(
        None, ge=1, description="Keep at most N checkpoints (oldest pruned)."
    )
    resume_from_checkpoint: str | None = Field(
        None, description="`latest` or a checkpoint folder to continue from."
    )

    # --- validation ----------------------------------------------------------------------
    validation_prompt: str | None = Field(
        None, description="Prompt used for validation when no prompt library is given."
    )
    user_prompt_library: str | None = Field(
        None,
        description='JSON object of named prompts: a string or {"prompt", "adapter_strength"}.',
    )
    validation_steps: int = Field(
        0,
        ge=0,
        description="Validate every N optimizer steps; 0 disables validation during training.",
    )
    validation_adapter_strength: float = Field(
        1.0, description="Adapter strength for prompts that give none."
    )
    validation_conditioning_image: str | None = Field(
        None, description="Conditioning image for validation in ControlNet runs."
    )
    validation_num_inference_steps: int = Field(
        20, ge=1, description="Denoising steps per validation image."
    )
    validation_guidance: float | None = Field(
        None,
        ge=0.0,
        description="Guidance scale for validation, under the pipeline's own name (`true_cfg_scale` for Qwen-Image); unset uses the family's usual one (its pipeline's default: 7.5 sd1x, 5 sdxl, 7 sd3, 3.5 flux, 5 zimage, 4 qwenimage, 4.5 sana, 4 flux2, 5 chroma, 5 hidream, 4 lumina2, 3.5 auraflow, 4.5 pixart, 7 cosmos, 3.5 kandinsky5; 0 for Z-Image Turbo and HiDream Dev / Fast, 1 for Qwen-Image Lightning).",
    )
    validation_seed: int | None = Field(
        None, ge=0, description="Seed of validation images; unset uses `seed`."
    )
    validation_resolution: int | str | None = Field(
        None,
        description="Size of validation images: `1024` (square), `1024x768` (width x height) or SimpleTuner's comma list (the first is rendered); multiples of 8. Unset uses `resolution`.",
    )
    validation_guidance_rescale: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="CFG rescale of validation images, passed as `guidance_rescale` to pipelines that take it (SD 1.x/2.x, SDXL); a warning once for those that do not.",
    )

    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Where metrics are logged."
    )

    @field_validator("base_model_precision", "text_encoder_precision", mode="before")
    @classmethod
    def _simpletuner_precision(cls, value: Any, info) -> Any:
        from slider_cn.precision import ALIASES

        if isinstance(value, str) and value in ALIASES:
            mapped = ALIASES[value]
            logging.getLogger("slider_cn.config").info(
                "%s %r is read as %r (slider-cn's nearest)", info.field_name, value, mapped
            )
            return mapped
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value}); try {value - value % 8 or 8}")
        return value

    @field_validator("model_type", mode="before")
    @classmethod
    def _lora_only(cls, value: Any) -> Any:
        if value == "full":
            raise ValueError(
                "model_type 'full' (a full fine-tune) is not supported: slider-cn trains slider "
                "adapters; set model_type 'lora' (lora_type picks PEFT or LyCORIS)"
            )
        if value != "lora":
            raise ValueError(f"model_type must be 'lora' (got {value!r})")
        return value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _simpletuner_optimizer(cls, value: Any) -> Any:
        if isinstance(value, str) and value in OPTIMIZER_ALIASES:
            mapped = OPTIMIZER_ALIASES[value]
            if value == "adamw_bf16":
                log.info(
                    "optimizer 'adamw_bf16' is read as 'adamw': the slider's master weights are "
                    "fp32, so AdamW needs no bf16 rounding"
                )
            return mapped
        if isinstance(value, str) and value not in ("adamw", "adamw_8bit", "prodigy"):
            names = ["adamw", "adamw_bf16", "adamw8bit", "adamw_8bit", "prodigy"]
            raise ValueError(
                f"optimizer {value!r} is not supported by slider-cn; use one of "
                f"{', '.join(names)}{suggest(value, names)}"
            )
        return value

    @field_validator("max_train_steps", mode="before")
    @classmethod
    def _zero_steps_is_unset(cls, value: Any) -> Any:
        # SimpleTuner: max_train_steps 0 lets num_train_epochs decide
        return None if value in (0, "0") else value

    @field_validator("validation_resolution")
    @classmethod
    def _validation_sizes(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_sizes(value)
        return value

    @field_validator("optimizer_config")
    @classmethod
    def _optimizer_arguments(cls, value: str | dict | None) -> str | dict | None:
        if value is not None:
            parse_optimizer_config(value)
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.num_train_epochs == 0 and self.max_train_steps is None:
            raise ValueError(
                "num_train_epochs 0 means 'train for max_train_steps', but max_train_steps is "
                "unset (or 0): set max_train_steps, or num_train_epochs to 1 or more"
            )
        return self

    @field_validator("model_family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from slider_cn.families import REFUSED, family_names

        names = family_names()
        if value in REFUSED:
            raise ValueError(f"{value!r} cannot be trained: {REFUSED[value]}")
        if value not in names:
            raise ValueError(
                f"unknown model family {value!r}; known: {', '.join(names)}{suggest(value, names)}"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _megapixels_as_pixel_area(cls, data: Any) -> Any:
        """`resolution_type: area` measures in megapixels; here `resolution` is also the
        square side validation and text sliders use, so the same sizes are written as their
        `pixel_area` equivalents (the side of a square of that area)."""
        if not isinstance(data, dict) or data.get("resolution_type") != "area":
            return data
        data = dict(data)
        data["resolution_type"] = "pixel_area"
        for key in (
            "resolution",
            "minimum_image_size",
            "maximum_image_size",
            "target_downsample_size",
        ):
            value = data.get(key)
            try:
                value = float(value) if not isinstance(value, bool) else None
            except (TypeError, ValueError):
                value = None  # left for the field's own validation to report
            if value is not None:
                side = math.sqrt(value * 1_000_000)
                data[key] = int(round(side / 8)) * 8 if key == "resolution" else side
        return data

    @model_validator(mode="after")
    def _simpletuner_controlnet_flag(self) -> TrainConfig:
        # `"controlnet": true` is SimpleTuner's way of saying controlnet mode.
        if self.controlnet and self.training_mode != "controlnet":
            object.__setattr__(self, "training_mode", "controlnet")
        if self.is_shapes:
            from slider_cn.shapes import FAMILY

            if self.model_family != FAMILY:
                raise ValueError(
                    f"the shapes model is an {FAMILY} pipeline; set model_family to '{FAMILY}' "
                    f"(got {self.model_family!r})"
                )
        self._family_defaults()
        if self.lora_type == "lycoris" and not self.lycoris_config:
            raise ValueError(
                "lora_type 'lycoris' needs lycoris_config (a lycoris_config.json file)"
            )
        return self

    def _family_defaults(self) -> None:
        """Keys the user left unset that depend on the family, the model or the machine."""
        family = family_card(self.model_family)
        given = self.model_fields_set
        if not family.controlnet and (
            self.training_mode == "controlnet" or self.controlnet_model_name_or_path
        ):
            raise ValueError(
                f"model_family {self.model_family!r} has no ControlNet in diffusers, so "
                "training_mode must be 'lora' with no controlnet_model_name_or_path"
            )
        if self.resolution is None:
            if self.is_shapes:
                from slider_cn.shapes import NATIVE_RESOLUTION

                resolution = NATIVE_RESOLUTION
            else:
                resolution = TINY_RESOLUTION if self.is_tiny else family.resolution
            object.__setattr__(self, "resolution", resolution)
        if self.validation_guidance is None:
            guidance = family.validation_guidance(self.pretrained_model_name_or_path)
            object.__setattr__(self, "validation_guidance", guidance)
        ignored = sorted(k for k in FAMILY_OPTIONS & given if k not in family.options)
        if ignored:
            log.warning(
                "%s: %s %s only for other families; %s ignores %s",
                self.model_family,
                ", ".join(ignored),
                "is" if len(ignored) == 1 else "are",
                self.model_family,
                "it" if len(ignored) == 1 else "them",
            )

    @property
    def is_tiny(self) -> bool:
        return self.pretrained_model_name_or_path == "tiny"

    @property
    def is_shapes(self) -> bool:
        """The shipped shapes model, by its name or its folder's path."""
        from slider_cn.shapes import builtin_name

        return builtin_name(self.pretrained_model_name_or_path) == "shapes"

    @property
    def cache_path(self) -> Path:
        """Where the latent and text-embedding caches live."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def validation_size(self) -> tuple[int, int]:
        """(width, height) of validation images: the first of `validation_resolution`, else the
        square `resolution`."""
        if self.validation_resolution is None:
            return (self.resolution, self.resolution)
        return parse_sizes(self.validation_resolution)[0]

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        """`optimizer_config` as keyword arguments of the optimizer."""
        return parse_optimizer_config(self.optimizer_config) if self.optimizer_config else {}


# SimpleTuner's optimizer names -> slider-cn's
OPTIMIZER_ALIASES = {
    "adamw_bf16": "adamw",
    "adamw8bit": "adamw_8bit",
    "bnb-adamw8bit": "adamw_8bit",
}


def parse_sizes(value: int | str) -> list[tuple[int, int]]:
    """SimpleTuner's validation_resolution: `1024`, `1024x768` (width x height), or a comma list
    of those -> [(width, height), ...]; each side a multiple of 8."""
    sizes = []
    for part in str(value).split(","):
        text = part.strip().lower()
        if not text:
            continue
        sides = text.split("x")
        try:
            numbers = [float(s) for s in sides]
        except ValueError:
            raise ValueError(
                f"{part.strip()!r} is not a size: write 1024, 1024x768 (width x height) or a comma list"
            ) from None
        if len(numbers) not in (1, 2) or any(n != int(n) or n < 8 for n in numbers):
            raise ValueError(f"{part.strip()!r} is not a size in pixels (e.g. 1024 or 1024x768)")
        width, height = (int(numbers[0]), int(numbers[-1]))
        for side in (width, height):
            if side % 8:
                raise ValueError(
                    f"{part.strip()!r}: sides must be multiples of 8 (try {side - side % 8 or 8})"
                )
        sizes.append((width, height))
    if not sizes:
        raise ValueError("is empty")
    return sizes


def parse_optimizer_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """SimpleTuner's `optimizer_config` (`key=value,key=value`) or an object -> kwargs; values
    are read as numbers, booleans or None where they look like one."""
    if isinstance(value, dict):
        return dict(value)
    kwargs: dict[str, Any] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"{part.strip()!r} is not key=value")
        key, text = (s.strip() for s in part.split("=", 1))
        lowered = text.lower()
        if lowered in ("true", "false"):
            kwargs[key] = lowered == "true"
        elif lowered in ("none", "null"):
            kwargs[key] = None
        else:
            try:
                kwargs[key] = int(text)
            except ValueError:
                try:
                    kwargs[key] = float(text)
                except ValueError:
                    kwargs[key] = text
    return kwargs


KNOWN_KEYS = tuple(TrainConfig.model_fields)


def _normalise_key(key: str) -> str:
    # SimpleTuner's config.json writes keys as command-line flags: "--learning_rate".
    return key.lstrip("-").replace("-", "_") if key.startswith("--") else key


def parse_overrides(tokens: list[str]) -> dict[str, str | None]:
    """Turn ``--key value`` / ``--key=value`` tokens into a dict. A bare ``--flag`` means true."""
    overrides: dict[str, str | None] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: overrides are written --key value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        overrides[key.replace("-", "_")] = value
    return overrides


def _unknown_keys(keys: list[str], source: str) -> list[str]:
    """One error line per unknown key (all of them, each with its did-you-mean: slider-cn's
    keys first, SimpleTuner's accepted ones only when no key of ours is close)."""
    from slider_cn import simpletuner

    accepted = (*simpletuner.IGNORED_KEYS, *simpletuner.OFF_ONLY_KEYS, *simpletuner.KEY_ALIASES)
    return [
        f"{source}: unknown key '{key}'{suggest(key, KNOWN_KEYS) or suggest(key, accepted)}"
        for key in keys
        if key not in KNOWN_KEYS and key not in accepted
    ]


def _simpletuner_keys(
    values: dict[str, Any], source: str, not_used: set[str], errors: list[str]
) -> dict[str, Any]:
    """SimpleTuner's keys (slider_cn/simpletuner.py) sorted out of ``values``: aliases renamed,
    machinery keys (and off-only keys at their off value) added to ``not_used``, off-only keys
    that are on reported in ``errors``. Returns the rest (ours and the unknown)."""
    from slider_cn import simpletuner

    kept: dict[str, Any] = {}
    for key, value in values.items():
        if key in KNOWN_KEYS:
            kept[key] = value
        elif key in simpletuner.KEY_ALIASES:
            ours = simpletuner.KEY_ALIASES[key]
            if ours in values:
                errors.append(f"{source}: '{key}' is SimpleTuner's name of '{ours}': give one")
            else:
                kept[ours] = value
        elif key in simpletuner.OFF_ONLY_KEYS:
            if simpletuner.is_off(key, value):
                not_used.add(key)
            else:
                errors.append(simpletuner.off_only_error(key, value, source))
        elif key in simpletuner.IGNORED_KEYS:
            not_used.add(key)
        else:
            kept[key] = value
    return kept


def _coerce_cli_value(key: str, value: str | None) -> Any:
    # Command-line values are strings; pydantic coerces "2" -> int, "true" -> bool, "1e-4" ->
    # float. "none"/"null" clears an optional key.
    if value is not None and value.lower() in ("none", "null"):
        field = TrainConfig.model_fields[key]
        if not field.is_required() and field.default is None:
            return None
    return value


def _resolve_paths(values: dict[str, Any], base: Path, keys: set[str]) -> None:
    for key in keys:
        value = values.get(key)
        if not isinstance(value, str) or not value:
            continue
        if key in PATH_KEYS:
            if not Path(value).expanduser().is_absolute():
                values[key] = str((base / Path(value).expanduser()).resolve())
            else:
                values[key] = str(Path(value).expanduser())
        elif key in MODEL_KEYS and value not in BUILTIN_MODEL_NAMES:
            candidate = base / Path(value).expanduser()
            if not Path(value).is_absolute() and candidate.exists():
                values[key] = str(candidate.resolve())
        elif (
            key == "resume_from_checkpoint" and value != "latest" and not Path(value).is_absolute()
        ):
            values[key] = str((base / value).resolve())


def _format_error(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "(config)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{suggest(key, KNOWN_KEYS)}"
    if err["loc"]:
        return f"{source}: key '{key}': {msg} (got {err.get('input')!r})"
    return f"{source}: {msg}"


def load_config(
    path: str | Path | None, overrides: dict[str, str | None] | None = None
) -> TrainConfig:
    """Load a config file (JSON, SimpleTuner's config.toml or config.env; or only defaults when
    ``path`` is None) and apply overrides. SimpleTuner's machinery keys are accepted and named
    once in one log line (slider_cn/simpletuner.py)."""
    from slider_cn.simpletuner import is_env_file, read_config_file

    file_values: dict[str, Any] = {}
    source = "command line"
    from_env = False
    not_used: set[str] = set()
    if path is not None:
        path = Path(path)
        raw, env_not_used = read_config_file(path)
        not_used.update(env_not_used)
        file_values = {_normalise_key(k): v for k, v in raw.items()}
        source = str(path)
        # config.env values are strings, typed like command-line values
        from_env = is_env_file(path)

    # Every problem in one message: all unknown keys, then every bad value of the known ones.
    errors: list[str] = []
    file_values = _simpletuner_keys(file_values, source, not_used, errors)
    cli_overrides = _simpletuner_keys(dict(overrides or {}), "command line", not_used, errors)
    errors += _unknown_keys(list(file_values), source if path is not None else "config")
    errors += _unknown_keys(list(cli_overrides), "command line")
    file_values = {
        k: _coerce_cli_value(k, v) if from_env and isinstance(v, str) else v
        for k, v in file_values.items()
        if k in KNOWN_KEYS
    }
    if path is not None:
        _resolve_paths(file_values, path.parent.resolve(), set(file_values))
    cli_values: dict[str, Any] = {
        k: _coerce_cli_value(k, v) for k, v in cli_overrides.items() if k in KNOWN_KEYS
    }
    _resolve_paths(cli_values, Path.cwd(), set(cli_values))

    merged = {**file_values, **cli_values}
    try:
        config = TrainConfig.model_validate(merged)
    except ValidationError as exc:
        for err in exc.errors():
            src = "command line" if err["loc"] and err["loc"][0] in cli_values else source
            errors.append(_format_error(err, src))
    if errors:
        raise ConfigError("\n".join(errors))
    if not_used:
        log.info("not used by slider-cn: %s", ", ".join(sorted(not_used)))

    for key in MUST_EXIST_KEYS:
        value = getattr(config, key)
        if isinstance(value, str) and not Path(value).exists():
            where = "command line" if key in cli_values else source
            raise ConfigError(f"{where}: key '{key}': file not found: {value}")
    return config


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(config.model_dump(), indent=2, sort_keys=False)
