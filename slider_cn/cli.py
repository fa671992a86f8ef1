"""The `slider-cn` command: argument parsing and the subcommands, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from slider_cn.config import ConfigError, TrainConfig, config_to_json, load_config, parse_overrides

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
    p.set_defaults(func=_run_train, takes_overrides=True)


def _run_train(args: argparse.Namespace, overrides: dict[str, str | None]) -> int:
    config = load_config(args.config, overrides)
    if args.dry_run:
        return _dry_run(config)
    from slider_cn.train import train

    train(config)
    return 0


def _dry_run(config: TrainConfig) -> int:
    from slider_cn.data.config import load_backend_configs
    from slider_cn.families import get_family

    if config.data_backend_config is None:
        raise ConfigError(
            "data_backend_config is required to train: set it in the config or pass --data_backend_config FILE"
        )
    backends = load_backend_configs(config.data_backend_config)
    family = get_family(config)
    components = family.load_components()
    for role, module in components.modules().items():
        params = sum(p.numel() for p in module.parameters())
        log.info("%-14s %-36s %10d parameters", role, type(module).__name__, params)
    log.info("%d dataset backends: %s", len(backends), ", ".join(b.id for b in backends))
    print(config_to_json(config))
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


SUBCOMMANDS = (_add_train, _add_preprocess)


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    except KeyboardInterrupt:
        print("slider-cn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
