"""The `slider-cn` command: argument parsing and the subcommands, nothing else."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import textwrap

from safetensors import SafetensorError

from slider_cn.config import TrainConfig, config_to_json, load_config, parse_overrides
from slider_cn.errors import ConfigError

log = logging.getLogger("slider_cn")


def _config_keys_help() -> str:
    lines = ["config keys (each may be given as --key value to override the file):"]
    for name, field in TrainConfig.model_fields.items():
        default = field.default
        lines.append(f"  --{name} (default: {default!r})")
        lines.extend(
            textwrap.wrap(
                field.description or "",
                width=88,
                initial_indent="      ",
                subsequent_indent="      ",
            )
        )
    return "\n".join(lines)


# --- train -------------------------------------------------------------------------------
def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        allow_abbrev=False,
        help="train a slider adapter",
        description="Train a slider adapter from a config file; any config key can be overridden as --key value.",
        epilog=_config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="the training config (JSON)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="load and validate the config, the dataloader config and the model components, print the resolved config as JSON, and exit",
    )
    p.add_argument(
        "--plan",
        type=_positive_int,
        metavar="N",
        help="print the first N micro-batches the sampler would produce as JSON lines and exit, without loading any model (implies --dry-run)",
    )
    p.set_defaults(func=_run_train, takes_overrides=True)


def _run_train(args: argparse.Namespace, overrides: dict[str, str | None]) -> int:
    config = load_config(args.config, overrides)
    if args.plan is not None:
        return _print_plan(config, args.plan)
    if args.dry_run:
        return _dry_run(config)
    from slider_cn.train import TrainingError, train

    try:
        result = train(config)
    except TrainingError as exc:
        print(f"slider-cn: training stopped: {exc}", file=sys.stderr)
        return 1
    for kind, path in result.files.items():
        log.info("%-16s %s", kind, path)
    return 0


def _dry_run(config: TrainConfig) -> int:
    import os

    from slider_cn.data.backends import training_backends
    from slider_cn.data.loading import decode_all
    from slider_cn.data.sampler import SliderSampler
    from slider_cn.families import get_family
    from slider_cn.train import check_conditioning, preflight

    # Every refusal training makes (config, output_dir, report_to, validation, captions,
    # pairs, balance, sampler geometry, inline conditioning, conditioning for a ControlNet),
    # every image decoded once, then the model components: exit 0 means the run will start.
    preflight(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun, its geometry
    backends = training_backends(config, world_size=world_size)
    check_conditioning(config, backends)
    SliderSampler(backends, config.train_batch_size, config.seed, world_size=world_size)
    decode_all(backends)
    family = get_family(config)
    components = family.load_components()
    for role, module in components.modules().items():
        params = sum(p.numel() for p in module.parameters())
        log.info("%-14s %-36s %10d parameters", role, type(module).__name__, params)
    log.info("%d training backends: %s", len(backends), ", ".join(b.id for b in backends))
    print(config_to_json(config))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _print_plan(config: TrainConfig, count: int) -> int:
    import json

    from slider_cn.data.backends import build_backends
    from slider_cn.data.sampler import SliderSampler, preview

    backends = build_backends(config)
    sampler = SliderSampler(backends, config.train_batch_size, config.seed)
    log.info(
        "%d training backends, %d micro-batches per epoch of %d samples",
        len(backends),
        len(sampler),
        config.train_batch_size,
    )
    for plan in preview(sampler, count):
        print(json.dumps(plan.to_json()))
    return 0


# --- targets -----------------------------------------------------------------------------
def _add_targets(subparsers) -> None:
    p = subparsers.add_parser(
        "targets",
        allow_abbrev=False,
        help="show which modules the slider adapts",
        description="Resolve the slider (or ordinary LoRA) target patterns on the real model and "
        "print every adapted module: name, layer type, weight shape and the pattern that matched.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", help="a training config: its family, model, mode and slider_lora_target"
    )
    source.add_argument("--family", help="a model family (see --list-families)")
    source.add_argument(
        "--list-families", action="store_true", help="list families and architectures"
    )
    p.add_argument(
        "--model", default="tiny", help="with --family: diffusers folder or hub id (default: tiny)"
    )
    p.add_argument(
        "--side",
        choices=("denoiser", "controlnet"),
        help="which model to resolve on (default: controlnet in controlnet mode, else denoiser)",
    )
    p.add_argument(
        "--no-slider", action="store_true", help="show the ordinary LoRA targets instead"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_targets, takes_overrides=True)


def _run_targets(args: argparse.Namespace, overrides: dict[str, str | None]) -> int:
    from slider_cn.targets_report import build_report, families_listing

    if args.list_families:
        print(families_listing(args.json))
        return 0
    if args.config:
        config = load_config(args.config, overrides)
        slider = False if args.no_slider else None
    else:
        values = {
            **overrides,
            "model_family": args.family,
            "pretrained_model_name_or_path": args.model,
        }
        config = load_config(None, values)
        slider = not args.no_slider
    report = build_report(config, side=args.side, slider=slider)
    print(report.to_json() if args.json else report.to_table())
    return 0


# --- preprocess --------------------------------------------------------------------------
def _add_preprocess(subparsers) -> None:
    from conditioning.cli import add_arguments

    p = subparsers.add_parser(
        "preprocess",
        allow_abbrev=False,
        help="make conditioning images (canny, depth, pose, ...) for a folder of images",
        description="Run a conditioning detector over every image under --input and write PNGs "
        "with the same relative paths under --output; a rerun redoes only what changed.",
    )
    add_arguments(p)
    p.set_defaults(func=_run_preprocess)


def _run_preprocess(args: argparse.Namespace) -> int:
    from conditioning.cli import run

    return run(args)


# --- validate ----------------------------------------------------------------------------
def _add_finished_run_arguments(p: argparse.ArgumentParser) -> None:
    """validate and evaluate: which run, and the strengths of the sweep."""
    p.add_argument("--config", required=True, help="the run's training config (JSON)")
    p.add_argument("--adapter", required=True, help="the run's output folder")
    p.add_argument(
        "--strengths",
        default="-1,-0.5,0,0.5,1",
        help="comma-separated sweep strengths (default: -1,-0.5,0,0.5,1)",
    )


def _add_validate(subparsers) -> None:
    p = subparsers.add_parser(
        "validate",
        allow_abbrev=False,
        help="render the prompt library with a trained slider, with strength-sweep grids",
        description="Rebuild a finished run (its base, ControlNet and slider), render each prompt "
        "of the prompt library at its strength and as a strength sweep (same seed, strengths left "
        "to right). Any config key can be overridden as --key value.",
    )
    _add_finished_run_arguments(p)
    p.add_argument(
        "--seed", type=int, help="seed of every image (default: validation_seed, else seed)"
    )
    p.add_argument("--output", help="folder for the images (default: ADAPTER/validation/final)")
    p.set_defaults(func=_run_validate, takes_overrides=True)


def _run_validate(args: argparse.Namespace, overrides: dict[str, str | None]) -> int:
    from slider_cn.validate import parse_strengths, validate_output

    config = load_config(args.config, overrides)
    strengths = parse_strengths(args.strengths)
    result = validate_output(
        config, args.adapter, strengths=strengths, seed=args.seed, output=args.output
    )
    for name, image in result.images.items():
        print(f"{name}: {image}  sweep: {result.grids[name]}")
    return 0


# --- evaluate ----------------------------------------------------------------------------
def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        allow_abbrev=False,
        help="measure a trained slider: a strength sweep over seeds and prompts",
        description="Rebuild a finished run, render a strength sweep over several seeds and "
        "prompts (with the run's ControlNet and conditioning image), measure every image (the "
        "shapes world's attributes on `shapes`, else the CLIP score difference of --positive and "
        "--negative with --clip_model) and write evaluation.json, a plot and sweep grids. Any "
        "config key can be overridden as --key value.",
    )
    _add_finished_run_arguments(p)
    p.add_argument("--seeds", type=_positive_int, default=4, help="seeds per prompt (default 4)")
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt to sweep (repeatable; default: the run's validation prompts)",
    )
    p.add_argument(
        "--attribute",
        help="shapes: the attribute the slider moves (default: the one it moves most)",
    )
    p.add_argument("--clip_model", help="a local CLIP folder, for models other than shapes")
    p.add_argument("--positive", help="with --clip_model: the concept's positive text")
    p.add_argument("--negative", help="with --clip_model: the concept's negative text")
    p.add_argument("--output", help="folder for the report (default: ADAPTER/evaluation)")
    p.set_defaults(func=_run_evaluate, takes_overrides=True)


def _run_evaluate(args: argparse.Namespace, overrides: dict[str, str | None]) -> int:
    from slider_cn.evaluate import evaluate_output, summary_lines
    from slider_cn.validate import parse_strengths

    config = load_config(args.config, overrides)
    result = evaluate_output(
        config,
        args.adapter,
        strengths=parse_strengths(args.strengths),
        seeds=args.seeds,
        prompts=args.prompt,
        output=args.output,
        attribute=args.attribute,
        clip_model=args.clip_model,
        positive=args.positive,
        negative=args.negative,
    )
    for line in summary_lines(result):
        print(line)
    print(f"report: {result.json_path}")
    print(f"plot:   {result.plot}")
    for grid in result.grids.values():
        print(f"sweep:  {grid}")
    return 0


# --- export ------------------------------------------------------------------------------
def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        allow_abbrev=False,
        help="write a trained slider as kohya, diffusers or a merged ControlNet",
        description="kohya: base-side slider as kohya keys with the true alpha (ComfyUI, A1111). "
        "diffusers: the PEFT/diffusers file. merged-controlnet: a ControlNet-side slider merged "
        "into its ControlNet at --strength, saved with save_pretrained. A --strength other than 1 "
        "is baked into the weights.",
    )
    p.add_argument("--adapter", required=True, help="the run's output folder")
    p.add_argument("--format", required=True, choices=("kohya", "diffusers", "merged-controlnet"))
    p.add_argument(
        "--strength", type=_finite_float, default=1.0, help="strength to bake in (default 1)"
    )
    p.add_argument("--output", help="file (kohya, diffusers) or folder (merged-controlnet)")
    p.add_argument(
        "--controlnet",
        help="merged-controlnet: the ControlNet the slider was trained on (default: the run's "
        "controlnet/ folder, else the one recorded in its metadata)",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from slider_cn.export import export_slider

    path = export_slider(
        args.adapter,
        args.format,
        strength=args.strength,
        output=args.output,
        controlnet=args.controlnet,
    )
    print(path)
    return 0


# --- ui ----------------------------------------------------------------------------------
def _add_ui(subparsers) -> None:
    p = subparsers.add_parser(
        "ui",
        allow_abbrev=False,
        help="a local web page to configure, preview, launch and watch a slider run",
        description="Serve the web UI over a workspace folder and print its URL. Any host other "
        "than loopback requires a token (--token, $SLIDER_CN_UI_TOKEN, or a generated one).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free one)")
    p.add_argument("--workspace", default=".", help="the folder the UI may read and write")
    p.add_argument("--token", help="the token every request must carry (default: generated)")
    p.add_argument("--config", default="config.json", help="config file to open first")
    p.add_argument(
        "--max-upload-mb", type=_finite_float, default=50.0, help="upload size limit (default 50)"
    )
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> int:
    from slider_cn.ui import serve

    return serve(
        args.workspace,
        host=args.host,
        port=args.port,
        token=args.token,
        config=args.config,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
    )


SUBCOMMANDS = (
    _add_train,
    _add_preprocess,
    _add_targets,
    _add_validate,
    _add_evaluate,
    _add_export,
    _add_ui,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slider-cn",
        allow_abbrev=False,
        description="Train ControlNet-aware slider adapters (LoRA / LyCORIS) for diffusion models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--strengths -1,-0.5,0` -> `--strengths=-1,-0.5,0`: argparse would read the value as an
    option because it starts with '-'."""
    joined: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("--strengths", "--strength") and i + 1 < len(argv) and argv[i + 1][:1] == "-":
            joined.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        joined.append(token)
        i += 1
    return joined


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# Warnings the model libraries print on import about each other's versions, at the top of every
# run, that say nothing about the run: torch on torchao's Enum registrations, and diffusers on
# torchao tensor classes for loading torchao-serialized checkpoints (slider-cn loads none; its
# own quantization is applied after loading, slider_cn/precision.py). --verbose shows them.
_LIBRARY_VERSION_NOTES = (
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
)


def _quiet_library_version_notes() -> None:
    for name in _LIBRARY_VERSION_NOTES:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        _quiet_library_version_notes()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, parse_overrides(rest))
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except ConfigError as exc:
        print(f"slider-cn: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as exc:
        # A path that is a file where a folder is needed (or the reverse), an unreadable or
        # corrupt file: the message names the path; a traceback would add nothing.
        print(f"slider-cn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slider-cn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
