"""Split one pooled dataset across simulated sites with flwr-datasets' partitioners."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
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
    from flwr_datasets import partitioner as fp

    columns: dict[str, list[Any]] = {"row": list(range(len(dataset)))}
    if scheme == "dirichlet":
        if dataset.labels is None:
            raise ConfigError("the dirichlet partition needs labels, but the dataset has none")
        columns["label"] = [int(x) for x in dataset.labels]
    if scheme == "site":
        if dataset.sites is None:
            raise ConfigError(f"{dataset.name} has no site column for a natural partition")
        columns["site"] = list(dataset.sites)
    part: fp.Partitioner
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


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Partitioning a few thousand rows is instant: hide the libraries' progress bars (stderr)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
