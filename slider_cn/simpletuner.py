"""SimpleTuner's training-config files and keys, as slider-cn reads them (README: "Coming from
SimpleTuner").

- Files: ``config.json`` (keys with or without ``--``), ``config.toml`` (the same keys, with or
  without ``--``) and ``config.env`` (a shell file of ``export VAR=value`` lines). The env file
  is parsed, never executed: ``export`` and ``#`` comments are dropped, values are unquoted as a
  shell would (``shlex``), ``$VAR`` / ``${VAR}`` expand to variables set earlier in the file
  (empty when unset), ``VAR+=value`` appends; SimpleTuner's variable names map to keys
  (``ENV_KEYS``), ``TRAINER_EXTRA_ARGS`` holds ``--key=value`` flags, and a variable named
  like a key (``LORA_RANK``) sets that key.
- Keys: ``KEY_ALIASES`` are SimpleTuner's other names of our keys; ``IGNORED_KEYS`` only tune
  SimpleTuner's own machinery (hub uploads, trackers, caches, attention kernels, ...): accepted
  and listed once in one log line; ``OFF_ONLY_KEYS`` would change what is trained (or promise
  something slider-cn does not do, such as an upload): accepted at their "off" value, a clear
  error otherwise.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from slider_cn.errors import ConfigError, read_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# SimpleTuner's config.env variables (helpers/configuration/env_file.py) -> config keys.
ENV_KEYS = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint",
    "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding",
    "TRAINING_SEED": "seed",
    "USE_EMA": "use_ema",
    "USE_XFORMERS": "enable_xformers_memory_efficient_attention",
    "MINIMUM_RESOLUTION": "minimum_image_size",
    "OUTPUT_DIR": "output_dir",
    "USE_DORA": "use_dora",
    "USE_BITFIT": "layer_freeze_strategy",  # SimpleTuner: --layer_freeze_strategy=bitfit
    "LORA_TYPE": "lora_type",
    "LYCORIS_CONFIG": "lycoris_config",
    "PUSH_TO_HUB": "push_to_hub",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub",
    "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs",
    "CHECKPOINTING_STEPS": "checkpointing_steps",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit",
    "HUB_MODEL_NAME": "hub_model_id",
    "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work",
    "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name",
    "MODEL_TYPE": "model_type",
    "MODEL_NAME": "pretrained_model_name_or_path",
    "MODEL_FAMILY": "model_family",
    "TRAIN_BATCH_SIZE": "train_batch_size",
    "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability",
    "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution",
    "VALIDATION_SEED": "validation_seed",
    "VALIDATION_STEPS": "validation_steps",
    "VALIDATION_RESOLUTION": "validation_resolution",
    "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps",
    "VALIDATION_PROMPT": "validation_prompt",
    "ALLOW_TF32": "allow_tf32",
    "MIXED_PRECISION": "mixed_precision",
    "OPTIMIZER": "optimizer",
    "LEARNING_RATE": "learning_rate",
    "LR_SCHEDULE": "lr_scheduler",
    "LR_WARMUP_STEPS": "lr_warmup_steps",
    "BASE_MODEL_PRECISION": "base_model_precision",
    "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_NUM_MACHINES": "num_machines",
    "VALIDATION_TORCH_COMPILE": "validation_torch_compile",
    "TRAINER_DYNAMO_BACKEND": "dynamo_backend",
    "TRAINING_DYNAMO_BACKEND": "dynamo_backend",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "LR_END": "lr_end",
    "FLUX_GUIDANCE_VALUE": "flux_guidance_value",
    "FLUX_LORA_TARGET": "flux_lora_target",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt",
    "METADATA_UPDATE_INTERVAL": "metadata_update_interval",
    "READ_BATCH_SIZE": "read_batch_size",
    "WRITE_BATCH_SIZE": "write_batch_size",
    "AWS_MAX_POOL_CONNECTIONS": "aws_max_pool_connections",
    "TORCH_NUM_THREADS": "torch_num_threads",
    "IMAGE_PROCESSING_BATCH_SIZE": "image_processing_batch_size",
}
# The variable of extra command-line flags (``--key=value ...``).
EXTRA_ARGS_VARIABLE = "TRAINER_EXTRA_ARGS"
# Variables of SimpleTuner's launcher scripts (accelerate, the venv, logging): not keys.
LAUNCHER_VARIABLES = (
    "ACCELERATE_EXTRA_ARGS",
    "VENV_PATH",
    "SIMPLETUNER_LOG_LEVEL",
    "SIMPLETUNER_ENVIRONMENT",
    "SIMPLETUNER_ENV",
    "ENV",
    "CONFIG_BACKEND",
    "CONFIG_TYPE",
    "DISABLE_UPDATES",
    "DISABLE_LD_OVERRIDE",
    "MIXED_PRECISION_TYPE",
    "HF_HOME",
    "HF_ENDPOINT",
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
    "NCCL_P2P_DISABLE",
    "NCCL_IB_DISABLE",
    "TOKENIZERS_PARALLELISM",
)

# SimpleTuner's other names of slider-cn keys.
KEY_ALIASES = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "optimizer_beta1": "adam_beta1",
    "optimizer_beta2": "adam_beta2",
    "flow_matching_sigmoid_scale": "flow_sigmoid_scale",
    "flux_use_uniform_schedule": "flow_use_uniform_schedule",
    "flux_schedule_shift": "flow_schedule_shift",
    "flux_schedule_auto_shift": "flow_schedule_auto_shift",
}

# Keys that only tune SimpleTuner's own machinery, by why slider-cn has no use for them.
IGNORED_GROUPS: dict[str, tuple[str, ...]] = {
    "hub uploads and model cards: slider-cn writes files to output_dir, upload them yourself": (
        "hub_model_id",
        "push_to_hub_background",
        "model_card_note",
        "model_card_safe_for_work",
        "model_card_private",
        "post_upload_script",
        "post_checkpoint_script",
    ),
    "trackers and notifications: slider-cn logs to train_log.jsonl and `report_to`": (
        "tracker_project_name",
        "tracker_run_name",
        "tracker_image_layout",
        "logging_dir",
        "webhook_config",
        "webhook_reporting_interval",
    ),
    "validation extras: slider-cn renders each prompt as a strength sweep with the family's own pipeline": (
        "disable_benchmark",
        "validation_on_startup",
        "validation_torch_compile",
        "validation_torch_compile_mode",
        "validation_disable_unconditional",
        "validation_seed_source",
        "validation_prompt_library",
        "num_validation_images",
        "validation_negative_prompt",
        "validation_noise_scheduler",
        "validation_randomize",
        "validation_guidance_real",
        "validation_no_cfg_until_timestep",
        "validation_guidance_skip_layers",
        "validation_guidance_skip_layers_start",
        "validation_guidance_skip_layers_stop",
        "validation_guidance_skip_scale",
        "validation_stitch_input_location",
        "validation_using_datasets",
        "validation_lycoris_strength",
        "validation_preview",
        "validation_preview_steps",
        "validation_method",
        "validation_external_script",
        "validation_external_background",
        "validation_epoch_interval",
        "validation_disable",
        "ema_validation",
        "evaluation_type",
        "eval_steps_interval",
        "eval_epoch_interval",
        "eval_timesteps",
        "eval_dataset_pooling",
        "num_eval_images",
        "eval_dataset_id",
        "pretrained_evaluation_model_name_or_path",
        "enable_watermark",
    ),
    "speed and memory knobs of SimpleTuner's own loops (slider-cn has base_model_precision, text_encoder_precision, offload_text_encoders, gradient_checkpointing)": (
        "attention_mechanism",
        "enable_xformers_memory_efficient_attention",
        "sageattention_usage",
        "fuse_qkv_projections",
        "fused_qkv_projections",
        "quantize_via",
        "base_model_default_dtype",
        "text_encoder_1_precision",
        "text_encoder_2_precision",
        "text_encoder_3_precision",
        "text_encoder_4_precision",
        "gradient_checkpointing_interval",
        "gradient_precision",
        "vae_batch_size",
        "vae_dtype",
        "vae_enable_tiling",
        "vae_enable_slicing",
        "vae_enable_patch_conv",
        "vae_cache_ondemand",
        "vae_cache_disable",
        "vae_cache_scan_behaviour",
        "keep_vae_loaded",
        "offload_during_startup",
        "offload_during_save",
        "enable_group_offload",
        "group_offload_type",
        "group_offload_blocks_per_group",
        "group_offload_use_stream",
        "group_offload_to_disk_path",
        "enable_model_cpu_offload",
        "unet_attention_slice",
        "set_grads_to_none",
        "fully_unload_text_encoder",
        "allow_tf32",
        "disable_tf32",
        "accelerator_cache_clear_interval",
        "torch_num_threads",
        "dynamo_backend",
        "dynamo_mode",
        "dynamo_fullgraph",
        "dynamo_dynamic",
        "dynamo_use_regional_compilation",
        "optimizer_release_gradients",
        "optimizer_offload_gradients",
        "optimizer_cpu_offload_method",
        "fuse_optimizer",
        "ema_device",
        "ema_cpu_only",
        "ema_foreach_disable",
        "offload_param_path",
        "local_rank",
        "num_processes",
        "num_machines",
        "seed_for_each_device",
    ),
    "SimpleTuner's dataset scanning and caching machinery (slider-cn's caches key on content)": (
        "metadata_backend",
        "aspect_bucket_worker_count",
        "aspect_bucket_disable_rebuild",
        "compress_disk_cache",
        "skip_file_discovery",
        "preserve_data_backend_cache",
        "override_dataset_config",
        "read_batch_size",
        "write_batch_size",
        "image_processing_batch_size",
        "enable_multiprocessing",
        "max_workers",
        "aws_max_pool_connections",
        "dataloader_prefetch",
        "dataloader_prefetch_qlen",
        "metadata_update_interval",
        "debug_aspect_buckets",
        "debug_dataset_loader",
        "print_filenames",
        "print_sampler_statistics",
        "ignore_missing_files",
        "delete_unwanted_images",
        "delete_problematic_images",
        "disable_bucket_pruning",
        "allow_dataset_oversubscription",
        "data_backend_sampling",
    ),
    "checkpoint housekeeping: slider-cn writes checkpoints atomically every checkpointing_steps": (
        "checkpointing_use_tempdir",
        "checkpoints_rolling_total_limit",
    ),
    "settings of features that are off or absent here (their switch is refused when on)": (
        "noise_offset",
        "noise_offset_probability",
        "input_perturbation_steps",
        "timestep_bias_begin",
        "timestep_bias_end",
        "timestep_bias_multiplier",
        "timestep_bias_portion",
        "soft_min_snr_sigma_data",
        "snr_weight",
        "flux_guidance_min",
        "flux_guidance_max",
        "flow_beta_schedule_alpha",
        "flow_beta_schedule_beta",
        "refiner_training_strength",
        "refiner_training_invert_schedule",
        "data_aesthetic_score",
        "freeze_encoder_before",
        "freeze_encoder_after",
        "freeze_encoder_strategy",
        "freeze_encoder",
        "text_encoder_limit",
        "save_text_encoder",
        "i_know_what_i_am_doing",
        "conditioning_multidataset_sampling",
        "training_scheduler_timestep_spacing",
        "inference_scheduler_timestep_spacing",
        "lora_format",
        "model_flavour",
    ),
    "targets: a slider adapts the family's slider list (`slider_lora_target`), never SimpleTuner's per-model LoRA target presets": (
        "flux_lora_target",
    ),
}
IGNORED_KEYS: dict[str, str] = {key: why for why, keys in IGNORED_GROUPS.items() for key in keys}

_FALSE = ("false", "0", "0.0", "none", "null", "no", "")
# Keys that change what is trained (or promise an action slider-cn does not take): accepted
# at their "off" value (None, false, 0, or one of the strings given), an error otherwise.
OFF_ONLY_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "push_to_hub": ((), "slider-cn uploads nothing; upload output_dir yourself"),
    "push_checkpoints_to_hub": ((), "slider-cn uploads nothing"),
    "publishing_config": ((), "slider-cn uploads nothing"),
    "use_dora": ((), "DoRA adapters are not trained here (lora_type standard or lycoris)"),
    "lora_init_type": (("default",), "slider adapters start from PEFT's default init"),
    "init_lora": (
        (),
        "a slider starts from a fresh adapter (resume_from_checkpoint continues a run)",
    ),
    "init_lokr_norm": ((), "set LyCORIS options in lycoris_config"),
    "peft_lora_mode": (("standard",), "only standard PEFT LoRA is trained"),
    "singlora_ramp_up_steps": ((), "only standard PEFT LoRA is trained"),
    "layer_freeze_strategy": (("none",), "only the slider adapter is trained"),
    "train_text_encoder": ((), "text encoders stay frozen (a slider is never on text modules)"),
    "text_encoder_lr": ((), "text encoders stay frozen"),
    "snr_gamma": (
        (),
        "min-SNR loss weighting is not implemented (loss_type, flow_loss_weighting are)",
    ),
    "use_soft_min_snr": ((), "min-SNR loss weighting is not implemented"),
    "masked_loss_probability": ((), "masked loss is not implemented"),
    "offset_noise": ((), "offset noise is not implemented"),
    "input_perturbation": ((), "input perturbation is not implemented"),
    "timestep_bias_strategy": (("none",), "timestep bias is not implemented"),
    "prediction_type": ((), "the prediction type is read from the model's scheduler config"),
    "rescale_betas_zero_snr": ((), "the noise schedule is the model's own"),
    "pretrained_vae_model_name_or_path": (
        (),
        "the VAE is the one of pretrained_model_name_or_path",
    ),
    "pretrained_transformer_model_name_or_path": (
        (),
        "components come from pretrained_model_name_or_path",
    ),
    "pretrained_unet_model_name_or_path": (
        (),
        "components come from pretrained_model_name_or_path",
    ),
    "pretrained_t5_model_name_or_path": ((), "components come from pretrained_model_name_or_path"),
    "pretrained_transformer_subfolder": (
        ("transformer",),
        "components come from pretrained_model_name_or_path",
    ),
    "pretrained_unet_subfolder": (("unet",), "components come from pretrained_model_name_or_path"),
    "revision": (("main",), "pass a local folder or hub id of the revision you want"),
    "variant": ((), "models load in their stored precision"),
    "tokenizer_max_length": ((), "prompts are encoded at the family's own length"),
    "flux_guidance_mode": (("constant",), "Flux trains at the constant flux_guidance_value"),
    "flux_attention_masked_training": ((), "not implemented"),
    "flux_fast_schedule": ((), "not implemented"),
    "flow_use_beta_schedule": ((), "flow noise levels are logit-normal or uniform here"),
    "t5_padding": (("unmodified",), "prompts are encoded by the family's own pipeline"),
    "sd3_clip_uncond_behaviour": (
        ("empty_string",),
        "a dropped caption is the encoded empty string",
    ),
    "sd3_t5_uncond_behaviour": (("empty_string",), "a dropped caption is the encoded empty string"),
    "refiner_training": ((), "refiner (mixture-of-experts) training is not implemented"),
    "sdxl_refiner_uses_full_range": ((), "refiner training is not implemented"),
    "lr_end": ((), "the polynomial schedule ends at diffusers' 1e-7"),
    "lr_scale": ((), "learning_rate is used as given"),
    "lr_scale_sqrt": ((), "learning_rate is used as given"),
    "ignore_final_epochs": ((), "training stops at max_train_steps or num_train_epochs"),
    "checkpoint_epoch_interval": ((), "checkpoints are written every checkpointing_steps"),
    "checkpointing_rolling_steps": ((), "checkpoints are written every checkpointing_steps"),
    "control": ((), "channel-wise control training is not implemented (ControlNet is)"),
    "controlnet_custom_config": ((), "a fresh ControlNet is built from the denoiser"),
    "tread_config": ((), "TREAD is not implemented"),
    "distillation_method": ((), "distillation is not implemented"),
    "distillation_config": ((), "distillation is not implemented"),
    "scheduled_sampling_max_step_offset": ((), "scheduled sampling is not implemented"),
    "scheduled_sampling_probability": ((), "scheduled sampling is not implemented"),
    "crepa_enabled": ((), "CREPA is not implemented"),
    "diff2flow_enabled": ((), "diff2flow is not implemented"),
    "diff2flow_loss": ((), "diff2flow is not implemented"),
    "prodigy_steps": ((), "pass Prodigy's own options in optimizer_config"),
    "hidream_use_load_balancing_loss": (
        (),
        "the slider does not adapt HiDream's experts, so there is no load to balance",
    ),
    "sageattention_usage": (("inference",), "training attention is PyTorch's SDPA"),
}
# a key in both tables is off-only (its value decides)
for _key in OFF_ONLY_KEYS:
    IGNORED_KEYS.pop(_key, None)


def is_off(key: str, value: Any) -> bool:
    """Whether an OFF_ONLY_KEYS value means "not used"."""
    allowed, _ = OFF_ONLY_KEYS[key]
    if value is None or value is False or (not isinstance(value, bool) and value == 0):
        return True
    if isinstance(value, str):
        text = value.strip().lower()
        return text in _FALSE or text in allowed
    return isinstance(value, list | tuple | dict) and not value


def off_only_error(key: str, value: Any, source: str) -> str:
    allowed, why = OFF_ONLY_KEYS[key]
    off = ", ".join([*(repr(a) for a in allowed), "false / unset"])
    try:
        shown = json.dumps(value)  # as a config file writes it (true, not True)
    except (TypeError, ValueError):
        shown = repr(value)
    return (
        f"{source}: key '{key}' = {shown} is not supported by slider-cn: {why}; "
        f"remove it or set it to {off}"
    )


# --- files ---------------------------------------------------------------------------------


def read_config_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A training config file as a dict of key: value (keys as written, ``--`` kept): JSON,
    TOML (``.toml``) or SimpleTuner's config.env (``.env``); and the names of the env file's
    variables that set nothing (listed as not used)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    not_used: list[str] = []
    if suffix == ".toml":
        raw = read_toml(path)
    elif is_env_file(path):
        raw, not_used = read_env(path)
    else:
        raw = read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a JSON object of key: value pairs")
    return raw, not_used


def is_env_file(path: Path) -> bool:
    return path.suffix.lower() == ".env" or path.name.lower() == "config.env"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None


_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)(\+?=)(.*)$")
_REFERENCE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _env_value(text: str, variables: dict[str, str], where: str) -> str:
    """A shell value without the shell: references expanded from ``variables`` (inside double
    quotes and bare, not inside single quotes), quotes removed, a trailing comment dropped."""
    try:
        # expand references first, except inside single quotes
        expanded: list[str] = []
        quote = None
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "'" and quote is None:
                end = text.find("'", i + 1)
                end = len(text) if end < 0 else end + 1
                expanded.append(text[i:end])
                i = end
                continue
            if ch == '"':
                quote = None if quote == '"' else '"'
            if ch == "$":
                match = _REFERENCE.match(text, i)
                if match:
                    value = variables.get(match.group(1) or match.group(2), "")
                    # the value itself, literally (no second round of quotes or references)
                    if quote == '"':
                        expanded.append(re.sub(r'(["\\$`])', r"\\\1", value))
                    elif value:
                        expanded.append(shlex.quote(value))
                    i = match.end()
                    continue
            expanded.append(ch)
            i += 1
        words = shlex.split("".join(expanded), comments=True, posix=True)
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot read the value {text.strip()!r}: {exc}") from None
    return " ".join(words)


def read_env(path: Path) -> tuple[dict[str, Any], list[str]]:
    """SimpleTuner's config.env, parsed (never run): see the module docstring. Returns the
    values and the variables that set no key."""
    variables: dict[str, str] = {}
    referenced: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGNMENT.match(stripped)
        where = f"{path}:{number}"
        if match is None:
            raise ConfigError(
                f"{where}: expected `export NAME=value` (a config.env is read, not run): {stripped!r}"
            )
        name, operator, text = match.groups()
        referenced.update(a or b for a, b in _REFERENCE.findall(text))
        value = _env_value(text, variables, where)
        if operator == "+=":
            value = f"{variables.get(name, '')} {value}".strip()
        variables[name] = value
    return env_to_config(variables, str(path), referenced)


def env_to_config(
    variables: dict[str, str], source: str, referenced: set[str] = frozenset()
) -> tuple[dict[str, Any], list[str]]:
    """config.env variables -> ``{key: value}`` (strings, typed later like command-line
    values) and the variables that set nothing. SimpleTuner skips ``false`` flags; here they
    are false. A variable that sets nothing is an error when it looks like a misspelt name
    (SimpleTuner's or ours; not when other lines use it), else it is listed as not used."""
    from slider_cn.config import KNOWN_KEYS, parse_overrides

    values: dict[str, Any] = {}
    errors: list[str] = []
    not_used: list[str] = []
    names = [*ENV_KEYS, EXTRA_ARGS_VARIABLE, *(k.upper() for k in KNOWN_KEYS)]
    for name, value in variables.items():
        if name == EXTRA_ARGS_VARIABLE:
            continue
        if name in ENV_KEYS:
            key = ENV_KEYS[name]
            if name == "USE_BITFIT":
                value = "bitfit" if value.lower() == "true" else "none"
            values[key] = value
        elif name.lower() in KNOWN_KEYS:
            values[name.lower()] = value
        elif name in LAUNCHER_VARIABLES or name in referenced:
            not_used.append(name)
        elif close := difflib.get_close_matches(name, names, n=1, cutoff=0.8):
            # a near miss of a name (a stricter match than for keys: shell files hold other
            # variables too)
            errors.append(f"{source}: unknown variable '{name}' (did you mean '{close[0]}'?)")
        else:
            not_used.append(name)
    extra = variables.get(EXTRA_ARGS_VARIABLE, "")
    if extra:
        try:
            values.update(parse_overrides(shlex.split(extra)))
        except ConfigError as exc:
            errors.append(f"{source}: {EXTRA_ARGS_VARIABLE}: {exc}")
    if errors:
        raise ConfigError("\n".join(errors))
    return values, not_used
