"""Dataset backends: the images of each backend, their captions and their conditioning pairs.

`build_backends(config)` is the one place that turns the dataloader config into loaded
backends, in this order:

1. read the dataloader config (`load_backend_configs`);
2. scan every enabled backend's folder recursively for png / jpg / jpeg / webp (hidden files
   and the folders of other backends nested inside it are skipped);
3. caption every training image by its backend's `caption_strategy`;
4. inline conditioning (`"conditioning": [...]` on a backend) is turned into a generated
   conditioning backend by `training_backends` before this step; `build_backends` alone leaves
   such samples with `conditioning = None` (enough for `--plan`);
5. pair backends that name `conditioning_data` with that backend's images by relative path
   (the extension may differ); unpaired images are an error listing them;
6. add the text-slider entries of `slider_prompts` as prompt backends (`<id>:+`, `<id>:-` and
   `<id>:neutral`, slider_cn.data.prompts), paired with their conditioning backend's images;
7. check that the positive and negative groups hold as many samples (counting repeats).

Everything here is cheap (file names and caption files only): no image is decoded and no
model is loaded, so `slider-cn train --dry-run --plan N` can use it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from slider_cn.data.buckets import BucketSpec, Placement, place
from slider_cn.data.config import BackendConfig, load_backend_configs
from slider_cn.data.prompts import PromptEntry, PromptTask, entry_tasks, load_prompt_entries
from slider_cn.errors import ConfigError
from slider_cn.image_files import IMAGE_EXTENSIONS, scan_images

if TYPE_CHECKING:
    from slider_cn.config import TrainConfig

log = logging.getLogger(__name__)

# How many unpaired files an error message lists before it only counts the rest.
MAX_LISTED = 20


@dataclass(frozen=True)
class Sample:
    """One training image: its file, its key (relative path without extension), caption and
    the conditioning image paired with it (None when the backend has no conditioning).

    A prompt backend's samples have no image (``path`` None): the caption is the prompt and
    ``conditioning`` the conditioning image the ControlNet gets with it."""

    path: Path | None
    key: str
    caption: str
    conditioning: Path | None = None
    # bucket, resize and crop; None under the default square crop (placed when loaded)
    placement: Placement | None = None


@dataclass
class Backend:
    """A training backend ready for the sampler: its samples in a stable (sorted) order."""

    id: str
    samples: list[Sample]
    slider_strength: float = 0.0
    probability: float = 1.0
    repeats: int = 0
    resolution: int = 512
    root: Path | None = None
    config: BackendConfig | None = field(default=None, repr=False)
    # Set for the backends of a `slider_prompts` entry: what its micro-batches train.
    prompt: PromptTask | None = None
    # how its images are bucketed, resized and cropped (None: a square of `resolution`)
    spec: BucketSpec | None = None
    # where its latents and its captions' text embeddings are cached (None: under cache_dir)
    latent_cache: Path | None = None
    text_cache: Path | None = None

    @property
    def bucket_spec(self) -> BucketSpec:
        return self.spec or BucketSpec(resolution=self.resolution)

    @property
    def sign(self) -> str:
        """'+' (positive group), '-' (negative group) or '0' (neutral group)."""
        if self.slider_strength > 0:
            return "+"
        if self.slider_strength < 0:
            return "-"
        return "0"

    @property
    def samples_per_epoch(self) -> int:
        """Samples one epoch draws from this backend: every image once, plus `repeats` passes."""
        return len(self.samples) * (self.repeats + 1)

    @property
    def has_conditioning(self) -> bool:
        return bool(self.samples) and all(s.conditioning is not None for s in self.samples)


# --- scanning and captions -------------------------------------------------------------
def sample_key(path: Path, root: Path) -> str:
    """The pairing key: the path relative to the backend folder, without its extension."""
    return path.relative_to(root).with_suffix("").as_posix()


def caption_for(image: Path, config: BackendConfig) -> str:
    """The caption of one image under its backend's `caption_strategy`."""
    if config.only_instance_prompt:
        return config.instance_prompt or ""
    caption = _own_caption(image, config)
    if (
        config.prepend_instance_prompt
        and config.instance_prompt
        and config.caption_strategy != "instanceprompt"
    ):
        return f"{config.instance_prompt} {caption}".strip()
    return caption


def _own_caption(image: Path, config: BackendConfig) -> str:
    strategy = config.caption_strategy
    if strategy == "instanceprompt":
        return config.instance_prompt or ""
    if strategy == "filename":
        return " ".join(image.stem.replace("_", " ").replace("-", " ").split())
    text_file = image.with_suffix(".txt")
    if text_file.is_file():
        try:
            return text_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"backend '{config.id}': cannot read caption file {text_file}: {exc}"
            ) from None
    if config.instance_prompt:
        return config.instance_prompt
    raise ConfigError(
        f"backend '{config.id}': caption_strategy 'textfile' but {image} has no caption file "
        f"{text_file.name} beside it; add it, or set instance_prompt as the fallback caption"
    )


# --- conditioning pairing --------------------------------------------------------------
def conditioning_index(
    folder: Path, backend_id: str, exclude: Iterable[Path] = ()
) -> dict[str, Path]:
    """Conditioning images of a folder by key; two files with one key (a.png, a.jpg) are an error."""
    index: dict[str, Path] = {}
    clashes: list[str] = []
    for path in scan_images(folder, exclude):
        key = sample_key(path, folder)
        if key in index:
            clashes.append(f"{index[key].name} / {path.name} ({key})")
        index[key] = path
    if clashes:
        raise ConfigError(
            f"conditioning backend '{backend_id}': several images share a relative path, so "
            f"pairing is ambiguous: {', '.join(clashes[:MAX_LISTED])}; keep one of each"
        )
    return index


def attach_conditioning(backend: Backend, index: dict[str, Path], source: str) -> Backend:
    """Pair every sample of ``backend`` with the image of the same key in ``index``.

    ``source`` names the conditioning (a backend id or a generated folder) in the error that
    lists unpaired images: the first 20 and a count of the rest.
    """
    paired: list[Sample] = []
    missing: list[str] = []
    for sample in backend.samples:
        match = index.get(sample.key)
        if match is None:
            missing.append(
                sample.path.relative_to(backend.root).as_posix()
                if backend.root
                else str(sample.path)
            )
        paired.append(replace(sample, conditioning=match))
    if missing:
        listed = ", ".join(missing[:MAX_LISTED])
        more = f" (and {len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
        raise ConfigError(
            f"backend '{backend.id}': {len(missing)} of {len(backend.samples)} training images "
            f"have no conditioning image in {source} (paired by relative path, any image "
            f"extension): {listed}{more}"
        )
    backend.samples = paired
    return backend


# --- building --------------------------------------------------------------------------
def build_backends(
    config: TrainConfig,
    backend_configs: Sequence[BackendConfig] | None = None,
    *,
    world_size: int = 1,
) -> list[Backend]:
    """Turn the dataloader config and `slider_prompts` into training backends (see the module
    docstring). ``world_size`` sizes prompt entries without conditioning (one global batch).

    Raises ConfigError for a missing dataloader config, an empty backend, textfile captions
    without a file or fallback, unpaired images, or unbalanced positive / negative groups.
    """
    if backend_configs is None:
        backend_configs = _backend_configs(config)
    source = config.data_backend_config or "dataloader config"
    caches = _cache_folders(backend_configs)
    enabled = [
        b for b in backend_configs if not b.disabled and b.dataset_type in ("image", "conditioning")
    ]
    folders = {b.id: Path(b.instance_data_dir).resolve() for b in enabled}

    def nested_folders(backend_id: str) -> list[Path]:
        own = folders[backend_id]
        return [
            f for i, f in folders.items() if i != backend_id and f != own and f.is_relative_to(own)
        ]

    by_id = {b.id: b for b in enabled}
    entries = load_prompt_entries(config)
    backends: list[Backend] = []
    for bc in enabled:
        images = scan_images(folders[bc.id], nested_folders(bc.id))
        if not images:
            raise ConfigError(
                f"{source}: backend '{bc.id}': no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) "
                f"found in {folders[bc.id]}; add images or set disabled: true"
            )
        if bc.dataset_type != "image":
            continue
        root = folders[bc.id]
        spec = bucket_spec(bc, config)
        samples = [Sample(p, sample_key(p, root), caption_for(p, bc)) for p in images]
        if spec is not None and spec.reads_sizes:
            samples = place_samples(samples, spec, f"{source}: backend '{bc.id}'")
        backends.append(
            Backend(
                id=bc.id,
                samples=samples,
                slider_strength=bc.strength,
                probability=bc.probability,
                repeats=bc.repeats,
                resolution=int(
                    spec.square_side()
                    if spec is not None and spec.is_square
                    else bc.resolution
                    if spec is None and bc.resolution
                    else config.resolution
                ),
                root=root,
                config=bc,
                spec=spec,
                latent_cache=Path(bc.cache_dir_vae) if bc.cache_dir_vae else None,
                text_cache=caches.get(bc.text_embeds or "", caches.get("")),
            )
        )
    if not backends and not entries:
        if config.slider_prompts is not None and config.data_backend_config is None:
            raise ConfigError("slider_prompts: every entry is disabled; enable one")
        raise ConfigError(
            f"{source}: no enabled training backend (dataset_type 'image'); add one, or give "
            "text sliders in slider_prompts"
        )

    errors: list[str] = []
    for backend in backends:
        bc = backend.config
        assert bc is not None
        try:
            if bc.conditioning_data is not None:
                ref = by_id[bc.conditioning_data]
                index = conditioning_index(folders[ref.id], ref.id, nested_folders(ref.id))
                attach_conditioning(backend, index, f"'{ref.id}' ({folders[ref.id]})")
        except ConfigError as exc:
            errors.append(f"{source}: {exc}")
    if errors:
        raise ConfigError("\n".join(errors))

    taken = {b.id for b in backends}
    for entry in entries:
        conditioning = None
        if entry.conditioning_data is not None:
            if config.data_backend_config is None:
                raise ConfigError(
                    f"slider_prompts entry '{entry.id}': conditioning_data "
                    f"'{entry.conditioning_data}' names a backend of data_backend_config, but "
                    "none is set; set data_backend_config to a dataloader file with that "
                    "conditioning backend (dataset_type 'conditioning')"
                )
            ref = by_id.get(entry.conditioning_data)
            if ref is None or ref.dataset_type != "conditioning":
                known = [b.id for b in enabled if b.dataset_type == "conditioning"]
                raise ConfigError(
                    f"slider_prompts entry '{entry.id}': conditioning_data "
                    f"'{entry.conditioning_data}' is not an enabled conditioning backend of "
                    f"{source}{_suggest_id(entry.conditioning_data, known)}"
                )
            conditioning = sorted(
                conditioning_index(folders[ref.id], ref.id, nested_folders(ref.id)).items()
            )
        for backend in prompt_backends(entry, conditioning, config, world_size=world_size):
            backend.text_cache = caches.get("")
            if backend.id in taken:
                raise ConfigError(
                    f"slider_prompts entry '{entry.id}' makes backend '{backend.id}', which is "
                    f"also a backend of {source}; rename the entry (key 'id')"
                )
            taken.add(backend.id)
            backends.append(backend)

    check_balance(backends, allow_unbalanced=config.slider_allow_unbalanced, source=source)
    return backends


SIZE_KEYS = ("minimum_image_size", "maximum_image_size", "target_downsample_size")


def bucket_spec(backend: BackendConfig, config: TrainConfig) -> BucketSpec | None:
    """A backend's bucket settings: its own keys, else the training config's (docs/design.md
    §4.1). No key anywhere: None, the square centre crop at its resolution."""
    from slider_cn.families import family_card

    own = backend.bucket_values()
    inherited = {k: v for k, v in config.bucket_values().items() if k not in own}
    values = {**inherited, **own}
    seed = config.seed
    multiple = family_card(config.model_family).bucket_multiple
    if not values:
        if backend.resolution is not None and backend.resolution < 8:
            raise ConfigError(
                f"backend '{backend.id}': resolution {backend.resolution:g} is a megapixel "
                "count; set resolution_type: area, or give the resolution in pixels"
            )
        return None
    values.setdefault("resolution_type", "pixel_area")
    values.setdefault("crop", False)
    where = f"backend '{backend.id}'"
    # Sizes keep the unit of the config they come from: the training config's are pixels
    # (its `area` became `pixel_area`, config.py); this backend's are in its own type.
    kind = values["resolution_type"]
    own_sizes = {k: own[k] for k in SIZE_KEYS if k in own}
    if backend.resolution is not None:
        own_sizes["resolution"] = backend.resolution
    config_sizes = {k: inherited[k] for k in SIZE_KEYS if k in inherited}
    if backend.resolution is None:
        config_sizes["resolution"] = config.resolution
    if kind == "area":  # the training config's pixel_area sides as megapixels
        config_sizes = {k: v * v / 1_000_000 for k, v in config_sizes.items()}
    elif "resolution_type" not in own and own_sizes.get("resolution", 8) < 8:
        # below 8 px it is megapixels, as under the training config's `area`
        own_sizes = {k: math.sqrt(v * 1_000_000) for k, v in own_sizes.items()}
        kind = values["resolution_type"] = "pixel_area"
    sizes = {**config_sizes, **own_sizes}
    resolution = sizes.pop("resolution")
    values.update(sizes)
    if values["resolution_type"] != "area" and resolution < 8:
        raise ConfigError(
            f"{where}: resolution {resolution:g} is a megapixel count; set resolution_type: "
            "area, or give the resolution in pixels"
        )
    if values.get("crop_aspect") in ("closest", "random") and not values.get("crop_aspect_buckets"):
        raise ConfigError(
            f"{where}: crop_aspect '{values['crop_aspect']}' picks from crop_aspect_buckets; "
            "set crop_aspect_buckets (aspect ratios, e.g. [0.75, 1.0, 1.33])"
        )
    if "crop_aspect_buckets" in values:
        values["crop_aspect_buckets"] = tuple(values["crop_aspect_buckets"])
    return BucketSpec(resolution=float(resolution), multiple=multiple, seed=seed, **values)


def place_samples(samples: list[Sample], spec: BucketSpec, where: str) -> list[Sample]:
    """Each sample with its placement (file headers only); images the size filters leave out
    are dropped and counted in one log line."""
    from slider_cn.data.loading import upright_size

    kept: list[Sample] = []
    left_out: dict[str, int] = {}
    for sample in samples:
        size = upright_size(sample.path)
        reason = spec.exclusion(size)
        if reason is None:
            kept.append(replace(sample, placement=place(spec, size, sample.key)))
        else:
            left_out[reason] = left_out.get(reason, 0) + 1
    if left_out:
        log.info(
            "%s: left out %d of %d images (%s)",
            where,
            len(samples) - len(kept),
            len(samples),
            ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())),
        )
    if not kept:
        raise ConfigError(
            f"{where}: every image is left out by minimum_image_size / minimum_aspect_ratio / "
            "maximum_aspect_ratio; lower them or add larger images"
        )
    return kept


def check_balance(backends: Sequence[Backend], *, allow_unbalanced: bool, source: str = "") -> None:
    """Positive and negative groups must hold the same number of samples, counting repeats."""

    def describe(sign: str) -> tuple[int, str]:
        group = [b for b in backends if b.sign == sign]
        total = sum(b.samples_per_epoch for b in group)
        parts = ", ".join(
            f"{b.id}: {len(b.samples)} images x {b.repeats + 1} passes" for b in group
        )
        return total, parts or "no backends"

    positive, pos_parts = describe("+")
    negative, neg_parts = describe("-")
    if positive != negative and not allow_unbalanced:
        prefix = f"{source}: " if source else ""
        raise ConfigError(
            f"{prefix}the positive group holds {positive} samples ({pos_parts}) but the negative "
            f"group holds {negative} ({neg_parts}); a slider learns from the contrast, so make "
            f"them equal (add images or adjust repeats), or set slider_allow_unbalanced: true"
        )


def _cache_folders(configs: Sequence[BackendConfig]) -> dict[str, Path]:
    """The text-embedding cache folder of each text_embeds backend by id; "" is the default
    one (SimpleTuner's `default: true`, or the only one)."""
    text = [b for b in configs if b.dataset_type == "text_embeds" and not b.disabled]
    folders = {b.id: Path(b.cache_dir) for b in text if b.cache_dir}
    default = [b for b in text if b.default] or (text if len(text) == 1 else [])
    if default and default[0].cache_dir:
        folders[""] = Path(default[0].cache_dir)
    return folders


def _backend_configs(config: TrainConfig, *, progress: bool = True) -> list[BackendConfig]:
    if config.data_backend_config is None:
        if config.slider_prompts is not None:
            return []  # a text slider without conditioning needs no dataloader config
        raise ConfigError(
            "data_backend_config is required to train: set it in the config or pass "
            "--data_backend_config FILE (or give text sliders in slider_prompts)"
        )
    configs = load_backend_configs(config.data_backend_config)
    if any(b.type == "huggingface" and not b.disabled for b in configs):
        from slider_cn.data.huggingface import as_local

        configs = [
            as_local(b, config.cache_path, progress=progress)
            if b.type == "huggingface"
            and not b.disabled
            and b.dataset_type in ("image", "conditioning")
            else b
            for b in configs
        ]
    return configs


def _suggest_id(word: str, ids: list[str]) -> str:
    from slider_cn.errors import suggest

    return suggest(word, ids) if ids else "; add a backend with dataset_type 'conditioning'"


def prompt_backends(
    entry: PromptEntry,
    conditioning: list[tuple[str, Path]] | None,
    config: TrainConfig,
    *,
    world_size: int = 1,
) -> list[Backend]:
    """The sampler backends of one text-slider entry (slider_cn.data.prompts).

    ``conditioning`` is (key, image) of the entry's conditioning backend, or None. The + and
    - backends hold one sample per conditioning image, or one global batch without
    conditioning. The neutral backend holds as many, or more when there are more anchors: every
    anchor at least once per pass, each with the conditioning images in turn.
    """
    pair, neutral = entry_tasks(entry)
    global_batch = config.train_batch_size * world_size
    if conditioning is None:
        slots = [(f"#{i}", None) for i in range(global_batch)]
    else:
        slots = list(conditioning)
    resolution = entry.resolution or config.resolution

    def backend(suffix: str, strength: float, task: PromptTask, captions: list[str]) -> Backend:
        count = len(captions)
        samples = [
            Sample(None, f"{key}@{caption}#{i // len(slots)}", caption, image)
            for i, ((key, image), caption) in enumerate(
                zip((slots[i % len(slots)] for i in range(count)), captions, strict=True)
            )
        ]
        return Backend(
            id=f"{entry.id}:{suffix}",
            samples=samples,
            slider_strength=strength,
            probability=entry.probability,
            repeats=entry.repeats,
            resolution=resolution,
            prompt=task,
        )

    targets = [entry.target] * len(slots)
    made = [
        backend("+", entry.slider_strength, pair, targets),
        backend("-", -entry.slider_strength, pair, targets),
    ]
    if entry.neutral:
        count = max(len(slots), len(entry.neutral))
        if conditioning is None:  # whole global batches, so that no anchor is dropped
            count = -(-count // global_batch) * global_batch
        anchors = [entry.neutral[i % len(entry.neutral)] for i in range(count)]
        made.append(backend("neutral", 0.0, neutral, anchors))
    return made


def training_backends(
    config: TrainConfig, *, progress: bool = True, world_size: int = 1
) -> list[Backend]:
    """The backends a run trains on: inline conditioning generated (and cached), then built.

    Inline `"conditioning": [{"type": "canny", ...}]` runs the preprocessing runner into
    `<cache_dir>/conditioning` (a rerun reuses what is up to date) and links the result as the
    backend's conditioning data, so the rest of the data layer sees ordinary pairs.
    """
    configs = _backend_configs(config, progress=progress)
    if any(b.conditioning for b in configs if not b.disabled):
        from conditioning.inline import prepare_inline_conditioning

        configs = prepare_inline_conditioning(
            configs, config.cache_path / "conditioning", progress=progress
        )
    return build_backends(config, configs, world_size=world_size)
