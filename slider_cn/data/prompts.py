"""Text sliders: prompt entries as a slider source (docs/design.md §5.4).

`slider_prompts` in the training config is a JSON file or an inline list of entries::

    {"id": "red-blue", "target": "a circle", "positive": "a red circle",
     "negative": "a blue circle", "neutral": ["a square"], "guidance_scale": 1.0,
     "action": "enhance", "slider_strength": 1.0, "conditioning_data": "outlines"}

Each entry becomes sampler backends like any image backend, so the sign-cycled sampler
(+ → − → 0, probabilities, exhaustion, ranks, resume) runs prompts and images alike:

- `<id>:+` at +slider_strength and `<id>:-` at -slider_strength (one entry trains both ends of
  the slider; they hold the same samples, so the groups stay balanced);
- `<id>:neutral` (neutral group) when the entry names `neutral` prompts: anchors that the slider
  must leave alone (the `preserve` rule).

A prompt backend's samples are the conditioning images of the entry's `conditioning_data` (a
conditioning backend of the dataloader config, needed when a ControlNet is in the loop), one
per sample; without conditioning an entry holds one global batch per pass. `repeats` adds
passes, as for image backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slider_cn.data.config import multiple_of_8, real_number
from slider_cn.errors import ConfigError, read_json, suggest

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig


class PromptEntry(BaseModel):
    """One text slider: what to turn up (positive) and down (negative) on a target prompt."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Name of the entry; unset uses `prompts<N>`.")
    target: str = Field(description="The prompt the slider acts on (`a person`).")
    positive: str = Field(description="The concept at +strength (`a person, smiling`).")
    negative: str = Field(description="The concept at -strength (`a person, frowning`).")
    neutral: list[str] = Field(
        default_factory=list,
        description="Anchor prompts the slider must leave unchanged (the `preserve` rule).",
    )
    guidance_scale: float = Field(
        1.0, ge=0.0, description="eta: how far the target moves along positive - negative."
    )
    action: Literal["enhance", "erase"] = Field(
        "enhance",
        description="`enhance`: +strength adds the positive concept; `erase`: +strength removes it.",
    )
    slider_strength: float = Field(
        1.0, gt=0.0, description="s: the entry trains at +s and -s (a magnitude, > 0)."
    )
    denoising_steps: int = Field(
        20,
        ge=2,
        description="Sampler steps of the schedule x_t is drawn from (a random number of them is run).",
    )
    resolution: int | None = Field(
        None, ge=8, description="Resolution of the generated x_t; unset uses the config's."
    )
    conditioning_data: str | None = Field(
        None, description="Id of a conditioning backend whose images feed the ControlNet."
    )
    probability: float = Field(1.0, gt=0.0, description="Weight inside its sign group.")
    repeats: int = Field(0, ge=0, description="Extra passes per epoch.")
    disabled: bool = Field(False, description="Skip this entry.")

    @field_validator("neutral", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    _real_number = field_validator(
        "guidance_scale", "slider_strength", "probability", mode="before"
    )(staticmethod(lambda value: real_number(value)))
    _multiple_of_8 = field_validator("resolution")(staticmethod(lambda value: multiple_of_8(value)))


ENTRY_KEYS = tuple(PromptEntry.model_fields)


@dataclass(frozen=True)
class PromptTask:
    """What a prompt micro-batch trains: a pair direction or the entry's neutral anchors.

    For ``kind == "pair"`` the adapted prediction on ``target`` at multiplier s is trained
    toward eps(target) + sign(s) * action * guidance_scale * (eps(positive) - eps(negative));
    for ``kind == "neutral"`` the anchors (the plan's captions) keep the frozen prediction.
    """

    entry: str
    kind: Literal["pair", "neutral"]
    target: str
    positive: str
    negative: str
    guidance_scale: float
    action: str
    denoising_steps: int

    @property
    def action_sign(self) -> float:
        return 1.0 if self.action == "enhance" else -1.0

    def to_json(self) -> dict[str, Any]:
        if self.kind == "neutral":
            return {"entry": self.entry, "kind": "neutral"}
        return {
            "entry": self.entry,
            "kind": "pair",
            "target": self.target,
            "positive": self.positive,
            "negative": self.negative,
            "guidance_scale": self.guidance_scale,
            "action": self.action,
        }


def load_prompt_entries(config: TrainConfig) -> list[PromptEntry]:
    """The config's `slider_prompts` (a file or an inline list), validated; [] when unset."""
    source = config.slider_prompts
    if source is None:
        return []
    if isinstance(source, str):
        where = source
        raw = read_json(Path(source), what="slider_prompts")
    else:
        where, raw = "slider_prompts", source
    if isinstance(raw, dict) and "prompts" in raw:
        raw = raw["prompts"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{where}: slider_prompts must be a non-empty JSON list of entries "
            '({"target", "positive", "negative", ...})'
        )
    entries: list[PromptEntry] = []
    for index, item in enumerate(raw):
        label = f"{where}: entry #{index}" + (
            f" ('{item['id']}')" if isinstance(item, dict) and "id" in item else ""
        )
        if not isinstance(item, dict):
            raise ConfigError(f"{label}: each entry must be a JSON object")
        for key in item:
            if key not in ENTRY_KEYS:
                hint = suggest(key, ENTRY_KEYS)
                if key == "unconditional":
                    hint = " (Concept Sliders' `unconditional` is `negative` here)"
                raise ConfigError(f"{label}: unknown key '{key}'{hint}")
        try:
            entry = PromptEntry.model_validate(item)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if key == "slider_strength" and err["type"] == "greater_than":
                    msg += (
                        "; it is a magnitude: the entry trains at +s and -s (swap positive and "
                        "negative to turn the slider around)"
                    )
                lines.append(f"{label}: key '{key}': {msg}")
            raise ConfigError("\n".join(lines)) from None
        if entry.id is None:
            entry.id = f"prompts{index}"
        for key in ("target", "positive", "negative"):
            if not getattr(entry, key).strip():
                raise ConfigError(f"{label}: key '{key}' is empty; give the prompt text")
        if entry.positive == entry.negative:
            raise ConfigError(
                f"{label}: positive and negative are the same prompt, so there is no direction "
                "to learn; give the two ends of the slider"
            )
        entries.append(entry)
    ids = [e.id for e in entries]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ConfigError(f"{where}: entry ids must be unique; repeated: {', '.join(repeated)}")
    return [e for e in entries if not e.disabled]


def entry_tasks(entry: PromptEntry) -> tuple[PromptTask, PromptTask]:
    """The pair task and the neutral task of one entry."""
    common = dict(
        entry=entry.id,
        target=entry.target,
        positive=entry.positive,
        negative=entry.negative,
        guidance_scale=entry.guidance_scale,
        action=entry.action,
        denoising_steps=entry.denoising_steps,
    )
    return PromptTask(kind="pair", **common), PromptTask(kind="neutral", **common)
