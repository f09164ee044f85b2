"""`fedembed datasets`, `embed`, `train` and `evaluate`: one site's head, trained and scored alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from common.config import DataSpec, RunSettings, TrainConfig
from common.errors import ConfigError, FedEmbedError
from simulations.cli.paths import dataset_key, dataset_option, user_encoder, user_path

if TYPE_CHECKING:  # imported where used: `fedembed --help` loads no torch
    from common.embedding import EmbeddedDataset
    from common.training import HeadModel

TRAIN_EPOCHS = 30
"""`fedembed train --epochs` default: one site alone trains longer than TrainConfig's per-round 10."""


def register_site(sub: Any) -> None:
    """Add datasets, embed, train and evaluate to the `fedembed` subparsers."""
    from common.config import LOSSES

    train_defaults = TrainConfig()
    p = sub.add_parser("datasets", help="list the built-in datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("embed", help="compute frozen embeddings once and cache them")
    _add_data_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("train", help="train a projection head on one site's cached embeddings")
    _add_data_args(p)
    p.add_argument(
        "--out",
        default="runs/local-head",
        type=user_path,
        help="output directory (default: %(default)s)",
    )
    p.add_argument(
        "--loss",
        default=train_defaults.loss,
        choices=list(LOSSES),
        help="contrastive loss",
    )
    p.add_argument(
        "--head",
        default=RunSettings().head,
        help="head preset: default, paper, small (default: %(default)s)",
    )
    p.add_argument(
        "--layout",
        default=RunSettings().layout,
        choices=["two-tower", "concat"],
        help="one head per modality, or one on the concatenation",
    )
    p.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
    p.add_argument("--batch-size", type=int, default=train_defaults.batch_size)
    p.add_argument("--lr", type=float, default=train_defaults.lr)
    p.add_argument("--train-seed", type=int, default=train_defaults.seed)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a saved head: frozen vs projected embeddings")
    p.add_argument(
        "--head",
        required=True,
        type=user_path,
        help="directory written by 'fedembed train' (or a federated run's final head)",
    )
    p.add_argument(
        "--data",
        default=None,
        type=dataset_option("--data"),
        help="score every row of this manifest (or built-in dataset) with the head's encoders, "
        "instead of the head's own held-out split; a split column limits it to the rows marked test",
    )
    p.add_argument(
        "--train-data",
        default=None,
        type=dataset_option("--train-data"),
        help="fit the frozen alignment baselines and probes on this data (its rows not marked "
        "test); default: the head's own training split when this machine has that data, else "
        "they are left out",
    )
    p.add_argument(
        "--classifiers",
        default=None,
        help="comma list: knn,tree,forest,gboost,logreg,logreg_scaled,mlp",
    )
    p.add_argument(
        "--json", default=None, type=user_path, help="also write the metrics to this JSON file"
    )
    _add_cache_dir(p, default_text="$FEDEMBED_HOME/cache")
    _add_on_bad_row(p)
    p.set_defaults(func=cmd_evaluate)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    from common.registries import ENCODER_DEVICES, ENCODER_PRECISIONS

    defaults = DataSpec()
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=defaults.dataset,
        type=dataset_option("--data"),
        help="built-in dataset name (see 'fedembed datasets') or a CSV/JSONL manifest path "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--n", type=int, default=None, help="number of examples for generated datasets"
    )
    group.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="data generation seed (default: %(default)s)",
    )
    group.add_argument(
        "--site",
        type=int,
        default=defaults.site,
        help="site index for generated data (acquisition shift)",
    )
    group.add_argument(
        "--task",
        default=None,
        help="label task, e.g. 'abnormal' or 'cardiomegaly' for iu-xray-reports",
    )
    group.add_argument(
        "--image-encoder",
        default=defaults.image_encoder,
        type=user_encoder,
        help="packaged name (mobilenetv2), Hugging Face id or local directory; 'none' to skip images",
    )
    group.add_argument(
        "--text-encoder",
        default=defaults.text_encoder,
        type=user_encoder,
        help="packaged name (minilm), Hugging Face id or local directory; 'none' to skip texts",
    )
    group.add_argument(
        "--encoder-image-size",
        type=int,
        default=None,
        help="resize images to this size for the encoder",
    )
    group.add_argument(
        "--encoder-precision",
        default=defaults.encoder_precision,
        choices=list(ENCODER_PRECISIONS),
        help="how the encoders compute: auto (bf16 where the CPU/GPU has it natively and a "
        "fidelity probe keeps cosine >= 0.999 to fp32, else fp32; MobileNetV2 on a CPU: fp32 on "
        "ONNX Runtime), fp32 or bf16 (default: %(default)s)",
    )
    group.add_argument(
        "--encoder-device",
        default=defaults.encoder_device,
        choices=list(ENCODER_DEVICES),
        help="where the encoders run: auto (CUDA when present), cpu or cuda (default: %(default)s)",
    )
    group.add_argument(
        "--test-fraction",
        type=_test_fraction,
        default=defaults.test_fraction,
        help="held-out fraction, in [0, 1); 0 trains on every row (score the head later with "
        "'fedembed evaluate --data TEST.csv'); rows a manifest's split column marks test are "
        "the held-out split instead (default: %(default)s)",
    )
    _add_cache_dir(group, default_text="$FEDEMBED_HOME/cache, the sites' cache")
    _add_on_bad_row(group)


def _add_cache_dir(group: Any, *, default_text: str) -> None:
    group.add_argument(
        "--cache-dir",
        default=None,
        type=user_path,
        help=f"embedding cache directory (default: {default_text})",
    )


def _add_on_bad_row(group: Any) -> None:
    group.add_argument(
        "--on-bad-row",
        choices=["raise", "skip"],
        default=DataSpec().on_bad_row,
        help="a manifest row that cannot be used (missing/empty/non-UTF-8 field, duplicate id, "
        "missing or unreadable image, unknown label): stop with an error naming file, line and "
        "field (raise), or leave it out and report it (skip) (default: %(default)s)",
    )


def _test_fraction(text: str) -> float:
    """``--test-fraction``: a number in [0, 1), else a one-line ConfigError."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"--test-fraction {text}: must be a number in [0, 1) (0: hold nothing out)"
        )
    return value


def _cache_dir(args: argparse.Namespace) -> Path:
    """The cache the user named, else the one every site and command shares ($FEDEMBED_HOME/cache)."""
    from common.config import resolve_path

    return Path(args.cache_dir) if args.cache_dir else resolve_path("", "cache")


def _data_spec(args: argparse.Namespace) -> Any:
    return DataSpec(
        dataset=args.data,
        n=args.n,
        seed=args.seed,
        site=args.site,
        task=args.task,
        image_encoder=args.image_encoder,
        text_encoder=args.text_encoder,
        encoder_image_size=args.encoder_image_size,
        encoder_precision=args.encoder_precision,
        encoder_device=args.encoder_device,
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
    if embedded.class_names:
        print(f"  {'classes':8s} {len(embedded.class_names)}, {_class_origin(embedded, args.data)}")
    for line in report.summary():
        print(line)
    return 0


def _class_origin(data: EmbeddedDataset, source: str) -> str:
    """Where the classes come from, and what undeclared ones rule out."""
    if data.classes_declared:
        return "declared"
    return (
        f"read from the labels: declare them in {source}.classes.json "
        "(needed for sample-level DP; the same list at every site)"
    )


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
    held_out = _held_out_text(site.train, site.test, spec)
    print(f"held-out split: {held_out}")
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
    ran = result.epochs_run or args.epochs
    epochs = (
        f"{ran} epochs" if ran == args.epochs else f"{ran} of {args.epochs} epochs (early stop)"
    )
    print(
        f"trained {epochs} on {result.num_examples} examples: loss {result.loss:.4f} "
        f"({result.seconds:.1f} s)"
    )
    metadata: dict[str, Any] = {
        "data": spec.to_dict(),
        "train": config.to_dict(),
        "head_preset": args.head,
        "encoders": site.encoders,
    }
    if not len(site.test):
        out = save_head(args.out, model, metadata=metadata)
        print(f"head saved to {out}")
        print(f"no held-out rows: score with `fedembed evaluate --head {out} --data TEST.csv`")
        return 0
    report = evaluate_head(model, site.train, site.test, seed=args.train_seed)
    report.scored = f"{spec.dataset}, {held_out}"
    report.fitted_on = f"{spec.dataset}, its training split ({len(site.train)} rows)"
    out = save_head(args.out, model, metadata={**metadata, "metrics": report.to_dict()})
    print(report.table())
    print(f"head saved to {out} ({', '.join(f'{k}={v:.3f}' for k, v in headline(report).items())})")
    return 0


def _held_out_text(train: EmbeddedDataset, test: EmbeddedDataset, spec: DataSpec) -> str:
    """Which rows a site's held-out split holds: those its manifest marks test, a random share, or none."""
    if not len(test):
        return f"none (test-fraction 0): all {len(train)} rows train"
    if spec.test_rows == "holdout" and len(test.marked_test_rows()) == len(test):
        return (
            f"the {len(test)} rows marked test in its split column ({len(train)} rows train; "
            "test-fraction not used)"
        )
    return (
        f"{len(test)} rows held out at random (test-fraction {spec.test_fraction:g}, stratified, "
        f"split seed {spec.split_seed}; {len(train)} rows train)"
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a saved head, frozen vs projected: on its own held-out split, or on every row of --data."""
    from common.artifacts import load_head, recorded_data_spec
    from common.evaluation import evaluate_head

    if args.train_data and not args.data:
        raise ConfigError(
            "--train-data needs --data: without --data the head is scored on its own held-out "
            "split and the baselines are fitted on its own training split"
        )
    model, config = load_head(args.head)
    spec = recorded_data_spec(config, source=args.head)
    if args.data:
        evaluation = _evaluation_on(args, model, spec)
    else:
        evaluation = _evaluation_held_out(args, spec)
    classifiers = args.classifiers.split(",") if args.classifiers else None
    report = evaluate_head(model, evaluation.train, evaluation.test, classifiers=classifiers)
    report.scored, report.fitted_on = evaluation.scored, evaluation.fitted_on
    print(report.table())
    if args.json:
        from common.atomic import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
        print(f"metrics written to {args.json}")
    return 0


class _Evaluation(NamedTuple):
    """The rows a head is scored on and those its baselines are fitted on (None: left out)."""

    test: EmbeddedDataset
    train: EmbeddedDataset | None
    scored: str
    fitted_on: str


def _evaluation_held_out(args: argparse.Namespace, spec: DataSpec) -> _Evaluation:
    """The head's own data, split as it was when the head was trained."""
    from common.pipeline import prepare_site_data

    site = prepare_site_data(spec, cache_dir=_cache_dir(args), progress=True)
    if not len(site.test):
        raise ConfigError(
            f"{args.head}: no held-out rows (the head was trained on every row of {spec.dataset}); "
            "score it with --data TEST.csv"
        )
    return _Evaluation(
        site.test,
        site.train,
        f"{spec.dataset}, the head's held-out split: {_held_out_text(site.train, site.test, spec)}",
        f"{spec.dataset}, the head's training split ({len(site.train)} rows)",
    )


def _evaluation_on(args: argparse.Namespace, model: HeadModel, spec: DataSpec) -> _Evaluation:
    """Every row of --data (or those its split column marks test); baselines fitted on
    --train-data, else the head's own training split when this machine has that data."""
    import numpy as np

    from common.pipeline import prepare_site_data

    dims = dict(model.describe()["head"]["dims"])
    embedded = _embed_for_head(args, args.data, spec, dims)
    marked = embedded.marked_test_rows()
    if marked.size:
        test = embedded.subset(marked)
        scored = (
            f"{args.data}, the {marked.size} rows marked test in its split column "
            f"({len(embedded) - marked.size} other rows not scored)"
        )
    else:
        test, scored = embedded, f"{args.data}, every row ({len(embedded)})"
    own_rows = dataset_key(args.data) == dataset_key(spec.dataset) and not marked.size
    if own_rows:
        print(
            f"note: {args.data} is the data this head was trained on, so the scored rows include "
            "its training rows; without --data, evaluate scores its held-out split"
        )
    train: EmbeddedDataset | None = None
    if args.train_data:
        if args.train_data == args.data and not marked.size:
            raise ConfigError(
                f"--train-data {args.train_data} is the file being scored and marks no rows test "
                "in a split column: the baselines would be fitted on the rows they are scored on"
            )
        rows = _embed_for_head(args, args.train_data, spec, dims)
        unmarked = np.setdiff1d(np.arange(len(rows)), rows.marked_test_rows())
        train = rows.subset(unmarked)
        which = "rows not marked test" if len(unmarked) < len(rows) else "rows"
        fitted_on = f"{args.train_data} (--train-data), {len(train)} {which}"
    elif own_rows:
        fitted_on = (
            "left out: the head's training rows are among the scored rows; name other "
            "training data with --train-data"
        )
    elif _on_this_machine(spec.dataset):
        site = prepare_site_data(spec, cache_dir=_cache_dir(args), progress=True)
        _check_dims(site.train, dims, dataset=spec.dataset, head=args.head)
        train = site.train
        fitted_on = f"{spec.dataset}, the head's training split ({len(train)} rows)"
    else:
        fitted_on = (
            f"left out: the head's training data ({spec.dataset}) is not on this machine; "
            "name training data with --train-data"
        )
    if train is not None and not len(train):
        raise ConfigError(f"{fitted_on}: no rows to fit the baselines on")
    return _Evaluation(test, _same_classes(train, test), scored, fitted_on)


def _embed_for_head(
    args: argparse.Namespace, dataset: str, spec: DataSpec, dims: dict[str, int]
) -> EmbeddedDataset:
    """Every row of ``dataset`` embedded with the head's recorded encoders (only the modalities
    the head takes); a dataset the head cannot take is a ConfigError naming it."""
    from common.data.registry import BUILTIN_DATASETS
    from common.pipeline import DataSpec, embed_site

    own = dataset_key(dataset) == dataset_key(spec.dataset)
    base = spec if own else DataSpec()  # a built-in keeps the head's generation settings
    data_spec = DataSpec(
        dataset=dataset,
        n=base.n if dataset in BUILTIN_DATASETS else None,
        seed=base.seed,
        site=base.site,
        task=base.task,
        image_size=base.image_size,
        image_encoder=spec.image_encoder if "image" in dims else "none",
        text_encoder=spec.text_encoder if "text" in dims else "none",
        encoder_image_size=spec.encoder_image_size,
        encoder_precision=spec.encoder_precision,
        encoder_device=spec.encoder_device,
        max_length=spec.max_length,
        on_bad_row=args.on_bad_row,
    )
    embedded, report, _ = embed_site(data_spec, cache_dir=_cache_dir(args), progress=True)
    for line in report.summary():
        print(line)
    _check_dims(embedded, dims, dataset=dataset, head=args.head)
    return embedded


def _check_dims(data: EmbeddedDataset, dims: dict[str, int], *, dataset: str, head: str) -> None:
    """ConfigError unless ``data`` has exactly the modalities and dimensions the head takes."""
    if data.dims != dims:
        found = ", ".join(f"{m} {d}-d" for m, d in data.dims.items()) or "no embeddings"
        wanted = ", ".join(f"{m} {d}-d" for m, d in dims.items())
        raise ConfigError(
            f"{dataset}: gives {found} with the head's encoders; the head {head} takes {wanted}"
        )


def _same_classes(train: EmbeddedDataset | None, test: EmbeddedDataset) -> EmbeddedDataset | None:
    """``train`` with its labels renumbered to ``test``'s classes (by name; classes only ``train``
    has come after them), so probes fitted on one file are scored on another's labels."""
    if train is None or train.labels is None or train.class_names == test.class_names:
        return train
    from dataclasses import replace

    import numpy as np

    names = list(test.class_names)
    names += [c for c in train.class_names if c not in names]
    index = np.array([names.index(c) for c in train.class_names], dtype=np.int64)
    labels = np.where(train.labels >= 0, index[np.maximum(train.labels, 0)], -1)
    return replace(  # a merged list: no one declared it
        train, labels=labels, class_names=names, prompts=None, classes_declared=False
    )


def _on_this_machine(dataset: str) -> bool:
    """Whether this machine can rebuild a head's training data: a built-in, or a manifest here."""
    from common.data.registry import BUILTIN_DATASETS

    return dataset in BUILTIN_DATASETS or Path(dataset).is_file()
