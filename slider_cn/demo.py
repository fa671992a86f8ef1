"""`make demo`: the whole journey on the embedded default (tiny sd1x) on a CPU.

Writes a small contrastive dataset, then runs slider-cn on it step by step, printing each
command as a user would type it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from slider_cn.cli import main as cli_main
from slider_cn.demo_data import write_demo_dataset


def _run(args: list[str]) -> None:
    print(f"\n$ slider-cn {shlex.join(args)}", flush=True)
    code = cli_main(args)
    if code != 0:
        sys.exit(code)


def main(root: str = "demo_output") -> None:
    paths = write_demo_dataset(root)
    config = str(paths["config"])
    print(f"wrote a contrastive demo dataset under {Path(root).resolve()}")
    _run(["train", "--config", config, "--dry-run"])


if __name__ == "__main__":
    main(*sys.argv[1:])
