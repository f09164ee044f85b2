"""Split one pooled dataset across simulated sites with flwr-datasets' partitioners."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from common.data.dataset import SiteDataset
from common.errors import ConfigError

PARTITION_SCHEMES: dict[str, str] = {
    "iid": "uniformly at random (IidPartitioner)",
    "dirichlet": "label skew: class proportions per site ~ Dirichlet(alpha) (DirichletPartitioner)",
    "quantity": "quantity skew: site sizes grow linearly with the site index (LinearPartitioner)",
    "site": "natural: one partition per value of the dataset's site column (NaturalIdPartitioner)",
}


def concat_datasets(parts: Sequence[SiteDataset], *, name: str | None = None) -> SiteDataset:
    """One dataset holding every example of ``parts`` (same classes required)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    for part in parts[1:]:
        if part.class_names != first.class_names:
            raise ConfigError(f"cannot pool {part.name}: its classes differ from {first.name}'s")

    def joined(attr: str) -> list[Any] | None:
        values = [getattr(p, attr) for p in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate([np.asarray(p.labels) for p in parts])
    return SiteDataset(
        name=name or first.name,
        ids=[i for p in parts for i in p.ids],
        texts=joined("texts"),
        images=joined("images"),
        labels=labels,
        class_names=list(first.class_names),
        prompts=list(first.prompts),
        classes_declared=all(p.classes_declared for p in parts),
        sites=joined("sites"),
        splits=joined("splits"),
    )


def partition_indices(
    dataset: SiteDataset,
    *,
    scheme: str,
    num_partitions: int,
    partition_id: int,
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Row indices of partition ``partition_id`` of ``num_partitions`` under ``scheme``."""
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}; choose from {sorted(PARTITION_SCHEMES)}"
        )
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    from datasets import Dataset, disable_progress_bars  # flwr-datasets partitions HF datasets

    fp = _partitioners()

    columns: dict[str, list[Any]] = {"row": list(range(len(dataset)))}
    if scheme == "dirichlet":
        if dataset.labels is None:
            raise ConfigError("the dirichlet partition needs labels, but the dataset has none")
        columns["label"] = [int(x) for x in dataset.labels]
    if scheme == "site":
        if dataset.sites is None:
            raise ConfigError(f"{dataset.name} has no site column for a natural partition")
        columns["site"] = list(dataset.sites)
    part: Any
    if scheme == "iid":
        part = fp.IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        part = fp.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=max(2, min(10, len(dataset) // (4 * num_partitions))),
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    elif scheme == "quantity":
        part = fp.LinearPartitioner(num_partitions=num_partitions)
    else:
        part = fp.NaturalIdPartitioner(partition_by="site")
    disable_progress_bars()
    table = Dataset.from_dict(columns)
    if scheme in ("iid", "quantity"):  # these partitioners cut contiguous shards: shuffle first
        table = table.shuffle(seed=seed)
    part.dataset = table
    if scheme == "site" and part.num_partitions != num_partitions:
        raise ConfigError(
            f"{dataset.name} has {part.num_partitions} sites in its site column, not {num_partitions}"
        )
    with _quiet_progress():
        rows = np.asarray(part.load_partition(partition_id)["row"], dtype=np.int64)
    return np.sort(rows)


def split_indices(
    n: int, labels: np.ndarray | None, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test indices, stratified by label when every class has >= 2 examples.

    ``test_fraction`` 0 holds nothing out.
    """
    rng = np.random.default_rng(seed)
    if test_fraction <= 0.0 or n == 0:
        return np.arange(n), np.arange(0)
    if labels is not None and labels.size == n:
        train_parts, test_parts = [], []
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            n_test = round(len(members) * test_fraction) if len(members) >= 2 else 0
            test_parts.append(members[:n_test])
            train_parts.append(members[n_test:])
        return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))
    order = rng.permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _partitioners() -> ModuleType:
    """``flwr_datasets.partitioner``, imported without flwr-datasets' plotting helpers.

    ``flwr_datasets/__init__`` imports its ``visualization`` subpackage (seaborn, scipy.stats,
    matplotlib.pyplot: about 1.2 s of CPU in every site process that partitions), which
    partitioning never uses. While the package is first imported, an empty module stands in for
    that subpackage; it is removed again at once, so a later ``import flwr_datasets.visualization``
    loads the real one.
    """
    name = "flwr_datasets.visualization"
    if "flwr_datasets" in sys.modules or name in sys.modules:
        return importlib.import_module("flwr_datasets.partitioner")
    sys.modules[name] = ModuleType(name)
    try:
        return importlib.import_module("flwr_datasets.partitioner")
    finally:
        del sys.modules[name]
        package = sys.modules.get("flwr_datasets")
        if package is not None and "visualization" in vars(package):
            delattr(package, "visualization")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Partitioning a few thousand rows is instant: hide the libraries' progress bars (stderr)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
