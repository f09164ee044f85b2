"""What a run's configuration must satisfy before round 1, checked by the CLI and by the coordinator.

The CLI (simulations/flower/federate.py) runs these checks before it starts any Flower process, the
coordinator (server/app.py) before it sends the first round; both fail with one ConfigError line.
Checks that need the sites' own settings (their data, their dp-* budget) stay with the sites.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import RunSettings, SiteSettings
from common.data.manifest_classes import declared_classes
from common.data.partition import PARTITION_SCHEMES
from common.data.registry import BUILTIN_DATASETS
from common.errors import ConfigError, PrivacyError
from common.privacy import PrivacySettings, require_sample_level_dp

_SHOWN = 6  # site names a message lists


def check_run(values: Mapping[str, Any], *, sites: int | None = None) -> RunSettings:
    """The run's settings once every check passes (else ConfigError).

    ``sites``: the number of sites that take a partition of the run's dataset (simulate and
    deploy-local know it); None on the coordinator, which only knows ``min-sites``, a lower bound.
    """
    run = check_run_config(values)
    check_partition(run, sites=run.min_sites if sites is None else sites, exact=sites is not None)
    if PrivacySettings.merge(values, {}).requested:
        check_declared_classes(run)
    return run


def check_declared_classes(run: RunSettings) -> None:
    """Refuse sample-level DP at every site on a labelled manifest the caller can read that
    declares no classes: each site would refuse it (client/privacy/dp_sgd.py
    ``require_public_classes``), as its classes would be read from its own labels. A declared
    manifest is settled by its sidecar alone; only an undeclared one has its rows read."""
    if run.dataset in BUILTIN_DATASETS or not Path(run.dataset).is_file():
        return
    if declared_classes(Path(run.dataset), None, None)[0] is not None:  # the sidecar alone
        return
    from common.pipeline import load_pooled_dataset

    if load_pooled_dataset(SiteSettings().data_spec(run)).class_names:  # labelled: read rows
        raise ConfigError(
            f"run-config: sample-level DP needs the classes declared, but {run.dataset} has none "
            f"(each site would read them from its labels): add {run.dataset}.classes.json "
            '({"classes": [...], "prompts": [...]}) at every site'
        )


def check_run_config(values: Mapping[str, Any]) -> RunSettings:
    """Keys, names and values of a run-config, and its dp-* keys against the loss (no data read).

    Unknown keys and names, out-of-range values: RunSettings and PrivacySettings. Sample-level DP
    (DP-SGD at every site) with a loss that is not per-example decomposable: refused, as every
    site would refuse it (common/privacy.py ``require_sample_level_dp``).
    """
    run = RunSettings.from_run_config(values)
    privacy = PrivacySettings.merge(values, {})
    if run.partition != "none" and run.partition not in PARTITION_SCHEMES:
        raise ConfigError(
            f"run-config: partition '{run.partition}' is not one of none, "
            f"{', '.join(PARTITION_SCHEMES)}"
        )
    if privacy.requested:
        try:
            require_sample_level_dp(run.loss)
        except PrivacyError as exc:
            keys = ", ".join(f"{k} = {v}" for k, v in privacy.request_keys().items())
            raise ConfigError(
                f"run-config: {keys} turns on sample-level DP at every site: {exc}"
            ) from None
    return run


def check_partition(run: RunSettings, *, sites: int, exact: bool = True) -> None:
    """Refuse a partition of the run's dataset that cannot give each of ``sites`` sites data.

    ``exact``: ``sites`` sites take a partition each. Otherwise ``sites`` is a lower bound and only
    what holds for any larger number is checked (the "site" column has at least that many values,
    an "iid" or "quantity" split leaves no site empty, a "dirichlet" split has labels). Nothing is
    checked for a dataset the caller cannot read: its sites then bring their own data.
    """
    if sites < 2 or run.partition == "none":
        return
    if run.dataset not in BUILTIN_DATASETS and not Path(run.dataset).is_file():
        return
    from common.pipeline import load_pooled_dataset, site_rows  # imports the encoders' libraries

    spec = SiteSettings(partition_id=0, num_partitions=sites).data_spec(run)
    pool = load_pooled_dataset(spec)
    where = f"run-config: partition '{run.partition}' of {run.dataset}"
    count = f"{sites} sites" if exact else f"min-sites = {sites}"
    if run.partition == "site":
        if pool.sites is None:
            raise ConfigError(f"{where}: the dataset has no site column")
        found = sorted({str(s) for s in pool.sites})
        if (len(found) != sites) if exact else (len(found) < sites):
            shown = ", ".join(found[:_SHOWN]) + (", ..." if len(found) > _SHOWN else "")
            raise ConfigError(
                f"{where}: its site column has {len(found)} distinct values ({shown}), "
                f"but the run has {count}: each site takes one value's rows"
            )
        return
    if run.partition == "dirichlet" and pool.labels is None:
        raise ConfigError(f"{where}: the dataset has no labels to skew")
    if run.partition == "dirichlet" and not exact:
        return  # its draw depends on the actual number of sites
    sizes = []
    for partition_id in range(sites):
        try:
            with warnings.catch_warnings():  # flwr-datasets warns on each retried Dirichlet draw
                warnings.simplefilter("ignore", UserWarning)
                rows = site_rows(pool, replace(spec, partition_id=partition_id))
        except (ValueError, IndexError) as exc:  # flwr-datasets: a split it cannot make
            raise ConfigError(
                f"{where}: {len(pool)} rows cannot be split over {count} ({exc})"
            ) from None
        sizes.append(len(rows))
    empty = [i for i, size in enumerate(sizes) if size == 0]
    if empty:
        raise ConfigError(
            f"{where}: {len(pool)} rows over {count} leave partition(s) "
            f"{', '.join(map(str, empty[:_SHOWN]))} without data (sizes {sizes[:_SHOWN]})"
        )
