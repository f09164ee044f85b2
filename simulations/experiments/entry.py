"""What every experiment's ``python -m`` entry point does with a failure it can name."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_main(prog: str, main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit with its code; a ``FedEmbedError`` (a bad setting, a failed
    federated arm) is one line on stderr, ``<prog>: error: ...``, and exit status 2."""
    from common.errors import FedEmbedError

    try:
        code = main()
    except FedEmbedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def add_runs_argument(parser: argparse.ArgumentParser, *, name: str, what: str) -> None:
    """``--runs NAME=DIR ...`` (at least one) and ``--out DIR``: the arguments of an experiment
    that compares earlier runs' result directories, the first being the reference."""
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar=f"{name}=DIR",
        help=f"a {name.lower()} and {what}; the first is the reference the others are paired against",
    )
    parser.add_argument("--out", type=Path, required=True)


def load_runs(specs: Sequence[str], result_name: str) -> dict[str, dict[str, Any]]:
    """``NAME -> <DIR>/<result_name>.json`` of each ``NAME=DIR`` spec, in order; a ConfigError
    names a malformed spec or a missing file."""
    from common.errors import ConfigError

    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--runs: expected NAME=DIR, got {spec!r}")
        path = Path(directory) / f"{result_name}.json"
        if not path.exists():
            raise ConfigError(f"--runs: {path} does not exist")
        runs[name] = json.loads(path.read_text(encoding="utf-8"))
    return runs
