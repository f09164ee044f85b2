"""What `fedembed compare` will do: the user's data, options and encoders checked before anything loads."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.config import RunSettings, SiteSettings, resolve_path
from common.data.dataset import SPLITS, SiteDataset
from common.data.manifest import DEFAULT_COLUMNS, default_prompt, read_manifest
from common.errors import ConfigError, DataError
from simulations.cli.paths import run_config_paths, user_path

if TYPE_CHECKING:  # these import torch: only once the checks have passed
    pass

SCHEMES = ("site", "iid", "dirichlet")
DEFAULT_OUT = "runs/compare"
# Run-config keys the command sets itself, and the option (or reason) that sets each.
OWN_KEYS = {
    "dataset": "--data",
    "dataset-n": "--data (every row of a manifest is used)",
    "partition": "--partition",
    "alpha": "--alpha",
    "min-sites": "--sites",
    "seed": "--seed",
    "num-server-rounds": "--rounds",
    "local-epochs": "--local-epochs",
    "loss": "--loss",
    "image-encoder": "--image-encoder",
    "text-encoder": "--text-encoder",
    "test-rows": "--test-data or the manifest's split column",
    "run-dir": "--out",
}
# Privacy arms are the experiment's (python -m simulations.experiments.comparison_runs), with their own rows.
DP_PREFIXES = ("dp-", "client-dp")
# The loss for labelled data with one modality (the IU X-ray text experiment's first choice).
SINGLE_MODALITY_LOSS = "supcon"
TEST = SPLITS[1]


@dataclass
class SitePlan:
    """One simulated site as its ClientApp will build it: its rows, before any embedding.

    ``names``: the site column's values among its rows; ``test_rows``: positions of its own rows
    in the common test set (empty without one, or when its rows are not the site's).
    """

    index: int
    names: list[str]
    train: int
    validation: int
    test: int
    test_rows: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        shown = ", ".join(self.names[:3]) + (", ..." if len(self.names) > 3 else "")
        return f"site {self.index}" + (f" ({shown})" if shown else "")

    def describe(self) -> str:
        test = f", {self.test} test" if self.test else ""
        return f"  {self.label}: {self.train} rows train, {self.validation} validation{test}"


@dataclass
class Plan:
    """Everything `fedembed compare` will do, checked before any encoder or Flower process starts."""

    data: Path
    test_data: Path | None
    out: Path
    cache_dir: Path
    run: RunSettings
    dataset: SiteDataset
    marked: list[int]
    sites: list[SitePlan]
    loss_reason: str
    modalities: tuple[str, ...]
    test_rows: int
    federated: bool = True
    echo: bool = False

    @property
    def common(self) -> bool:
        """Whether every arm is scored on one common test set (marked rows or --test-data)."""
        return bool(self.marked) or self.test_data is not None

    def test_set(self) -> str:
        """Which rows score every arm, in one sentence."""
        held_out = f"{SiteSettings().test_fraction:.0%} of each site's"
        if self.test_data is not None:
            source = f"every row of {self.test_data} ({self.test_rows} rows)"
        elif self.marked:
            source = (
                f"the {self.test_rows} rows of {self.data.name} marked "
                f"{DEFAULT_COLUMNS['split']}={TEST}, pooled over the sites"
            )
        else:
            return (
                f"test set: no row of {self.data.name} is marked {DEFAULT_COLUMNS['split']}={TEST}: "
                f"{held_out} rows are held out and halved, one half picks each arm's stopping "
                f"point (validation), the pooled other halves ({self.test_rows} rows) score it."
            )
        return (
            f"test set: {source}; no site trains or stops on them. Every arm stops on the "
            f"validation rows ({held_out} other rows)."
        )

    def describe(self) -> list[str]:
        run = self.run
        scheme = {
            "site": f"one site per value of its {DEFAULT_COLUMNS['site']!r} column",
            "iid": "rows split at random (iid)",
            "dirichlet": f"label skew, Dirichlet alpha {run.alpha:g}",
        }[run.partition]
        encoders = [
            f"{m} {run.image_encoder if m == 'image' else run.text_encoder}"
            for m in self.modalities
        ]
        return [
            f"fedembed compare: {self.data} ({len(self.dataset)} rows; "
            f"{len(self.dataset.class_names)} classes) over {len(self.sites)} sites: {scheme}",
            *(s.describe() for s in self.sites),
            f"  frozen encoders: {', '.join(encoders)}; head trained with loss {run.loss} "
            f"({self.loss_reason}), {run.num_server_rounds} rounds x {run.local_epochs} local "
            f"epochs (seed {run.seed})",
            f"  {self.test_set()}",
        ]


# ----------------------------------------------------------------------------- checks


def plan_comparison(args: argparse.Namespace) -> Plan:
    """The comparison ``args`` ask for, or the first problem as a one-line FedEmbedError."""
    from simulations.experiments.demo import TRAINING
    from simulations.flower.run_config import parse_run_config

    data = _manifest_path(args.data, "--data")
    test_data = None if args.test_data is None else _manifest_path(args.test_data, "--test-data")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    extra = run_config_paths(parse_run_config(args.run_config), option="--run-config")
    for key in extra:
        name = key.replace("_", "-")
        if name in OWN_KEYS:
            raise ConfigError(f"--run-config {key}: set by {OWN_KEYS[name]}")
        if name.startswith(DP_PREFIXES):
            raise ConfigError(
                f"--run-config {key}: the DP arms are python -m simulations.experiments.comparison_runs's "
                "(each with its own row and epsilon); fedembed compare runs without DP"
            )
    if args.local_epochs < 1:
        raise ConfigError(f"--local-epochs {args.local_epochs}: must be >= 1")
    if args.partition == "dirichlet" and not args.alpha > 0:
        raise ConfigError(f"--alpha {args.alpha}: must be > 0")
    dataset = read_manifest(data).dataset
    modalities = _modalities(dataset, args, data)
    for modality in modalities:
        _check_encoder(getattr(args, f"{modality}_encoder"), f"--{modality}-encoder")
    sites = _site_count(dataset, args, data)
    loss, loss_reason = _loss(args.loss, dataset, modalities, data)
    if args.partition == "dirichlet" and not _labelled(dataset):
        raise DataError(f"{data}: --partition dirichlet skews labels, but it has no labelled row")
    marked = [i for i, split in enumerate(dataset.splits or ()) if split == TEST]
    if marked and test_data is not None:
        raise ConfigError(
            f"{data} marks {len(marked)} rows {DEFAULT_COLUMNS['split']}={TEST} and --test-data "
            "names another test set: use one (drop --test-data, or those marks)"
        )
    run = RunSettings.from_run_config(
        {
            **TRAINING,
            **extra,
            "dataset": str(data),
            "partition": args.partition,
            "alpha": args.alpha,
            "min-sites": sites,
            "seed": args.seed,
            "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "loss": loss,
            "image-encoder": args.image_encoder,
            "text-encoder": args.text_encoder,
            **({"test-rows": "exclude"} if marked or test_data is not None else {}),
        }
    )
    test_dataset = None
    if test_data is not None:
        test_dataset = _read_test_data(test_data, dataset, args, data=data)
    plans = _site_plans(dataset, run, sites, marked=marked, test_dataset=test_dataset, data=data)
    if marked:
        test_rows = len(marked)
    elif test_dataset is not None:
        test_rows = len(test_dataset)
    else:
        test_rows = sum(p.test for p in plans)
        if not test_rows:
            raise DataError(f"{data}: the sites' held-out rows leave no test rows; mark some test")
    return Plan(
        data=data,
        test_data=test_data,
        out=out,
        cache_dir=Path(args.cache_dir) if args.cache_dir else resolve_path("", "cache"),
        run=run,
        dataset=dataset,
        marked=marked,
        sites=plans,
        loss_reason=loss_reason,
        modalities=modalities,
        test_rows=test_rows,
        federated=not args.no_federated,
        echo=args.verbose_flower,
    )


def _manifest_path(value: str, option: str) -> Path:
    """The manifest file ``value`` names (already absolute: the option's argparse type)."""
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{option} {value}: no such manifest file (a .csv or .jsonl path)")
    return path


def _modalities(dataset: SiteDataset, args: argparse.Namespace, data: Path) -> tuple[str, ...]:
    """The modalities of ``dataset`` that an encoder will embed."""
    from common.pipeline import _enabled

    encoders = {"image": args.image_encoder, "text": args.text_encoder}
    used = tuple(m for m in dataset.modalities if _enabled(encoders[m]))
    if not used:
        raise ConfigError(
            f"{data}: has {' and '.join(dataset.modalities)}, but --image-encoder "
            f"{args.image_encoder} / --text-encoder {args.text_encoder} embed neither"
        )
    return used


def _check_encoder(value: str, option: str) -> None:
    """Refuse an encoder that is no packaged name, no directory and, offline, in no local cache."""
    import os

    from common.encoders import PACKAGED_ENCODERS

    if value.strip().lower() in PACKAGED_ENCODERS or Path(value).expanduser().is_dir():
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return  # Hugging Face may still provide it
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(value, "config.json"), str)
    except HFValidationError:
        cached = False
    if not cached:
        raise ConfigError(
            f"{option} {value}: no model directory {user_path(value)}, no packaged encoder "
            "of that name, and no Hugging Face model of that id in the local cache (offline)"
        )


def _site_count(dataset: SiteDataset, args: argparse.Namespace, data: Path) -> int:
    column = DEFAULT_COLUMNS["site"]
    found = list(dict.fromkeys(dataset.sites or ()))
    shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
    if args.partition == "site":
        if dataset.sites is None:
            raise DataError(
                f"{data}: no {column!r} column (the hospital of each row), which --partition "
                "site needs; or split it with --partition iid --sites N"
            )
        if args.sites is not None and args.sites != len(found):
            raise ConfigError(
                f"--sites {args.sites}: {data} has {len(found)} sites in its {column!r} "
                f"column ({shown})"
            )
        sites = len(found)
    elif args.sites is not None:
        sites = args.sites
    elif dataset.sites is not None:
        sites = len(found)  # as many simulated sites as real ones
    else:
        raise ConfigError(
            f"--partition {args.partition} needs --sites N ({data} has no site column)"
        )
    if sites < 2:
        where = f"{data} has one site in its {column!r} column ({shown})" if found else "--sites"
        raise ConfigError(f"{where}: a comparison needs at least 2 sites")
    return sites


def _labelled(dataset: SiteDataset) -> bool:
    return dataset.labels is not None and bool((dataset.labels >= 0).any())


def _loss(
    chosen: str | None, dataset: SiteDataset, modalities: Sequence[str], data: Path
) -> tuple[str, str]:
    """The loss to train with and why: ``chosen``, else the demo's where the data allow it."""
    from common.losses import NEEDS_LABELS
    from common.registries import loss_info
    from simulations.experiments.demo import TRAINING

    paired = set(modalities) == {"image", "text"}
    labelled = _labelled(dataset)
    only = f"only {modalities[0]}s" if not paired else ""
    if chosen is None:
        if paired and labelled:
            return str(TRAINING["loss"]), "the demo's: labelled image-text pairs"
        if paired:
            return RunSettings().loss, "image-text pairs without labels"
        if labelled:
            return SINGLE_MODALITY_LOSS, f"labelled data with {only}"
        raise DataError(
            f"{data}: {only} and no labels: nothing to train a head on "
            "(give image and text columns, or a label column)"
        )
    if chosen.startswith("infonce") and not paired:
        raise ConfigError(f"--loss {chosen}: needs image-text pairs; {data} gives {only}")
    if chosen in NEEDS_LABELS and not labelled:
        raise ConfigError(f"--loss {chosen}: needs labels; {data} has no labelled row")
    least = loss_info(chosen).min_classes
    if labelled and len(dataset.class_names) < least:
        raise ConfigError(
            f"--loss {chosen}: needs at least {least} classes; {data} has {len(dataset.class_names)}"
        )
    return chosen, "--loss"


def _read_test_data(
    path: Path, train: SiteDataset, args: argparse.Namespace, *, data: Path
) -> SiteDataset:
    """``path``'s rows with ``train``'s classes, once its modalities and labels match ``train``'s."""
    own = read_manifest(path).dataset
    mine, theirs = _modalities(own, args, path), _modalities(train, args, data)
    if mine != theirs:
        raise DataError(
            f"{path}: has {' and '.join(mine)}, {data} has {' and '.join(theirs)}: "
            "the test set needs the same inputs"
        )
    if (own.labels is None) != (train.labels is None):
        which = (path, data) if own.labels is None else (data, path)
        raise DataError(
            f"{which[0]}: no {DEFAULT_COLUMNS['label']!r} column, but {which[1]} has one"
        )
    if train.labels is None or (own.class_names, own.prompts) == (
        train.class_names,
        train.prompts,
    ):
        return own
    assert own.labels is not None
    used = sorted({own.class_names[i] for i in own.labels if i >= 0})
    if own.class_names != used or own.prompts != [default_prompt(c) for c in used]:
        raise DataError(
            f"{path}: declares classes {own.class_names} (and their prompts), {data} "
            f"{train.class_names}: give both the same classes sidecar, or the test file none"
        )
    # No declaration of its own: its labels must be classes of --data (else file, line, field).
    test = read_manifest(path, classes=train.class_names, prompts=train.prompts).dataset
    test.classes_declared = train.classes_declared  # --data's classes, declared or read
    return test


def _site_plans(
    dataset: SiteDataset,
    run: RunSettings,
    sites: int,
    *,
    marked: Sequence[int],
    test_dataset: SiteDataset | None,
    data: Path,
) -> list[SitePlan]:
    """Each site's rows as its ClientApp splits them (common.pipeline.prepare_site_data), checked."""
    from common.data.partition import split_indices
    from common.pipeline import site_rows
    from simulations.experiments.arms import VALIDATION_SEED

    position = {row: i for i, row in enumerate(marked)}
    common = bool(marked) or test_dataset is not None
    held_out = f"{SiteSettings().test_fraction:.0%}"
    plans = []
    for i in range(sites):
        spec = SiteSettings(partition_id=i, num_partitions=sites).data_spec(run)
        try:
            rows = site_rows(dataset, spec)
        except (ValueError, IndexError) as exc:  # flwr-datasets: a split it cannot make
            raise ConfigError(
                f"{data}: --partition {run.partition} cannot split {len(dataset)} rows over "
                f"{sites} sites ({exc})"
            ) from None
        names = list(dict.fromkeys(dataset.sites[r] for r in rows)) if dataset.sites else []
        plan = SitePlan(index=i, names=names, train=0, validation=0, test=0)
        own_marked = [int(r) for r in rows if int(r) in position]
        rest = np.array([r for r in rows if int(r) not in position], dtype=np.int64)
        where = f"{data}: {plan.label} ({len(rows)} rows)"
        if not rest.size:
            raise DataError(f"{where} has no row to train on: all are marked {TEST}")
        labels = None if dataset.labels is None else dataset.labels[rest]
        train, holdout = split_indices(
            len(rest), labels, test_fraction=spec.test_fraction, seed=spec.split_seed
        )
        plan.train = len(train)
        if common:
            plan.validation = len(holdout)
            plan.test_rows = [position[r] for r in own_marked]
            if test_dataset is not None and run.partition == "site" and test_dataset.sites:
                plan.test_rows = [j for j, s in enumerate(test_dataset.sites) if s in names]
            plan.test = len(plan.test_rows)
        elif len(holdout):  # arms.split_holdout halves the held-out rows: (test, validation)
            held_labels = None if labels is None else labels[holdout]
            test, validation = split_indices(
                len(holdout), held_labels, test_fraction=0.5, seed=VALIDATION_SEED
            )
            plan.validation, plan.test = len(validation), len(test)
        if not plan.train:
            raise DataError(f"{where} leaves no row to train on once {held_out} is held out")
        if not plan.validation:
            rule = (
                f"each site holds out {held_out} of its other rows, per class: a class needs "
                "3 rows at a site to have one held out"
                if common
                else f"each site holds out {held_out} of its rows, per class, and halves them "
                "into validation and test: a class needs 2 held-out rows at a site to give "
                f"validation one; or mark test rows in a {DEFAULT_COLUMNS['split']!r} column"
            )
            raise DataError(f"{where} leaves no validation row to stop training on ({rule})")
        plans.append(plan)
    return plans
