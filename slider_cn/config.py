"""The training config: a typed schema, JSON loading, ``--key value`` overrides, clear errors.

Key names follow SimpleTuner where SimpleTuner has one, so a SimpleTuner config can be brought
over (its ``"--key"`` spelling and ``"controlnet": true`` are accepted too).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class TrainConfig(BaseModel):
    """Every key slider-cn's training understands. See the README's config reference."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- model -------------------------------------------------------------------------
    model_family: str = Field(
        "sd1x",
        description="Model family: `sd1x` (SD 1.x/2.x), `sdxl`, `sd3` (SD3/3.5), `flux` (Flux.1) or `zimage` (Z-Image / Turbo).",
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

    # --- schedule ------------------------------------------------------------------------
    output_dir: str = Field(
        "output", description="Where checkpoints and the final adapter are written."
    )
    max_train_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to train; overrides num_train_epochs when set."
    )
    num_train_epochs: int = Field(
        1, ge=1, description="Epochs to train when max_train_steps is unset."
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
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="`adamw` (torch) or `adamw_8bit` (needs bitsandbytes)."
    )
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0.0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    max_grad_norm: float = Field(
        1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping."
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
        description="Guidance scale for validation; unset uses the family's usual one (7.5 sd1x, 5 sdxl, 7 sd3, 3.5 flux, 5 zimage, 0 Z-Image Turbo).",
    )
    validation_seed: int | None = Field(
        None, ge=0, description="Seed of validation images; unset uses `seed`."
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
    """One error line per unknown key (all of them, each with its did-you-mean)."""
    return [
        f"{source}: unknown key '{key}'{suggest(key, KNOWN_KEYS)}"
        for key in keys
        if key not in KNOWN_KEYS
    ]


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
    """Load a config file (or only defaults when ``path`` is None) and apply overrides."""
    file_values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a JSON object of key: value pairs")
        file_values = {_normalise_key(k): v for k, v in raw.items()}
        source = str(path)

    # Every problem in one message: all unknown keys, then every bad value of the known ones.
    errors = _unknown_keys(list(file_values), source if path is not None else "config")
    errors += _unknown_keys(list(overrides or {}), "command line")
    file_values = {k: v for k, v in file_values.items() if k in KNOWN_KEYS}
    if path is not None:
        _resolve_paths(file_values, path.parent.resolve(), set(file_values))
    cli_values: dict[str, Any] = {
        k: _coerce_cli_value(k, v) for k, v in (overrides or {}).items() if k in KNOWN_KEYS
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

    for key in MUST_EXIST_KEYS:
        value = getattr(config, key)
        if isinstance(value, str) and not Path(value).exists():
            where = "command line" if key in cli_values else source
            raise ConfigError(f"{where}: key '{key}': file not found: {value}")
    return config


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(config.model_dump(), indent=2, sort_keys=False)
