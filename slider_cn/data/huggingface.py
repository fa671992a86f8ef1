"""`type: huggingface` backends: a `datasets` dataset, written once as a folder of images.

SimpleTuner's keys: `dataset_name` (a hub id, a folder written by `Dataset.save_to_disk`, or a
folder / files `datasets.load_dataset` reads, such as an image folder or parquet files),
`split`, `image_column`, `caption_column` (also inside a `huggingface` block). The rows are
written to ``<cache_dir>/huggingface/<id>-<fingerprint>/`` as ``000000.png`` with
``000000.txt`` beside it holding the caption, and the backend then reads that folder like any
local one (textfile captions), so buckets, conditioning pairing, the latent cache and `--plan`
work unchanged. A rerun with the same dataset reuses the folder; an interrupted export starts
over (the folder is complete only when its marker file exists).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slider_cn.data.config import BackendConfig
from slider_cn.errors import ConfigError

COMPLETE = ".complete"
# what an export writes; a new version writes the folder again
EXPORT_VERSION = 2


def load_dataset(backend: BackendConfig) -> Any:
    """The backend's split, from a saved-to-disk folder, local data files or the hub."""
    import datasets

    name = backend.dataset_name
    assert name is not None
    path = Path(name)
    try:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            data = datasets.load_from_disk(str(path))
        elif path.is_dir() and (path / "dataset_dict.json").is_file():
            data = datasets.load_from_disk(str(path))[backend.split]
        else:
            data = datasets.load_dataset(name, split=backend.split)
    except KeyError:
        raise ConfigError(
            f"backend '{backend.id}': dataset {name} has no split '{backend.split}'; set split"
        ) from None
    except (OSError, ValueError, FileNotFoundError) as exc:
        hint = "" if path.exists() else " (hub ids need network access and HF_HUB_OFFLINE unset)"
        raise ConfigError(
            f"backend '{backend.id}': cannot load dataset {name}{hint}: {exc}"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        data = data[backend.split]
    columns = list(data.column_names)
    reads_captions = backend.caption_strategy in ("huggingface", "textfile", "filename")
    wanted = [backend.image_column] + ([backend.caption_column] if reads_captions else [])
    missing = [c for c in wanted if c and c not in columns]
    if missing:
        raise ConfigError(
            f"backend '{backend.id}': dataset {name} has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(columns)}); set image_column / caption_column"
        )
    return data


def materialise(backend: BackendConfig, cache_root: Path, *, progress: bool = True) -> Path:
    """Write the backend's rows as images and captions (once); return the folder."""
    data = load_dataset(backend)
    fingerprint = getattr(data, "_fingerprint", None) or str(len(data))
    digest = hashlib.sha256(
        f"{fingerprint}|{backend.image_column}|{backend.caption_column}|{EXPORT_VERSION}".encode()
    ).hexdigest()[:12]
    folder = cache_root / "huggingface" / f"{_safe(backend.id)}-{digest}"
    if (folder / COMPLETE).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted export
    folder.mkdir(parents=True)
    for index, row in enumerate(
        tqdm(data, desc=f"dataset {backend.id}", disable=not progress, unit="img")
    ):
        image = _as_image(row[backend.image_column], backend, index)
        stem = folder / f"{index:06d}"
        image.save(stem.with_suffix(".png"))
        if backend.caption_column and backend.caption_column in row:
            caption = row[backend.caption_column]
            if isinstance(caption, list):  # several captions: the first
                caption = caption[0] if caption else ""
            stem.with_suffix(".txt").write_text(str(caption or ""), encoding="utf-8")
    (folder / COMPLETE).write_text(str(len(data)))
    return folder


def as_local(backend: BackendConfig, cache_root: Path, *, progress: bool = True) -> BackendConfig:
    """The backend as a local one over its written folder."""
    folder = materialise(backend, cache_root, progress=progress)
    strategy = backend.caption_strategy
    if strategy in ("huggingface", "filename"):
        strategy = "textfile" if backend.caption_column else "instanceprompt"
    return backend.model_copy(
        update={"type": "local", "instance_data_dir": str(folder), "caption_strategy": strategy}
    )


def _as_image(value: Any, backend: BackendConfig, index: int):
    # Upright by EXIF, in the file's own mode (PNG keeps 16-bit, alpha and palettes), so
    # the training decoder (image_files.open_rgb) treats it as it treats any local file.
    from PIL import Image, ImageOps

    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    elif isinstance(value, str) and Path(value).is_file():
        value = Image.open(value)
    if isinstance(value, Image.Image):
        image = ImageOps.exif_transpose(value)
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        return image
    raise ConfigError(
        f"backend '{backend.id}': row {index} of column '{backend.image_column}' is not an "
        f"image ({type(value).__name__}); set image_column to the image column"
    )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
