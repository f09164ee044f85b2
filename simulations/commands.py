"""Subcommands of `fedembed` beyond the single-site ones: the demo (and later federation commands)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the default job on built-in data and print the results table."""
    from simulations.demo import run_demo

    run_demo(out_dir=args.out, n=args.n, epochs=args.epochs)
    return 0


def register_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the default job on built-in synthetic radiology data")
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.add_argument(
        "--n", type=int, default=2000, help="examples to generate (default: %(default)s)"
    )
    p.add_argument(
        "--epochs", type=int, default=30, help="local training epochs (default: %(default)s)"
    )
    p.set_defaults(func=cmd_demo)


REGISTRATIONS: list[Callable[[Any], None]] = [register_demo]
