"""`slider-cn preprocess`: its options (built from the registry) and what it runs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

from conditioning.registry import DETECTORS, ParamSpec, get_spec
from slider_cn.errors import ConfigError


def _detector_params() -> dict[str, tuple[ParamSpec, list[str]]]:
    """Every detector parameter name -> (its spec, the detectors that take it)."""
    found: dict[str, tuple[ParamSpec, list[str]]] = {}
    for spec in DETECTORS.values():
        for param in spec.params:
            found.setdefault(param.name, (param, []))[1].append(spec.name)
    return found


# Help for parameters whose meaning differs a little between detectors.
_SHARED_HELP = {
    "detect_resolution": "shorter side (pixels) the detector works at, the result then resized "
    "to the output size (default 512, anyline 1280; canny: unset = at the output size, "
    "exactly cv2.Canny)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", help="detector name (see --list)")
    parser.add_argument("--input", help="folder of source images (searched recursively)")
    parser.add_argument("--output", help="folder for the conditioning PNGs (same relative paths)")
    parser.add_argument("--list", action="store_true", help="list the detectors and exit")
    parser.add_argument(
        "--resolution",
        type=int,
        help="shorter side of the outputs in pixels, aspect kept (default: each source's size)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for CPU detectors (default: the number of CPU cores); weight-based "
        "detectors run in one process, on CUDA when available",
    )
    parser.add_argument(
        "--annotator-path",
        help="weights of a weight-based detector: a local folder holding its files or a hub id "
        "(default: the detector's hub repo, see --list)",
    )
    parser.add_argument("--device", help="torch device for weight-based detectors (default: auto)")
    parser.add_argument("--force", action="store_true", help="redo every file, even up to date")
    group = parser.add_argument_group(
        "detector options (default: controlnet-aux's; each applies to the detectors named)"
    )
    for name, (param, users) in _detector_params().items():
        flag = "--" + name.replace("_", "-")
        text = f"{_SHARED_HELP.get(name, param.help)} [{', '.join(users)}]"
        if param.type is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
            )
            group._group_actions[-1].help = text
        else:
            group.add_argument(
                flag, dest=name, type=param.type, default=argparse.SUPPRESS, help=text
            )


def _given_params(args: argparse.Namespace, detector: str) -> dict[str, Any]:
    spec = get_spec(detector)
    own = [p.name for p in spec.params]
    given = {name: getattr(args, name) for name in _detector_params() if hasattr(args, name)}
    foreign = [name for name in given if name not in own]
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        accepted = ", ".join("--" + n.replace("_", "-") for n in own) or "none"
        raise ConfigError(
            f"{flags} does not apply to detector '{detector}'; its options: {accepted}"
        )
    return given


def format_list() -> str:
    rows = []
    for spec in DETECTORS.values():
        if spec.needs_weights:
            where = spec.default_repo + (f"/{spec.hub_subfolder}" if spec.hub_subfolder else "")
            weights = f"yes: {', '.join(spec.weights)} (default source: {where})"
        else:
            weights = "no"
        missing = [r for r in spec.requires if importlib.util.find_spec(r) is None]
        if missing:
            weights += f"; needs package {', '.join(missing)} (not installed)"
        params = " ".join(f"{p.name}={p.default}" for p in spec.params)
        rows.append(f"{spec.name:<17} {spec.summary}\n{'':17} weights: {weights}")
        rows.append(f"{'':17} params: {params or '-'}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(format_list())
        return 0
    missing = [f"--{n}" for n in ("detector", "input", "output") if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"preprocess needs {', '.join(missing)} (or --list)")
    get_spec(args.detector)  # unknown names fail before anything else
    params = _given_params(args, args.detector)

    from conditioning.runner import run_batch

    report = run_batch(
        args.detector,
        params,
        args.input,
        args.output,
        resolution=args.resolution,
        workers=args.workers,
        annotator_path=args.annotator_path,
        device=args.device,
        force=args.force,
    )
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
