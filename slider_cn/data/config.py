"""The dataloader config: a JSON list of backends, with SimpleTuner's key names.

`load_backend_configs(path)` reads and validates the file (keys, types, ids, folders,
references); `slider_cn.data.backends.build_backends` then scans the folders.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from slider_cn.errors import ConfigError, read_json, suggest

log = logging.getLogger(__name__)


def real_number(value: Any) -> Any:
    """A field validator (mode "before") for strengths and weights: pydantic would read `true`
    as 1.0 and accept NaN; neither is a meaningful number here."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number (got {value})")
    return value


def multiple_of_8(value: int | None) -> int | None:
    """A field validator for resolutions."""
    if value is not None and value % 8:
        raise ValueError(f"must be a multiple of 8 (got {value}); try {value - value % 8 or 8}")
    return value


class BucketOptions(BaseModel):
    """Aspect-bucket keys (SimpleTuner's names), on the training config (defaults for every
    backend) and on each backend (its own). All unset: slider-cn's square centre crop at
    `resolution`. See slider_cn/data/buckets.py for what each means."""

    resolution_type: Literal["pixel", "area", "pixel_area"] | None = Field(
        None,
        description="How `resolution` measures an image: `pixel` its shorter edge, `pixel_area` the side of a square of its area, `area` its area in megapixels. Setting any bucket key turns aspect buckets on (default then `pixel_area`).",
    )
    crop: bool | None = Field(
        None,
        description="Crop to the bucket (`crop_aspect` decides its shape); false keeps the whole picture at its own aspect (only the few pixels of rounding are trimmed). Unset: true without bucket keys (a square crop), else false.",
    )
    crop_style: Literal["center", "centre", "random", "corner", "face"] | None = Field(
        None,
        description="Where the crop box sits: `center`, `random` (drawn once per image from the seed), `corner` (top-left).",
    )
    crop_aspect: Literal["square", "preserve", "closest", "random"] | None = Field(
        None,
        description="Crop shape: `square`, `preserve` (the image's own rounded aspect), `closest` / `random` (from `crop_aspect_buckets`).",
    )
    crop_aspect_buckets: list[float] | None = Field(
        None, description="Aspect ratios (width / height) for `crop_aspect` `closest` / `random`."
    )
    minimum_image_size: float | None = Field(
        None, ge=0, description="Leave out images smaller than this, in `resolution_type` units."
    )
    maximum_image_size: float | None = Field(
        None,
        gt=0,
        description="With `crop` and `target_downsample_size`: larger images are first brought to `target_downsample_size`, then cropped.",
    )
    target_downsample_size: float | None = Field(
        None, gt=0, description="See `maximum_image_size` (same units)."
    )
    minimum_aspect_ratio: float | None = Field(
        None, gt=0, description="Leave out images narrower than this width / height."
    )
    maximum_aspect_ratio: float | None = Field(
        None, gt=0, description="Leave out images wider than this width / height."
    )
    aspect_bucket_rounding: int | None = Field(
        None, ge=0, le=6, description="Decimals an aspect ratio is rounded to (default 2)."
    )

    @field_validator("crop_style")
    @classmethod
    def _no_face_crops(cls, value: str | None) -> str | None:
        if value == "face":
            raise ValueError(
                "crop_style 'face' needs a face detector, which slider-cn does not ship; use "
                "'center' or 'random'"
            )
        return "center" if value == "centre" else value

    def bucket_values(self) -> dict[str, Any]:
        """The bucket keys this config sets."""
        return {k: getattr(self, k) for k in BUCKET_OPTION_KEYS if getattr(self, k) is not None}


BUCKET_OPTION_KEYS = tuple(BucketOptions.model_fields)


class ConditioningSpec(BaseModel):
    """Conditioning generated inline for a backend: `{"type": "canny", "params": {...}}`.

    SimpleTuner's form is read too: its parameters beside `type` (they join `params`),
    `conditioning_type` (only `controlnet` is a ControlNet's conditioning) and `captions` (the
    captions of SimpleTuner's generated dataset; a slider's captions are its image's, so they
    are not used)."""

    model_config = ConfigDict(extra="allow")
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    conditioning_type: Literal["controlnet"] = "controlnet"
    captions: Any = None

    @model_validator(mode="before")
    @classmethod
    def _simpletuner_form(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = {"type", "params", "conditioning_type", "captions"}
        extra = {k: v for k, v in data.items() if k not in known}
        if not extra:
            return data
        return {
            **{k: v for k, v in data.items() if k in known},
            "params": {**extra, **(data.get("params") or {})},
        }

    @field_validator("conditioning_type", mode="before")
    @classmethod
    def _controlnet_only(cls, value: Any) -> Any:
        if value not in (None, "controlnet"):
            raise ValueError(
                f"conditioning_type {value!r} is not a ControlNet's conditioning; slider-cn "
                "generates ControlNet conditioning only ('controlnet')"
            )
        return value or "controlnet"


# Backend `type`s other tools read that slider-cn does not, and what to do instead.
UNSUPPORTED_TYPES = {
    "aws": "copy the images to a local folder (type 'local')",
    "csv": "download the images to a local folder (type 'local')",
    "webshart": "unpack the shards to a local folder (type 'local')",
    "memory": "a RAM-disk cache; drop the backend (slider-cn caches under cache_dir)",
}
# Dataloader keys that only tune SimpleTuner's own machinery: accepted, not used.
IGNORED_BACKEND_KEYS = frozenset(
    {
        "vae_cache_clear_each_epoch",
        "vae_cache_ondemand",
        "vae_cache_disable",
        "skip_file_discovery",
        "preserve_data_backend_cache",
        "metadata_backend",
        "metadata_update_interval",
        "write_batch_size",
        "text_encoder_batch_size",
        "text_cache_ondemand",
        "text_cache_disable",
        "hash_filenames",
        "image_embeds",
        "conditioning_image_embeds",
        "delete_unwanted_images",
        "delete_problematic_images",
        "delete_nsfw_images",
        "disable_multiline_split",
        "aspect_bucket_worker_count",
    }
)


class BackendConfig(BucketOptions):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique name of the backend.")
    type: Literal["local", "huggingface"] = Field(
        "local",
        description="`local` (a folder) or `huggingface` (a `datasets` dataset: `dataset_name`).",
    )
    instance_data_dir: str | None = Field(
        None, description="Folder of images (searched recursively); `local` backends."
    )
    dataset_type: Literal["image", "conditioning", "text_embeds", "image_embeds"] = Field(
        "image",
        description="Training images, conditioning images, or a `text_embeds` backend (where the text-embedding cache lives: `cache_dir`). `image_embeds` is accepted and not used (latents go to `cache_dir_vae`).",
    )
    default: bool = Field(
        False, description="`text_embeds` backends: the one used where no backend names one."
    )
    cache_dir: str | None = Field(
        None, description="`text_embeds` backends: the folder of their text-embedding cache."
    )
    text_embeds: str | None = Field(
        None, description="Image backends: id of the `text_embeds` backend their captions use."
    )
    cache_dir_vae: str | None = Field(
        None, description="Image backends: the folder of their latent cache."
    )
    dataset_name: str | None = Field(
        None,
        description="`huggingface` backends: a hub id, a folder saved by `datasets`, or data files.",
    )
    split: str = Field("train", description="`huggingface` backends: the split.")
    image_column: str = Field("image", description="`huggingface` backends: the image column.")
    caption_column: str | None = Field(
        "caption", description="`huggingface` backends: the caption column."
    )
    huggingface: dict[str, Any] | None = Field(
        None,
        description="`huggingface` backends: the same keys as a block (`image_column`, `caption_column`, `split`).",
    )
    prepend_instance_prompt: bool = Field(
        False, description="Put `instance_prompt` before every caption."
    )
    only_instance_prompt: bool = Field(
        False, description="Caption every image with `instance_prompt` alone."
    )
    conditioning_data: str | None = Field(
        None, description="Id of the conditioning backend paired with this one."
    )
    conditioning: list[ConditioningSpec] | None = Field(
        None,
        description="Generate conditioning inline instead of conditioning_data (a list, or SimpleTuner's single object).",
    )
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "huggingface"] = Field(
        "filename",
        description="Where captions come from (`huggingface`: the dataset's caption column).",
    )
    instance_prompt: str | None = Field(
        None, description="The caption for `instanceprompt` (and the fallback of others)."
    )
    resolution: float | None = Field(
        None,
        gt=0,
        description="Resolution of this backend (in `resolution_type` units); unset uses the training config's.",
    )
    probability: float = Field(
        1.0,
        gt=0.0,
        description="Weight of this backend when drawn inside its sign group (> 0; use `disabled` to skip one).",
    )
    repeats: int = Field(0, ge=0, description="Extra passes over the backend per epoch.")
    slider_strength: float | None = Field(
        None, description="> 0 positive group, < 0 negative, 0/unset neutral."
    )
    disabled: bool = Field(False, description="Skip this backend.")

    _real_number = field_validator("slider_strength", "probability", mode="before")(
        staticmethod(lambda value: real_number(value))
    )

    @field_validator("resolution")
    @classmethod
    def _pixels_multiple_of_8(cls, value: float | None) -> float | None:
        # below 8 it can only be megapixels (resolution_type 'area'), checked with the buckets
        if value is not None and value >= 8:
            if value != int(value):
                raise ValueError(f"must be a whole number of pixels (got {value})")
            return multiple_of_8(int(value))
        return value

    @field_validator("conditioning", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("type", mode="before")
    @classmethod
    def _supported_type(cls, value: Any) -> Any:
        if value in UNSUPPORTED_TYPES:
            raise ValueError(
                f"backend type {value!r} is not supported by slider-cn: "
                f"{UNSUPPORTED_TYPES[value]}, or use type 'huggingface' for a datasets dataset"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _huggingface_block(cls, data: Any) -> Any:
        # SimpleTuner also writes the column names in a "huggingface" block
        if isinstance(data, dict) and isinstance(data.get("huggingface"), dict):
            block = data["huggingface"]
            taken = ("split", "image_column", "caption_column", "dataset_name")
            data = {**{k: block[k] for k in taken if k in block}, **data}
        return data

    @model_validator(mode="after")
    def _caption_needs_prompt(self) -> BackendConfig:
        stores = self.dataset_type in ("image", "conditioning")
        if stores and self.type == "local" and not self.instance_data_dir:
            raise ValueError(f"a local {self.dataset_type} backend needs instance_data_dir")
        if stores and self.type == "huggingface" and not self.dataset_name:
            raise ValueError("a huggingface backend needs dataset_name")
        if self.dataset_type == "text_embeds" and not self.cache_dir:
            raise ValueError("a text_embeds backend needs cache_dir (its cache folder)")
        if (self.prepend_instance_prompt or self.only_instance_prompt) and not self.instance_prompt:
            raise ValueError("prepend_instance_prompt / only_instance_prompt need instance_prompt")
        if self.caption_strategy == "huggingface" and self.type != "huggingface":
            raise ValueError("caption_strategy 'huggingface' is for type 'huggingface' backends")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs instance_prompt")
        if self.conditioning_data is not None and self.conditioning:
            raise ValueError(
                "set either conditioning_data (a conditioning backend) or conditioning "
                "(generated inline), not both"
            )
        if self.dataset_type == "conditioning" and (self.conditioning_data or self.conditioning):
            raise ValueError(
                "a conditioning backend cannot itself have conditioning_data or conditioning"
            )
        return self

    @property
    def strength(self) -> float:
        """The slider strength as a number: unset means 0 (the neutral group)."""
        return float(self.slider_strength or 0.0)


BACKEND_KEYS = tuple(BackendConfig.model_fields)
# SimpleTuner dataloader keys that would change what is trained, and why slider-cn has none
UNSUPPORTED_BACKEND_KEYS = {
    "start_epoch": "slider-cn draws every backend from the first step (the sign cycle needs "
    "all groups)",
    "start_step": "slider-cn draws every backend from the first step (the sign cycle needs "
    "all groups)",
    "is_regularisation_data": "for a slider, preserve the base with a neutral backend "
    "(slider_strength 0, slider_neutral_mode 'preserve')",
    "is_regularization_data": "for a slider, preserve the base with a neutral backend "
    "(slider_strength 0, slider_neutral_mode 'preserve')",
    "caption_filter_list": "filter the captions before training",
    "caption_shuffle": "shuffle the captions before training",
    "parquet": "write the captions as .txt files beside the images (caption_strategy 'textfile')",
    "video": "slider-cn trains on images",
    "audio": "slider-cn trains on images",
}
# keys SimpleTuner spells two ways
BACKEND_ALIASES = {"disable": "disabled"}


def _resolve(value: str, base: Path) -> Path:
    folder = Path(value).expanduser()
    return folder if folder.is_absolute() else (base / folder).resolve()


def load_backend_configs(path: str | Path) -> list[BackendConfig]:
    """Read and validate the dataloader config; relative folders resolve against its folder."""
    path = Path(path)
    raw = read_json(path, what="dataloader config")
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: the dataloader config must be a JSON list of backend objects")
    backends: list[BackendConfig] = []
    # every backend's problems in one message: unknown keys and bad values of all of them
    errors: list[str] = []
    ignored: set[str] = set()
    for index, entry in enumerate(raw):
        where = f"{path}: backend #{index}" + (
            f" ('{entry['id']}')" if isinstance(entry, dict) and "id" in entry else ""
        )
        if not isinstance(entry, dict):
            errors.append(f"{where}: each backend must be a JSON object")
            continue
        entry = {BACKEND_ALIASES.get(k, k): v for k, v in entry.items()}
        ignored.update(k for k in entry if k in IGNORED_BACKEND_KEYS)
        for key, why in UNSUPPORTED_BACKEND_KEYS.items():
            if entry.get(key):
                errors.append(f"{where}: key '{key}' is not supported by slider-cn: {why}")
        unknown = [
            key
            for key in entry
            if key not in BACKEND_KEYS
            and key not in IGNORED_BACKEND_KEYS
            and key not in UNSUPPORTED_BACKEND_KEYS
        ]
        errors += [f"{where}: unknown key '{k}'{suggest(k, BACKEND_KEYS)}" for k in unknown]
        try:
            backend = BackendConfig.model_validate(
                {k: v for k, v in entry.items() if k in BACKEND_KEYS}
            )
        except ValidationError as exc:
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                errors.append(f"{where}: key '{key}': {msg}" if key else f"{where}: {msg}")
            continue
        if unknown:
            continue
        for key in ("instance_data_dir", "cache_dir", "cache_dir_vae"):
            value = getattr(backend, key)
            if value:
                setattr(backend, key, str(_resolve(value, path.parent)))
        name = backend.dataset_name
        if name and not Path(name).is_absolute() and (path.parent / name).exists():
            backend.dataset_name = str((path.parent / name).resolve())
        backends.append(backend)
    if errors:
        raise ConfigError("\n".join(errors))
    if ignored:
        log.info("dataloader keys not used by slider-cn: %s", ", ".join(sorted(ignored)))

    ids = [b.id for b in backends]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{path}: backend ids must be unique; repeated: {', '.join(duplicates)}")
    by_id = {b.id: b for b in backends}
    defaults = [b.id for b in backends if b.dataset_type == "text_embeds" and b.default]
    if len(defaults) > 1:
        raise ConfigError(
            f"{path}: several text_embeds backends are the default ({', '.join(defaults)}); "
            "keep default: true on one"
        )
    for backend in backends:
        if backend.disabled:
            continue
        ref = backend.text_embeds
        if ref is not None and ref in by_id and by_id[ref].disabled:
            raise ConfigError(
                f"{path}: backend '{backend.id}': text_embeds '{ref}' is disabled; enable it "
                "or drop the reference (the default text cache is then used)"
            )
        if ref is not None and (ref not in by_id or by_id[ref].dataset_type != "text_embeds"):
            known = [b.id for b in backends if b.dataset_type == "text_embeds"]
            raise ConfigError(
                f"{path}: backend '{backend.id}': text_embeds '{ref}' is not a text_embeds "
                f"backend{suggest(ref, known) if known else '; add one'}"
            )
        if backend.dataset_type not in ("image", "conditioning") or backend.type != "local":
            continue
        if not Path(backend.instance_data_dir).is_dir():
            raise ConfigError(
                f"{path}: backend '{backend.id}': instance_data_dir not found: {backend.instance_data_dir}"
            )
        ref = backend.conditioning_data
        if ref is not None:
            if ref not in by_id:
                raise ConfigError(
                    f"{path}: backend '{backend.id}': conditioning_data '{ref}' is not a backend id{suggest(ref, ids)}"
                )
            if by_id[ref].dataset_type != "conditioning":
                raise ConfigError(
                    f"{path}: backend '{backend.id}': conditioning_data '{ref}' must have dataset_type 'conditioning'"
                )
            if by_id[ref].disabled:
                raise ConfigError(
                    f"{path}: backend '{backend.id}': conditioning_data '{ref}' is disabled; "
                    f"enable it or disable '{backend.id}' too"
                )
    return backends
