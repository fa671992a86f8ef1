"""Which modules a slider adapts: the pattern lists (``spec``, each family's ``targets``, the
``catalog`` of architectures without a family yet) and their resolution on a loaded model
(``matching``)."""

from slider_cn.targets.matching import (
    ADAPTABLE_TYPES,
    AdaptedModule,
    TargetResolution,
    adaptable_modules,
    architectures,
    controlnet_output_projections,
    excluded_by,
    get_architecture,
    matches,
    resolve_targets,
)
from slider_cn.targets.spec import GUIDE_GENERAL, NEVER_SLIDER, ArchitectureTargets

__all__ = [
    "ADAPTABLE_TYPES",
    "GUIDE_GENERAL",
    "NEVER_SLIDER",
    "AdaptedModule",
    "ArchitectureTargets",
    "TargetResolution",
    "adaptable_modules",
    "architectures",
    "controlnet_output_projections",
    "excluded_by",
    "get_architecture",
    "matches",
    "resolve_targets",
]
