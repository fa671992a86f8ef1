"""On-disk caches of VAE latents and text embeddings (safetensors), so that a second epoch or a
second run does not run the VAE or the text encoders again.

`EncodedCache(cache_dir, family, components)`:

- ``latents(batch) -> Tensor``: the scaled latents (B, C, R/8, R/8) of a `Batch` or a
  `BatchPlan`, float32 on ``device``. One entry per image, keyed by the image file's
  identity (resolved path, size, mtime), the model identity (`family.encoder_identity()`),
  the resolution and the preprocessing (center crop); a changed image gets a new key and is
  re-encoded. Misses of one batch go through the VAE in one call; for a plan (or a batch
  loaded with ``pixels=False``) only the missing images are decoded from disk.
- ``text(captions) -> dict[str, Tensor]``: `family.encode_prompts` output stacked per
  caption, float32 on ``device``, keyed by caption text and model identity; distinct missing
  captions go through the text encoders in one call.

Layout: ``<cache_dir>/latents/<sha256>.safetensors`` and ``<cache_dir>/text/<sha256>.safetensors``,
written atomically (temporary file + rename), so concurrent ranks never read half a file; an
unreadable entry is re-encoded. ``stats`` counts hits, misses and encoder calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slider_cn.data.buckets import Placement
from slider_cn.data.loading import Batch, image_pixels, sample_placement
from slider_cn.data.sampler import BatchPlan
from slider_cn.errors import ConfigError

if TYPE_CHECKING:
    from slider_cn.families.base import Components, ModelFamily

log = logging.getLogger(__name__)

# Bump when the preprocessing or the stored format changes: old entries then miss.
# 2: images are decoded by slider_cn/image_files.py (transparency on white, 16-bit to 8)
CACHE_VERSION = 3  # 3: keyed by bucket placement (aspect buckets)
PREPROCESSING = "resize-shorter-bicubic+center-crop"


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def encoding_dtype(vae: torch.nn.Module) -> torch.dtype:
    """The dtype the VAE encodes in: fp32 for an fp16 VAE whose config asks for upcasting
    (SDXL's overflows in fp16), as diffusers' pipelines and training scripts do."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return vae.dtype


@contextlib.contextmanager
def vae_encoding_precision(vae: torch.nn.Module) -> Iterator[None]:
    """Upcast the VAE for the encode when `encoding_dtype` says so, then put it back."""
    stored = vae.dtype
    dtype = encoding_dtype(vae)
    if dtype == stored:
        yield
        return
    vae.to(dtype)
    try:
        yield
    finally:
        vae.to(stored)


class EncodedCache:
    """See the module docstring."""

    def __init__(
        self,
        cache_dir: str | Path,
        family: ModelFamily,
        components: Components,
        *,
        device: torch.device | str | None = None,
        text_encoders_onloaded: Callable[[], AbstractContextManager] | None = None,
        folders: dict[str, tuple[Path | None, Path | None]] | None = None,
    ):
        self.root = Path(cache_dir)
        # backend id -> (latent folder, text folder) of dataloader backends that name their own
        # (SimpleTuner's cache_dir_vae, and the cache_dir of their text_embeds backend)
        self.folders = folders or {}
        # the scope in which the text encoders are on the device (slider_cn/offload.py)
        self.text_encoders_onloaded = text_encoders_onloaded or contextlib.nullcontext
        self.family = family
        self.components = components
        self.identity = family.encoder_identity()
        self.device = torch.device(device) if device is not None else components.vae.device
        self.stats = {
            "latent_hits": 0,
            "latent_misses": 0,
            "vae_calls": 0,
            "text_hits": 0,
            "text_misses": 0,
            "text_encoder_calls": 0,
        }

    # --- keys and files ----------------------------------------------------------------
    def latent_key(self, path: Path, where: Placement | int) -> str:
        """The cache key of an image's latent: the file (path, size, time), the encoder, and
        where it trains (bucket, resize and crop; an int is a square of that resolution)."""
        try:
            stat = Path(path).stat()
        except OSError as exc:
            raise ConfigError(f"cannot read image {path}: {exc}") from None
        return _digest(
            {
                "kind": "latent",
                "version": CACHE_VERSION,
                "path": str(Path(path).resolve()),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "model": self.identity,
                "encoder": "vae",
                # latents encoded in fp16 must not serve a run that encodes in fp32
                "vae_dtype": str(encoding_dtype(self.components.vae)),
                "placement": dataclasses.asdict(where) if isinstance(where, Placement) else where,
                "preprocessing": PREPROCESSING,
            }
        )

    def text_key(self, caption: str) -> str:
        return _digest(
            {
                "kind": "text",
                "version": CACHE_VERSION,
                "caption": caption,
                "model": self.identity,
                "encoder": "text_encoders",
            }
        )

    def _file(self, kind: str, key: str, backend: str | None = None) -> Path:
        latent_dir, text_dir = self.folders.get(backend or "", (None, None))
        own = latent_dir if kind == "latents" else text_dir
        if own is not None:
            return Path(own) / f"{key}.safetensors"
        return self.root / kind / f"{key}.safetensors"

    def _read(self, file: Path) -> dict[str, torch.Tensor] | None:
        if not file.is_file():
            return None
        try:
            return load_file(file)
        except (OSError, SafetensorError) as exc:
            log.warning("cache entry %s is unreadable (%s); encoding again", file, exc)
            return None

    def _write(
        self, file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        save_file(
            {
                k: v.detach().to("cpu", torch.float32).contiguous().clone()
                for k, v in tensors.items()
            },
            str(tmp),
            metadata=metadata,
        )
        os.replace(tmp, file)

    # --- latents -----------------------------------------------------------------------
    def latents(self, batch: Batch | BatchPlan) -> torch.Tensor:
        plan = batch.plan if isinstance(batch, Batch) else batch
        pixels = batch.pixels if isinstance(batch, Batch) else None
        placements = (
            batch.placements
            if isinstance(batch, Batch) and batch.placements is not None
            else [sample_placement(s, plan) for s in plan.samples]
        )
        keys = [self.latent_key(s.path, p) for s, p in zip(plan.samples, placements, strict=True)]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, int] = {}  # key -> first sample index (a pool may repeat an image)
        for i, key in enumerate(keys):
            if key in found or key in missing:
                continue
            entry = self._read(self._file("latents", key, plan.backend))
            if entry is None:
                missing[key] = i
            else:
                found[key] = entry["latent"]
        self.stats["latent_hits"] += len(found)
        if missing:
            self.stats["latent_misses"] += len(missing)
            indices = list(missing.values())
            if pixels is not None:
                fresh = pixels[indices]
            else:
                fresh = torch.stack(
                    [image_pixels(plan.samples[i].path, placements[i]) for i in indices]
                )
            with torch.no_grad(), vae_encoding_precision(self.components.vae):
                encoded = self.family.encode_images(self.components, fresh)
            self.stats["vae_calls"] += 1
            for (key, i), latent in zip(missing.items(), encoded, strict=True):
                self._write(
                    self._file("latents", key, plan.backend),
                    {"latent": latent},
                    {
                        "path": str(plan.samples[i].path),
                        "bucket": placements[i].describe(),
                        "model": self.identity,
                    },
                )
                found[key] = latent.detach().to("cpu", torch.float32)
        return torch.stack([found[k] for k in keys]).to(self.device)

    # --- text --------------------------------------------------------------------------
    def text(self, captions: Sequence[str], backend: str | None = None) -> dict[str, torch.Tensor]:
        found: dict[str, dict[str, torch.Tensor]] = {}
        missing: list[str] = []
        for caption in captions:
            if caption in found or caption in missing:
                continue
            entry = self._read(self._file("text", self.text_key(caption), backend))
            if entry is None:
                missing.append(caption)
            else:
                found[caption] = entry
        self.stats["text_hits"] += len(found)
        if missing:
            self.stats["text_misses"] += len(missing)
            with torch.no_grad(), self.text_encoders_onloaded():
                encoded = self.family.encode_prompts(self.components, list(missing))
            self.stats["text_encoder_calls"] += 1
            for i, caption in enumerate(missing):
                entry = {name: tensor[i] for name, tensor in encoded.items()}
                self._write(
                    self._file("text", self.text_key(caption), backend),
                    entry,
                    {"caption": caption, "model": self.identity},
                )
                found[caption] = {k: v.detach().to("cpu", torch.float32) for k, v in entry.items()}
        names = found[captions[0]].keys() if captions else ()
        return {
            name: torch.stack([found[c][name] for c in captions]).to(self.device) for name in names
        }
