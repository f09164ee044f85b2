"""The `fedembed` command line: embed, train and evaluate a site's head; run federations and demos."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from common.errors import FedEmbedError
from simulations.cli.audit import register_audit
from simulations.cli.cache import register_cache
from simulations.cli.compare import register_compare
from simulations.cli.demo import register_demo
from simulations.cli.federation import register_federation
from simulations.cli.site import register_site

DESCRIPTION = """\
fedembed: adapt frozen foundation-model embeddings to your hospital's task by training a small
projection head with a contrastive loss -- alone, or federated with other sites over Flower.

Typical single-site workflow:
  fedembed datasets                                   # built-in datasets
  fedembed embed    --data synthetic-radiology        # frozen embeddings, computed once, cached
  fedembed train    --data synthetic-radiology --out runs/local
  fedembed evaluate --head runs/local                 # frozen vs projected, side by side

A hospital's own data (CSV/JSONL manifest; relative paths are read from where you type them):
  fedembed train    --data site.csv --test-fraction 0 --out runs/site   # train on every row
  fedembed evaluate --head runs/site --data test.csv  # score every row of a separate test file
"""


REGISTRATIONS: list[Callable[[Any], None]] = [
    register_site,
    register_demo,
    register_federation,
    register_audit,
    register_compare,
    register_cache,
]
"""Every command group, in `fedembed --help` order."""


def build_parser() -> argparse.ArgumentParser:
    """The `fedembed` parser: every command group registers its own subcommands."""
    parser = argparse.ArgumentParser(
        prog="fedembed",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show debug logs and full tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRATIONS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars show progress
    parser = build_parser()
    args = argparse.Namespace(verbose=False)
    try:
        parser.parse_args(argv, namespace=args)  # paths are made absolute (and checked) here
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return int(args.func(args))
    except FedEmbedError as exc:
        if args.verbose:
            raise
        print(f"fedembed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedembed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
