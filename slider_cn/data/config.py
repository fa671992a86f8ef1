"""The dataloader config: a JSON list of backends, with SimpleTuner's key names.

`load_backend_configs(path)` reads and validates the file (keys, types, ids, folders,
references); `slider_cn.data.backends.build_backends` then scans the folders.
"""

from __future__ import annotations

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


class ConditioningSpec(BaseModel):
    """Conditioning generated inline for a backend: `{"type": "canny", "params": {...}}`."""

    model_config = ConfigDict(extra="forbid")
    type: str
    params: dict[str, Any] = Field(default_factory=dict)


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Unique name of the backend.")
    type: Literal["local"] = Field("local", description="Storage type; only local folders.")
    instance_data_dir: str = Field(description="Folder of images (searched recursively).")
    dataset_type: Literal["image", "conditioning"] = Field(
        "image", description="Training images or conditioning images."
    )
    conditioning_data: str | None = Field(
        None, description="Id of the conditioning backend paired with this one."
    )
    conditioning: list[ConditioningSpec] | None = Field(
        None, description="Generate conditioning inline instead of conditioning_data."
    )
    caption_strategy: Literal["filename", "textfile", "instanceprompt"] = Field(
        "filename", description="Where captions come from."
    )
    instance_prompt: str | None = Field(
        None, description="The caption for `instanceprompt` (and the fallback of others)."
    )
    resolution: int | None = Field(
        None, ge=8, description="Resolution of this backend; unset uses the training config's."
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
    _multiple_of_8 = field_validator("resolution")(staticmethod(lambda value: multiple_of_8(value)))

    @model_validator(mode="after")
    def _caption_needs_prompt(self) -> BackendConfig:
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


def load_backend_configs(path: str | Path) -> list[BackendConfig]:
    """Read and validate the dataloader config; relative folders resolve against its folder."""
    path = Path(path)
    raw = read_json(path, what="dataloader config")
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: the dataloader config must be a JSON list of backend objects")
    backends: list[BackendConfig] = []
    # every backend's problems in one message: unknown keys and bad values of all of them
    errors: list[str] = []
    for index, entry in enumerate(raw):
        where = f"{path}: backend #{index}" + (
            f" ('{entry['id']}')" if isinstance(entry, dict) and "id" in entry else ""
        )
        if not isinstance(entry, dict):
            errors.append(f"{where}: each backend must be a JSON object")
            continue
        unknown = [key for key in entry if key not in BACKEND_KEYS]
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
        folder = Path(backend.instance_data_dir).expanduser()
        if not folder.is_absolute():
            folder = (path.parent / folder).resolve()
        backend.instance_data_dir = str(folder)
        backends.append(backend)
    if errors:
        raise ConfigError("\n".join(errors))

    ids = [b.id for b in backends]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{path}: backend ids must be unique; repeated: {', '.join(duplicates)}")
    by_id = {b.id: b for b in backends}
    for backend in backends:
        if backend.disabled:
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
