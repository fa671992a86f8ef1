"""What `slider-cn targets` shows: the resolved targets of a config's model, as a table or JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from slider_cn.config import TrainConfig
from slider_cn.targets import (
    TargetResolution,
    architectures,
    controlnet_output_projections,
    get_architecture,
    resolve_targets,
)


@dataclass
class TargetsReport:
    family: str
    resolution: TargetResolution
    # ControlNet side only: the zero-initialised output layers, and whether they are trained
    # in full (a fresh ControlNet) or left alone (a loaded one).
    output_projections: list[str]
    outputs_trained: bool

    def to_json(self) -> str:
        res = self.resolution
        data = {
            "family": self.family,
            "side": res.side,
            "adapted": res.names,
            "patterns": list(res.patterns),
            "architecture": res.architecture,
            "model_class": res.model_class,
            "slider": res.slider,
        }
        if res.side == "controlnet":
            data["controlnet_output_projections"] = self.output_projections
        return json.dumps(data, indent=2)

    def to_table(self) -> str:
        res = self.resolution
        rows = [(m.name, m.layer_type, "x".join(map(str, m.shape)), m.pattern) for m in res.modules]
        header = ("module", "layer", "weight shape", "matched pattern")
        widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(4)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join([*lines, "", *self.summary()])

    def summary(self) -> list[str]:
        res = self.resolution
        kind = "slider" if res.slider else "ordinary LoRA"
        lines = [
            f"{len(res.modules)} modules adapted on {res.model_class} "
            f"(family {self.family}, architecture {res.architecture}, {res.side} side, "
            f"{kind} targets)",
            "by pattern: "
            + ", ".join(f"{p} x{n}" for p, n in res.counts_by_pattern().items() if n),
        ]
        if res.unmatched_patterns:
            lines.append("patterns matching nothing here: " + ", ".join(res.unmatched_patterns))
        if res.skipped:
            reasons = Counter(res.skipped.values())
            lines.append(
                f"left out {len(res.skipped)} matching modules: "
                + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            )
        if res.side == "controlnet":
            what = (
                "trained in full (fresh ControlNet: zero-initialised)"
                if self.outputs_trained
                else "not adapted (loaded ControlNet)"
            )
            lines.append(
                f"ControlNet output projections, {what}: {', '.join(self.output_projections)}"
            )
        return lines


def build_report(
    config: TrainConfig, side: str | None = None, slider: bool | None = None
) -> TargetsReport:
    """Load the config's model and resolve its targets.

    ``side`` defaults to the config's training mode (controlnet mode -> the ControlNet);
    ``slider`` defaults to the config's ``slider_lora_target``.
    """
    from slider_cn.families import get_family

    if side is None:
        side = "controlnet" if config.training_mode == "controlnet" else "denoiser"
    if slider is None:
        slider = config.slider_lora_target
    arch = get_architecture(config.model_family).name
    components = get_family(config).load_components(with_controlnet=side == "controlnet")
    if side == "controlnet":
        controlnet = components.controlnet
        resolution = resolve_targets(
            controlnet,
            arch,
            side="controlnet",
            slider=slider,
            exclude_shared_with=components.denoiser,
        )
        outputs = controlnet_output_projections(controlnet, arch)
        return TargetsReport(
            config.model_family, resolution, outputs, components.controlnet_is_fresh
        )
    resolution = resolve_targets(components.denoiser, arch, side="denoiser", slider=slider)
    return TargetsReport(config.model_family, resolution, [], False)


def families_listing(as_json: bool) -> str:
    """The model families slider-cn can load, and every architecture with registered targets."""
    from slider_cn.families import family_class, family_names

    families = []
    for name in family_names():
        cls = family_class(name)
        arch = cls.architecture()
        families.append(
            {
                "family": name,
                "architecture": arch.name,
                "denoiser": cls.denoiser_class_name(),
                "controlnet": cls.controlnet_class_name(),
                "description": cls.description,
            }
        )
    loadable = {f["architecture"] for f in families}
    listed = [
        {
            "architecture": arch.name,
            "description": arch.description,
            "denoiser_classes": list(arch.denoiser_classes),
            "controlnet_classes": list(arch.controlnet_classes),
            "family": arch.name in loadable,
        }
        for arch in architectures().values()
    ]
    if as_json:
        return json.dumps({"families": families, "architectures": listed}, indent=2)
    lines = ["model families (--family):"]
    for f in families:
        lines.append(f"  {f['family']:<16} {f['description']}  [ControlNet: {f['controlnet']}]")
    lines.append("")
    lines.append("architectures with slider targets (* = loadable as a family today):")
    for a in listed:
        mark = "*" if a["family"] else " "
        controlnet = ", ".join(a["controlnet_classes"]) or "no ControlNet"
        lines.append(f" {mark} {a['architecture']:<16} {a['description']}  [{controlnet}]")
    return "\n".join(lines)
