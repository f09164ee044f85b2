"""The `fedembed` command line: embed, train and evaluate a site's head; run federations and demos."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import FedEmbedError

DESCRIPTION = """\
fedembed: adapt frozen foundation-model embeddings to your hospital's task by training a small
projection head with a contrastive loss -- alone, or federated with other sites over Flower.

Typical single-site workflow:
  fedembed datasets                                   # built-in datasets
  fedembed embed    --data synthetic-radiology        # frozen embeddings, computed once, cached
  fedembed train    --data synthetic-radiology --out runs/local
  fedembed evaluate --head runs/local                 # frozen vs projected, side by side
"""

Command = Callable[[argparse.Namespace], int]


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="synthetic-radiology",
        help="built-in dataset name (see 'fedembed datasets') or a CSV/JSONL manifest path "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--n", type=int, default=None, help="number of examples for generated datasets"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="data generation seed (default: %(default)s)"
    )
    group.add_argument(
        "--site", type=int, default=0, help="site index for generated data (acquisition shift)"
    )
    group.add_argument(
        "--task",
        default=None,
        help="label task, e.g. 'abnormal' or 'cardiomegaly' for iu-xray-reports",
    )
    group.add_argument(
        "--image-encoder",
        default="mobilenetv2",
        help="packaged name (mobilenetv2), Hugging Face id or local directory; 'none' to skip images",
    )
    group.add_argument(
        "--text-encoder",
        default="minilm",
        help="packaged name (minilm), Hugging Face id or local directory; 'none' to skip texts",
    )
    group.add_argument(
        "--encoder-image-size",
        type=int,
        default=None,
        help="resize images to this size for the encoder",
    )
    group.add_argument(
        "--test-fraction", type=float, default=0.2, help="held-out fraction (default: %(default)s)"
    )
    group.add_argument(
        "--cache-dir",
        default=None,
        help="embedding cache directory (default: $FEDEMBED_HOME/cache, the sites' cache)",
    )
    group.add_argument(
        "--on-bad-row",
        choices=["raise", "skip"],
        default="raise",
        help="a manifest row that cannot be used (missing/empty/non-UTF-8 field, duplicate id, "
        "missing or unreadable image, unknown label): stop with an error naming file, line and "
        "field (raise), or leave it out and report it (skip) (default: %(default)s)",
    )


def _cache_dir(args: argparse.Namespace) -> Path:
    """The cache the user named, else the one every site and command shares ($FEDEMBED_HOME/cache)."""
    from common.config import resolve_path

    return Path(args.cache_dir) if args.cache_dir else resolve_path("", "cache")


def _data_spec(args: argparse.Namespace) -> Any:
    from common.pipeline import DataSpec

    return DataSpec(
        dataset=args.data,
        n=args.n,
        seed=args.seed,
        site=args.site,
        task=args.task,
        image_encoder=args.image_encoder,
        text_encoder=args.text_encoder,
        encoder_image_size=args.encoder_image_size,
        test_fraction=args.test_fraction,
        on_bad_row=args.on_bad_row,
    )


def cmd_datasets(args: argparse.Namespace) -> int:
    """Print the built-in datasets."""
    from common.data.registry import BUILTIN_DATASETS

    for name, description in BUILTIN_DATASETS.items():
        print(f"{name:22s} {description}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Compute (or load from the cache) the frozen embeddings of a dataset."""
    from common.pipeline import embed_site

    embedded, report, _identities = embed_site(
        _data_spec(args), cache_dir=_cache_dir(args), progress=True
    )
    dims = ", ".join(f"{m} {d}-d" for m, d in embedded.dims.items())
    print(f"{len(embedded)} examples embedded ({dims}); cache: {_cache_dir(args)}")
    for modality, stats in report.stats.items():
        print(f"  {modality:8s} {stats.hits} from cache, {stats.misses} encoded now")
    for line in report.summary():
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one site's head locally and save it with its configuration."""
    from common.artifacts import save_head
    from common.evaluation import evaluate_head, headline
    from common.heads import HEAD_PRESETS
    from common.pipeline import prepare_site_data
    from common.training import TrainConfig, build_head_model, train_head

    if args.head not in HEAD_PRESETS:
        raise FedEmbedError(
            f"unknown head preset '{args.head}'; choose from {sorted(HEAD_PRESETS)}"
        )
    spec = _data_spec(args)
    site = prepare_site_data(spec, cache_dir=_cache_dir(args), progress=True)
    config = TrainConfig(
        loss=args.loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.train_seed,
    )
    model = build_head_model(
        dims=site.train.dims,
        head_config=HEAD_PRESETS[args.head],
        layout=args.layout,
        loss=args.loss,
        num_classes=site.train.num_classes or None,
        seed=args.train_seed,
    )
    result = train_head(model, site.train, config, progress=True)
    print(
        f"trained {args.epochs} epochs on {result.num_examples} examples: loss {result.loss:.4f} ({result.seconds:.1f} s)"
    )
    report = evaluate_head(model, site.train, site.test, seed=args.train_seed)
    metadata = {
        "data": spec.to_dict(),
        "train": config.to_dict(),
        "head_preset": args.head,
        "encoders": site.encoders,
        "metrics": report.to_dict(),
    }
    out = save_head(args.out, model, metadata=metadata)
    print(report.table())
    print(f"head saved to {out} ({', '.join(f'{k}={v:.3f}' for k, v in headline(report).items())})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a saved head on its held-out split (or another dataset), frozen vs projected."""
    from dataclasses import replace

    from common.artifacts import load_head
    from common.evaluation import evaluate_head
    from common.pipeline import DataSpec, prepare_site_data

    model, config = load_head(args.head)
    spec = DataSpec.from_dict(config["data"])
    if args.data:
        spec = replace(spec, dataset=args.data)
    site = prepare_site_data(spec, cache_dir=_cache_dir(args), progress=True)
    classifiers = args.classifiers.split(",") if args.classifiers else None
    report = evaluate_head(model, site.train, site.test, classifiers=classifiers)
    print(report.table())
    if args.json:
        from common.atomic import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
        print(f"metrics written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from common.config import LOSSES

    parser = argparse.ArgumentParser(
        prog="fedembed",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show debug logs and full tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("datasets", help="list the built-in datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("embed", help="compute frozen embeddings once and cache them")
    _add_data_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("train", help="train a projection head on one site's cached embeddings")
    _add_data_args(p)
    p.add_argument(
        "--out", default="runs/local-head", help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--loss",
        default="infonce",
        choices=list(LOSSES),
        help="contrastive loss",
    )
    p.add_argument(
        "--head",
        default="default",
        help="head preset: default, paper, small (default: %(default)s)",
    )
    p.add_argument(
        "--layout",
        default="two-tower",
        choices=["two-tower", "concat"],
        help="one head per modality, or one on the concatenation",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved head: frozen vs projected embeddings")
    p.add_argument(
        "--head",
        required=True,
        help="directory written by 'fedembed train' (or a federated run's final head)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="evaluate on this dataset instead of the head's own held-out split",
    )
    p.add_argument(
        "--classifiers",
        default=None,
        help="comma list: knn,tree,forest,gboost,logreg,logreg_scaled,mlp",
    )
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="embedding cache directory (default: $FEDEMBED_HOME/cache)",
    )
    p.set_defaults(func=cmd_evaluate)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands defined next to the code they drive (simulations, deployment, audit)."""
    from simulations import commands

    return commands.REGISTRATIONS


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars show progress
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
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
