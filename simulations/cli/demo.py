"""`fedembed demo`: the argparse part; the demo itself is simulations/experiments/demo.py."""

from __future__ import annotations

import argparse
from typing import Any

from simulations.cli.paths import user_path
from simulations.experiments import demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the default job on built-in data and print the results table."""
    demo.run_demo(out_dir=args.out, n=args.n, rounds=args.rounds, sites=args.sites)
    return 0


def register_demo(sub: Any) -> None:
    """Add `demo` to the `fedembed` subparsers (defaults: simulations/experiments/demo.py)."""
    p = sub.add_parser(
        "demo",
        help=f"{demo.SITES} simulated hospitals: frozen vs alone vs pooled vs federated (built-in data)",
    )
    p.add_argument(
        "--out",
        default=demo.OUT_DIR,
        type=user_path,
        help="output directory (default: %(default)s)",
    )
    p.add_argument(
        "--n", type=int, default=demo.EXAMPLES, help="examples to generate (default: %(default)s)"
    )
    p.add_argument(
        "--rounds", type=int, default=demo.ROUNDS, help="federated rounds (default: %(default)s)"
    )
    p.add_argument(
        "--sites", type=int, default=demo.SITES, help="simulated hospitals (default: %(default)s)"
    )
    p.set_defaults(func=cmd_demo)
