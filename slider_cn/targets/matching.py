"""Slider target patterns resolved to the exact module names of a loaded model.

The patterns are data (slider_cn/targets/spec.py explains their syntax); the lists come from
each family (``slider_cn/families/<name>.py``) and, for architectures without a family yet,
from slider_cn/targets/catalog.py.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field

from torch import nn

from slider_cn.errors import ConfigError, suggest
from slider_cn.targets.spec import NEVER_SLIDER, ArchitectureTargets

log = logging.getLogger(__name__)

# Layers an adapter can wrap (PEFT LoRA and LyCORIS both handle these).
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@functools.cache
def architectures() -> dict[str, ArchitectureTargets]:
    """Every architecture with slider targets: each family's, then the catalog's."""
    from slider_cn.families import family_class, family_names
    from slider_cn.targets.catalog import NOT_YET_TRAINABLE

    found = {name: family_class(name).architecture() for name in family_names()}
    for arch in NOT_YET_TRAINABLE:
        if arch.name in found:
            raise RuntimeError(f"{arch.name}: has a family now; delete its catalog entry")
        found[arch.name] = arch
    return found


def get_architecture(name: str) -> ArchitectureTargets:
    """An architecture by its name (a family's architecture has the family's name)."""
    known = architectures()
    if name not in known:
        names = sorted(known)
        raise ConfigError(
            f"no slider targets registered for {name!r}; known architectures: "
            f"{', '.join(names)}{suggest(name, names)}"
        )
    return known[name]


# --- pattern matching --------------------------------------------------------------------
def _pattern_body(pattern: str) -> tuple[bool, str]:
    anchored = pattern.startswith("^")
    parts = pattern.removeprefix("^").split(".")
    body = r"\.".join(
        "[^.]+" if part == "*" else re.escape(part).replace(r"\*", "[^.]*") for part in parts
    )
    return anchored, body


@functools.lru_cache(maxsize=1024)
def _target_regex(pattern: str) -> re.Pattern[str]:
    anchored, body = _pattern_body(pattern)
    return re.compile(("^" if anchored else r"^(?:.*\.)?") + body + "$")


@functools.lru_cache(maxsize=1024)
def _exclude_regex(pattern: str) -> re.Pattern[str]:
    # Also matches everything below the module: "attn2" excludes "...attn2.to_q".
    anchored, body = _pattern_body(pattern)
    return re.compile(("^" if anchored else r"^(?:.*\.)?") + body + r"(?:\..*)?$")


def matches(pattern: str, name: str) -> bool:
    """Whether a target pattern matches a module name (see the module docstring)."""
    return _target_regex(pattern).match(name) is not None


def excluded_by(patterns: tuple[str, ...] | list[str], name: str) -> str | None:
    """The first exclusion pattern that covers ``name`` (the module or an ancestor), if any."""
    for pattern in patterns:
        if _exclude_regex(pattern).match(name):
            return pattern
    return None


# --- walking a model ---------------------------------------------------------------------
def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every Linear/Conv layer of a model, as the base model names them.

    A layer already wrapped by PEFT (an assistant adapter) is reported under its own name with
    its base layer, and the adapter's inner layers (lora_A, lora_B, base_layer) are skipped.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: list[tuple[str, nn.Module]] = []
    skip_below: list[str] = []
    for name, module in model.named_modules():
        if skip_below and (name == skip_below[-1] or name.startswith(skip_below[-1] + ".")):
            continue
        if isinstance(module, BaseTunerLayer):
            skip_below.append(name)
            base = module.get_base_layer()
            if isinstance(base, ADAPTABLE_TYPES):
                found.append((name, base))
            continue
        if isinstance(module, ADAPTABLE_TYPES) and name:
            found.append((name, module))
    return found


@dataclass(frozen=True)
class AdaptedModule:
    """One resolved target: its name, the pattern that matched, its layer type and shape."""

    name: str
    pattern: str
    layer_type: str
    shape: tuple[int, ...]


@dataclass
class TargetResolution:
    """Patterns resolved to the exact module names of one loaded model."""

    architecture: str
    side: str
    slider: bool
    model_class: str
    patterns: tuple[str, ...]
    modules: list[AdaptedModule]
    # Names a pattern matched but that were left out, with the reason.
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def matched(self) -> dict[str, str]:
        """module name -> the pattern that matched it."""
        return {m.name: m.pattern for m in self.modules}

    @property
    def unmatched_patterns(self) -> list[str]:
        used = {m.pattern for m in self.modules}
        return [p for p in self.patterns if p not in used]

    def counts_by_pattern(self) -> dict[str, int]:
        counts = dict.fromkeys(self.patterns, 0)
        for module in self.modules:
            counts[module.pattern] += 1
        return counts


def _describe(layer: nn.Module) -> tuple[str, tuple[int, ...]]:
    # LyCORIS `full` takes the weight off the layer it adapts.
    weight = getattr(layer, "weight", None)
    return type(layer).__name__, tuple(weight.shape) if weight is not None else ()


def _shared_module_ids(model: nn.Module, other: nn.Module) -> set[int]:
    # A shared block's layers are modules of both models, so comparing layers is enough.
    own = {id(m) for m in model.modules()}
    return {id(m) for m in other.modules() if id(m) in own}


def resolve_targets(
    model: nn.Module,
    arch_name: str,
    side: str = "denoiser",
    slider: bool = True,
    exclude_shared_with: nn.Module | None = None,
) -> TargetResolution:
    """Resolve an architecture's patterns to the exact module names of ``model``.

    ``side`` is "denoiser" or "controlnet" (``model`` is then the ControlNet). ``slider``
    picks the slider patterns (cross-attention and text modules are always left out) or the
    family's ordinary LoRA patterns. On the ControlNet side the zero-initialised output
    projections are never returned (they are trained in full), and with
    ``exclude_shared_with=denoiser`` modules the ControlNet shares with the denoiser (Z-Image)
    are left out. Raises ConfigError when nothing resolves.
    """
    arch = get_architecture(arch_name)
    model_class = type(model).__name__
    if side == "denoiser":
        patterns = arch.slider if slider else arch.ordinary
        expected = arch.denoiser_classes
        excludes: tuple[str, ...] = ()
    elif side == "controlnet":
        if not arch.has_controlnet:
            raise ConfigError(
                f"architecture {arch.name!r} has no ControlNet class in diffusers, so there is "
                "nothing to adapt on the ControlNet side; use training_mode 'lora'"
            )
        patterns = arch.controlnet_slider if slider else arch.ordinary
        expected = arch.controlnet_classes
        excludes = arch.controlnet_outputs
    else:
        raise ConfigError(f"side must be 'denoiser' or 'controlnet' (got {side!r})")
    if slider:
        excludes = (*excludes, *NEVER_SLIDER, *arch.exclude)
    if model_class not in expected:
        log.warning(
            "%s targets are written for %s, but the model is a %s",
            arch.name,
            " / ".join(expected),
            model_class,
        )

    shared = _shared_module_ids(model, exclude_shared_with) if exclude_shared_with else set()
    modules: list[AdaptedModule] = []
    skipped: dict[str, str] = {}
    for name, layer in adaptable_modules(model):
        pattern = next((p for p in patterns if matches(p, name)), None)
        if pattern is None:
            continue
        reason = excluded_by(excludes, name)
        if reason is not None:
            skipped[name] = f"excluded by {reason!r}"
            continue
        if id(layer) in shared:
            skipped[name] = "shared with the denoiser"
            continue
        layer_type, shape = _describe(layer)
        modules.append(AdaptedModule(name, pattern, layer_type, shape))

    if not modules:
        what = "slider" if slider else "ordinary LoRA"
        raise ConfigError(
            f"the {what} target patterns of {arch.name!r} ({side} side) match no adaptable "
            f"module of {model_class}: patterns {list(patterns)}"
        )
    return TargetResolution(arch.name, side, slider, model_class, tuple(patterns), modules, skipped)


def controlnet_output_projections(controlnet: nn.Module, arch_name: str) -> list[str]:
    """Names of the layers a fresh ControlNet initialises to zero (trained in full)."""
    arch = get_architecture(arch_name)
    if not arch.has_controlnet:
        raise ConfigError(f"architecture {arch.name!r} has no ControlNet class in diffusers")
    names = [
        name
        for name, _ in adaptable_modules(controlnet)
        if any(matches(p, name) for p in arch.controlnet_outputs)
    ]
    if not names:
        raise ConfigError(
            f"no ControlNet output projection of {arch.name!r} found in "
            f"{type(controlnet).__name__}: patterns {list(arch.controlnet_outputs)}"
        )
    return names
