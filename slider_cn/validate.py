"""Validation images: the prompt library, one image per prompt and a strength-sweep grid per prompt.

- The prompt library (``user_prompt_library``) is a JSON object: name -> a plain prompt string,
  or ``{"prompt": ..., "adapter_strength": x}``. Without one, ``validation_prompt`` is the one
  prompt. A prompt without its own strength uses ``validation_adapter_strength``.
- Each prompt gives ``<name>.png`` at its strength and ``<name>_sweep.png``: the same prompt
  and seed at each sweep strength, left to right, each tile labelled with its strength.
- The slider's strength is set with ``SliderAdapter.multiplier(s)``, which scales the slider
  alone (on the ControlNet too when it lives there) and puts the training scale back bit for
  bit afterwards (docs/design.md §8.6). An assistant adapter runs at
  ``assistant_lora_inference_strength`` during validation and returns to its training strength.
- ``validate_output(config, adapter_dir)`` rebuilds a finished run (``slider-cn validate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel as unwrap_model  # DDP, compile
from PIL import Image, ImageDraw, ImageFont

from slider_cn import formats
from slider_cn.config import TrainConfig
from slider_cn.errors import ConfigError, read_json, suggest
from slider_cn.formats import ALPHA_FOLDED

log = logging.getLogger(__name__)

DEFAULT_STRENGTHS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
_PROMPT_KEYS = ("prompt", "adapter_strength")


@dataclasses.dataclass(frozen=True)
class ValidationPrompt:
    name: str
    prompt: str
    strength: float


@dataclasses.dataclass
class ValidationResult:
    """Where one validation pass wrote its files: prompt name -> image, prompt name -> grid."""

    folder: Path
    images: dict[str, Path]
    grids: dict[str, Path]
    strengths: list[float]
    seed: int


# --- the prompt library ------------------------------------------------------------------
def prompt_library(config: TrainConfig) -> list[ValidationPrompt]:
    """The validation prompts of a config; a malformed library is a ConfigError."""
    default = float(config.validation_adapter_strength)
    if config.user_prompt_library:
        path = Path(config.user_prompt_library)
        raw = read_json(path, "user_prompt_library")
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(
                f'{path}: user_prompt_library must be a non-empty JSON object: {{"name": "a prompt", '
                '"other": {"prompt": "...", "adapter_strength": 0.5}}'
            )
        prompts = []
        for name, entry in raw.items():
            prompts.append(_library_entry(path, str(name), entry, default))
        return prompts
    if config.validation_prompt:
        return [ValidationPrompt("validation", config.validation_prompt, default)]
    if config.slider_prompts is not None:
        # a text slider acts on its target prompts: those are what to look at
        from slider_cn.data.prompts import load_prompt_entries

        entries = load_prompt_entries(config)
        if entries:
            return [ValidationPrompt(entry.id, entry.target, default) for entry in entries]
    raise ConfigError(
        "validation needs a prompt: set user_prompt_library (a JSON file of named prompts) or "
        "validation_prompt in the config (or pass --validation_prompt TEXT)"
    )


def _library_entry(path: Path, name: str, entry: Any, default: float) -> ValidationPrompt:
    where = f"{path}: prompt {name!r}"
    if isinstance(entry, str):
        prompt, strength = entry, default
    elif isinstance(entry, dict):
        for key in entry:
            if key not in _PROMPT_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, _PROMPT_KEYS)}")
        prompt = entry.get("prompt")
        strength = entry.get("adapter_strength", default)
        if isinstance(strength, bool) or not isinstance(strength, int | float):
            raise ConfigError(f"{where}: adapter_strength must be a number (got {strength!r})")
    else:
        raise ConfigError(
            f'{where}: expected a prompt string or {{"prompt": ..., "adapter_strength": x}}, '
            f"got {type(entry).__name__}"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f'{where}: needs a non-empty "prompt" string')
    return ValidationPrompt(name, prompt, float(strength))


def parse_strengths(text: str) -> list[float]:
    """Parse "-1,-0.5,0,0.5,1" into floats; anything else is a ConfigError."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(
            f"--strengths {text!r}: expected comma-separated numbers, e.g. -1,-0.5,0,0.5,1"
        )
    return values


def check_validation_config(config: TrainConfig) -> list[ValidationPrompt] | None:
    """Before training: the prompts (and conditioning image) that validation_steps will need."""
    if not config.validation_steps:
        return None
    prompts = prompt_library(config)
    from slider_cn.families import get_family

    if get_family(config).needs_controlnet():
        if not config.validation_conditioning_image:
            raise ConfigError(_NO_CONDITIONING)
        # decoded now: an unreadable image found at the first validation would stop the main
        # process alone, with the other ranks training on
        _read_conditioning_image(Path(config.validation_conditioning_image))
    return prompts


_NO_CONDITIONING = (
    "validation with a ControlNet needs validation_conditioning_image (a conditioning image, e.g. "
    "one of the run's canny maps); set it in the config or pass --validation_conditioning_image"
)


def conditioning_image(config: TrainConfig, components: Any) -> Image.Image | None:
    """The validation conditioning image, when the run has a ControlNet."""
    if components.controlnet is None:
        return None
    if not config.validation_conditioning_image:
        raise ConfigError(_NO_CONDITIONING)
    return _read_conditioning_image(Path(config.validation_conditioning_image))


def _read_conditioning_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise ConfigError(
            f"validation_conditioning_image {path}: not a readable image: {exc}"
        ) from None


# --- images ------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "prompt"


def strength_label(strength: float) -> str:
    return f"{strength:+g}" if strength else "0"


def sweep_grid(tiles: Sequence[tuple[float, Image.Image]]) -> Image.Image:
    """The tiles side by side, left to right, each with its strength written above it.

    Tiles under 64 pixels (the 32-pixel `shapes` model) are enlarged, pixel for pixel, so the
    grid can be looked at.
    """
    width, height = tiles[0][1].size
    if width < 64:
        factor = -(-96 // width)
        width, height = width * factor, height * factor
    band = max(12, height // 6)
    try:
        font = ImageFont.load_default(size=max(9, band - 3))
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    grid = Image.new("RGB", (width * len(tiles), height + band), "white")
    draw = ImageDraw.Draw(grid)
    for i, (strength, tile) in enumerate(tiles):
        grid.paste(
            tile.convert("RGB").resize((width, height), Image.Resampling.NEAREST), (i * width, band)
        )
        label = f"s={strength_label(strength)}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        x = i * width + (width - (right - left)) // 2
        draw.text((x, (band - (bottom - top)) // 2 - top), label, fill="black", font=font)
    return grid


@contextlib.contextmanager
def _inference_precision(components: Any) -> Iterator[None]:
    # Under mixed precision the frozen weights are half and the trained ones fp32: autocast
    # lets them meet, as in the training step.
    # the denoiser's storage dtype (its frozen weights are most of its parameters)
    dtypes: Counter = Counter()
    for p in components.denoiser.parameters():
        if p.is_floating_point():
            dtypes[p.dtype] += p.numel()
    dtype, device = dtypes.most_common(1)[0][0], components.vae.device
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class SweepRenderer:
    """Renders prompts at slider strengths through the family's validation pipeline.

    Use as a context manager: inside it the trained model is in eval mode, an assistant adapter
    runs at ``assistant_lora_inference_strength`` and mixed-precision weights meet under
    autocast; on exit all of them are as they were. ``render(prompt, strength, seeds)`` gives
    one image per seed, each from a CPU generator seeded with it (the same noise on every
    device), with the slider at ``strength`` and its training scale restored afterwards
    (docs/design.md §8.6).
    """

    def __init__(
        self,
        family: Any,
        components: Any,
        adapter: Any,
        config: TrainConfig,
        *,
        assistant: Any = None,
    ):
        self.family, self.adapter, self.config, self.assistant = family, adapter, config, assistant
        self.image = conditioning_image(config, components)
        self.view = dataclasses.replace(
            components,
            denoiser=unwrap_model(components.denoiser),
            controlnet=None
            if components.controlnet is None
            else unwrap_model(components.controlnet),
        )
        self.pipe = family.validation_pipeline(self.view)
        self.pipe.set_progress_bar_config(disable=True)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SweepRenderer:
        self._stack.enter_context(_eval_mode(unwrap_model(self.adapter.model)))
        if self.assistant is not None:
            self._stack.enter_context(
                self.assistant.strength_as(self.config.assistant_lora_inference_strength)
            )
        self._stack.enter_context(_inference_precision(self.view))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()

    def render(self, prompt: str, strength: float, seeds: Sequence[int]) -> list[Image.Image]:
        kwargs = self.family.validation_call_kwargs(prompt, self.image, self.config)
        kwargs["prompt"] = [prompt] * len(seeds)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        with self.adapter.multiplier(strength):
            return self.pipe(**kwargs, generator=generators).images


def run_validation(
    family: Any,
    components: Any,
    adapter: Any,
    config: TrainConfig,
    output_folder: str | Path,
    *,
    prompts: list[ValidationPrompt] | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    seed: int | None = None,
    assistant: Any = None,
) -> ValidationResult:
    """Generate every prompt of the library, write its image and its strength-sweep grid.

    ``adapter`` is the run's SliderAdapter; its multiplier (and an assistant's strength) is
    the same after this call as before it.
    """
    prompts = prompts if prompts is not None else prompt_library(config)
    strengths = [float(s) for s in strengths]
    if seed is None:
        seed = config.validation_seed if config.validation_seed is not None else config.seed
    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)

    images: dict[str, Path] = {}
    grids: dict[str, Path] = {}
    used: set[str] = set()
    with SweepRenderer(family, components, adapter, config, assistant=assistant) as renderer:
        for entry in prompts:
            made = {
                s: renderer.render(entry.prompt, s, [seed])[0]
                for s in dict.fromkeys([*strengths, entry.strength])
            }
            stem = _slug(entry.name)
            while stem in used:
                stem += "_"
            used.add(stem)
            images[entry.name] = folder / f"{stem}.png"
            made[entry.strength].save(images[entry.name])
            grids[entry.name] = folder / f"{stem}_sweep.png"
            sweep_grid([(s, made[s]) for s in strengths]).save(grids[entry.name])

    (folder / "validation.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "strengths": strengths,
                "prompts": [
                    {
                        "name": p.name,
                        "prompt": p.prompt,
                        "adapter_strength": p.strength,
                        "image": images[p.name].name,
                        "sweep": grids[p.name].name,
                    }
                    for p in prompts
                ],
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return ValidationResult(folder, images, grids, strengths, seed)


# --- a finished run ----------------------------------------------------------------------
@dataclasses.dataclass
class RebuiltRun:
    """A finished run rebuilt in memory: its components with the slider attached and loaded."""

    config: TrainConfig
    family: Any
    components: Any
    adapter: Any
    assistant: Any = None


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def rebuild_run(
    config: TrainConfig,
    adapter_dir: str | Path,
    device: str | None = None,
    *,
    check_conditioning: bool = False,
) -> RebuiltRun:
    """Rebuild a run's components and put its trained slider on them.

    ``check_conditioning``: fail early when the run has a ControlNet and the config no
    ``validation_conditioning_image``.

    The base is the run's ``base/`` folder (``tiny`` runs) or the config's model; the
    ControlNet the run's ``controlnet/`` folder (a fresh one) or the config's; the slider is
    attached with slider_cn.adapters on the targets recorded in the output's metadata and its
    weights are loaded from the output file.
    """
    from slider_cn.adapters import attach_slider_adapter, load_assistant_adapter
    from slider_cn.families import get_family
    from slider_cn.loading import slider_files

    files = slider_files(adapter_dir)
    meta = files.metadata
    where = files.slider_file
    family_name = meta.get("slider_cn.family", config.model_family)
    if family_name != config.model_family:
        raise ConfigError(
            f"{where} was trained for model_family {family_name!r}, the config says "
            f"{config.model_family!r}; pass the run's config (or --model_family {family_name})"
        )
    mode = meta.get("slider_cn.training_mode", config.training_mode)
    lora_type = meta.get("slider_cn.lora_type", "lycoris" if files.is_lycoris else "standard")
    update: dict[str, Any] = {"training_mode": mode, "lora_type": lora_type}
    if files.base is not None:
        update["pretrained_model_name_or_path"] = str(files.base)
    if files.controlnet is not None:
        update["controlnet_model_name_or_path"] = str(files.controlnet)
    elif mode == "controlnet" and not config.controlnet_model_name_or_path:
        recorded = meta.get("slider_cn.controlnet_model")
        if not recorded:
            raise ConfigError(
                f"{files.folder}: a ControlNet-side slider without its controlnet/ folder; set "
                "controlnet_model_name_or_path to the ControlNet it was trained on"
            )
        update["controlnet_model_name_or_path"] = recorded
    rank, alpha = meta.get("slider_cn.rank"), _float_or_none(meta.get("slider_cn.alpha"))
    if lora_type == "standard" and rank not in (None, "", "None"):
        update["lora_rank"] = int(rank)
        # a file with alpha/r folded into its weights is loaded at alpha = r
        update["lora_alpha"] = float(rank) if meta.get(ALPHA_FOLDED) == "true" else alpha
    if lora_type == "lycoris" and not config.lycoris_config:
        raise ConfigError(
            f"{where} is a LyCORIS slider: set lycoris_config to the run's lycoris_config.json"
        )
    run_config = config.model_copy(update=update)
    family = get_family(run_config)
    if (
        check_conditioning
        and family.needs_controlnet()
        and not config.validation_conditioning_image
    ):
        raise ConfigError(_NO_CONDITIONING)  # before any model is loaded

    components = family.load_components()
    assistant = None
    if run_config.assistant_lora_path:  # loaded before the slider, as in training
        assistant = load_assistant_adapter(
            components.denoiser,
            run_config.assistant_lora_path,
            run_config.assistant_lora_strength,
            family=family,
        )
    trainable = components.controlnet if mode == "controlnet" else components.denoiser
    targets = json.loads(meta.get("slider_cn.targets", "null"))
    adapter = attach_slider_adapter(trainable, targets, run_config)
    adapter.load_state_dict(_slider_weights(where, meta, adapter, family))
    for p in adapter.trainable_parameters():
        p.requires_grad_(False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for module in components.modules().values():
        module.to(device)
    adapter.to(device)
    return RebuiltRun(run_config, family, components, adapter, assistant)


def _slider_weights(
    file: Path, metadata: dict[str, str], adapter: Any, family: Any
) -> dict[str, torch.Tensor]:
    """The slider file's weights under SliderAdapter.state_dict() keys."""
    from safetensors.torch import load_file

    state = load_file(str(file))
    if adapter.kind == "lycoris":
        prefix = metadata.get(formats.LYCORIS_PREFIX)
        if prefix is not None:  # module paths under the file's prefix -> the network's names
            names = adapter.file_names(prefix)
            state = formats.rename_lycoris_modules(state, {v: k for k, v in names.items()})
        # a LyCORIS layer wrapped by an assistant's PEFT layer is named "..._base_layer"
        out = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            out[f"{head.removesuffix('_base_layer')}.{rest}" if rest else head] = value
        return out
    return {key.removeprefix(f"{family.lora_component}."): value for key, value in state.items()}


def validate_output(
    config: TrainConfig,
    adapter_dir: str | Path,
    *,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    seed: int | None = None,
    output: str | Path | None = None,
) -> ValidationResult:
    """``slider-cn validate``: rebuild a finished run and validate it."""
    prompts = prompt_library(config)
    run = rebuild_run(config, adapter_dir, check_conditioning=True)
    folder = Path(output) if output else Path(adapter_dir) / "validation" / "final"
    return run_validation(
        run.family,
        run.components,
        run.adapter,
        run.config,
        folder,
        prompts=prompts,
        strengths=strengths,
        seed=seed,
        assistant=run.assistant,
    )
