"""Should we federate? Frozen vs each site alone vs centralized vs federated (with and without DP), same splits, same evaluation."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSettings
from common.errors import ConfigError
from common.metrics import (
    format_table,
)
from common.preflight import check_declared_classes
from common.training import HeadModel
from simulations.experiments.arms import (
    HEADLINE,
    PRIVACY_COLUMNS,
    SAMPLE_DP_LOSS,
    CommonTest,
    concat_embedded,
    federated_selected,
    frozen_row,
    metric_row,
    partition_label,
    prepare_sites,
    ridge_selection,
    round_rows,
    run_config_of,
    split_holdout,
    train_selected,
)

# The metric a figure shows: the first of these the rows have (paired data: retrieval).
PRIMARY = ("mean_R@5", "probe_f1_macro", "zs_acc")
# Datasets whose coordinator-held evaluation set (another seed of the generator) shares no example
# with the sites' data; for the others the round curves come from the sites' own held-out splits.
DISJOINT_SERVER_EVAL = ("synthetic-radiology",)


@dataclass(frozen=True)
class PrivacyArms:
    """Stated parameters of the two DP arms.

    Sample-level (DP-SGD at every site, Opacus): each site calibrates its noise so the whole run
    costs at most ``target_epsilon`` at ``delta`` for any one of its examples. Client-level
    (Flower's fixed clipping + Gaussian noise on the mean update): ``noise_multiplier`` and
    ``clipping_norm`` fixed; the epsilon that protects a whole site follows from them.
    """

    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    client_mode: str = "client-side"
    noise_multiplier: float = 1.0
    clipping_norm: float = 0.1
    client_delta: float = 1e-5

    def sample_config(self) -> dict[str, Any]:
        """Run-config of the sample-level arm (the run's other settings still apply)."""
        from client.privacy import PrivacySettings, require_sample_level_dp

        require_sample_level_dp(SAMPLE_DP_LOSS)
        values = {
            "loss": SAMPLE_DP_LOSS,
            "dp-target-epsilon": self.target_epsilon,
            "dp-delta": self.delta,
            "dp-max-grad-norm": self.max_grad_norm,
        }
        PrivacySettings.from_config(values)  # ConfigError naming the bad dp-* value
        return values

    def client_config(self) -> dict[str, Any]:
        """Run-config of the client-level arm."""
        return {
            "client-dp": self.client_mode,
            "client-dp-noise-multiplier": self.noise_multiplier,
            "client-dp-clipping-norm": self.clipping_norm,
            "client-dp-delta": self.client_delta,
        }


@dataclass
class Comparison:
    """Rows of one comparison (one partition scheme) and the settings that produced them.

    ``histories``: each federated arm's per-round history (history.jsonl); ``round_test``: each
    federated arm's headline metrics on the scored test set after every round (``round_rows``,
    for the figure: the table's set); ``per_site``: for each
    site, each method's metrics on that site's own test rows (its test half, or its rows of a
    common test set); ``selections``: each trained arm's
    validation score per epoch step / round and the chosen stopping point (``Selection``);
    ``sizes``: each site's train / validation / test rows and the scored test set's
    (``test_ids``).
    """

    partition: str
    sites: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    round_test: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    per_site: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    test_ids: list[str] = field(default_factory=list)

    def table(self) -> str:
        shown = [*PRIVACY_COLUMNS, *HEADLINE, "stop"]
        return format_table(self.rows, ["method", *[c for c in shown if self.has(c)]])

    def has(self, column: str) -> bool:
        return any(column in r for r in self.rows)

    @property
    def primary(self) -> str:
        return next((m for m in PRIMARY if self.has(m)), HEADLINE[0])

    def per_site_table(self) -> str:
        metric = self.primary
        methods: list[str] = []
        for values in self.per_site.values():
            methods.extend(m for m in values if m not in methods)
        rows = [
            {"method": m, **{s: v[m].get(metric) for s, v in self.per_site.items() if m in v}}
            for m in methods
        ]
        return format_table(rows, ["method", *self.per_site])


def compare(
    *,
    run: RunSettings,
    sites: int,
    out_dir: Path,
    federated: bool = True,
    privacy: PrivacyArms | None = None,
    echo: bool = False,
    cache_dir: Path | None = None,
    common_test: CommonTest | None = None,
) -> Comparison:
    """Run every method on the run's dataset split over ``sites`` sites (partition from ``run``).

    Every site's held-out split is halved (``split_holdout``): every trained arm picks its
    stopping point on validation data only (``SELECTION``; each site alone on its own validation
    half, centralized on the pooled halves, each federated arm by the round whose checkpoint
    scores best on the sites' validation halves) and is scored once on the pooled test halves.
    ``privacy`` adds the two DP arms (and, when the run's loss is not the proxy loss, the
    non-private federated proxy-loss run the sample-level arm must be read against).
    ``cache_dir``: the embedding cache (default ``out_dir``/cache; shareable between comparisons).
    ``common_test``: score every arm on this set instead (its rows in no site's data, which needs
    ``run.test_rows == "exclude"``); each site's whole held-out split is then its validation
    split, and the per-site table scores each site's own rows of the set.
    """
    import torch

    # torch's own default (OMP_NUM_THREADS, else one per core), which a site's round run in this
    # process sets to 1
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(
        partition=partition_label(run),
        sites=sites,
    )
    started = time.perf_counter()
    cache_dir = cache_dir or out_dir / "cache"
    prepared = prepare_sites(run, sites, cache_dir=cache_dir)
    if common_test is None:
        splits = [split_holdout(s) for s in prepared]
        pooled_test = concat_embedded([s.test for s in splits])
    else:
        own = common_test.site_tests(run, prepared)
        splits = [split_holdout(s, own_test=t) for s, t in zip(prepared, own, strict=True)]
        pooled_test = common_test.data
    comparison.seconds["embedding"] = time.perf_counter() - started
    comparison.sizes = {
        f"site {i}": {"train": len(s.train), "validation": len(s.val), "test": len(s.test)}
        for i, s in enumerate(splits)
    }
    comparison.sizes["scored"] = {"test": len(pooled_test)}
    comparison.test_ids = list(pooled_test.ids)
    pooled_train = concat_embedded([s.train for s in splits])
    pooled_val = concat_embedded([s.val for s in splits])
    frozen, frozen_sel = frozen_row(
        "frozen (+ closed-form lstsq alignment)", pooled_train, pooled_val, pooled_test
    )
    comparison.rows.append(frozen)
    steps = run.num_server_rounds

    started = time.perf_counter()
    local = [train_selected(run, s.train, s.val, steps=steps) for s in splits]
    local_rows = [
        {**metric_row(f"site {i} alone", m, s.train, pooled_test), "stop": sel.label}
        for i, ((m, sel), s) in enumerate(zip(local, splits, strict=True))
    ]
    comparison.seconds["local"] = time.perf_counter() - started
    chosen = [sel.trained for _, sel in local]
    average: dict[str, Any] = {
        "method": "each site alone (mean)",
        "stop": f"epoch {min(chosen)}-{max(chosen)}/{local[0][1].budget}",
    }
    for key in HEADLINE:
        values = [r[key] for r in local_rows if key in r]
        if values:
            average[key] = float(np.mean(values))
    comparison.rows.append(average)

    started = time.perf_counter()
    central, central_sel = train_selected(run, pooled_train, pooled_val, steps=steps)
    comparison.rows.append(
        {
            **metric_row("centralized (pooled, upper bound)", central, pooled_train, pooled_test),
            "stop": central_sel.label,
        }
    )
    comparison.seconds["centralized"] = time.perf_counter() - started
    models: dict[str, HeadModel] = {"centralized": central}
    comparison.selections = {
        **({"frozen": ridge_selection(frozen_sel)} if frozen_sel else {}),
        **{f"site {i} alone": sel.to_dict() for i, (_, sel) in enumerate(local)},
        "centralized": central_sel.to_dict(),
    }

    arms = _arm_configs(run, federated=federated, privacy=privacy)
    if privacy is not None:
        comparison.privacy = asdict(privacy)
    for key, (label, config) in arms.items():
        started = time.perf_counter()
        arm, selection = federated_selected(
            label, config, splits, home=out_dir / "arms" / key, cache_dir=cache_dir, echo=echo
        )
        assert arm.run_dir is not None  # a federated arm always has its run's checkpoints
        model = arm.model
        comparison.round_test[label] = round_rows(
            arm.run_dir, copy.deepcopy(model), pooled_train, pooled_test
        )
        comparison.seconds[key] = time.perf_counter() - started
        comparison.histories[label] = arm.history
        comparison.selections[label] = selection.to_dict()
        row = {**metric_row(label, model, pooled_train, pooled_test), "stop": selection.label}
        if arm.privacy:
            row = {"method": label, "epsilon": arm.privacy["epsilon"], **row, **arm.privacy}
        comparison.rows.append(row)
        models[label] = model
    comparison.rows.extend({**r, "method": f"  {r['method']}"} for r in local_rows)

    started = time.perf_counter()
    for i, s in enumerate(splits):
        if not len(s.test):
            continue  # a common test set with no rows of this site
        mine = {"this site alone": local[i][0], **models}
        comparison.per_site[f"site {i}"] = {
            **{
                method: metric_row(method, model, s.train, s.test) for method, model in mine.items()
            },
            "frozen (+ lstsq, pooled fit)": metric_row("frozen", None, pooled_train, s.test),
        }
    comparison.seconds["per_site_evaluation"] = time.perf_counter() - started
    return comparison


def _arm_configs(
    run: RunSettings, *, federated: bool, privacy: PrivacyArms | None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Federated arms to run: key (its directory) -> (row label, run-config)."""
    if not federated:
        if privacy is not None:
            raise ConfigError("the DP arms are federated runs: drop --no-federated or add --no-dp")
        return {}
    base = run_config_of(run)
    if run.dataset in DISJOINT_SERVER_EVAL and not run.server_eval:
        base["server-eval"] = run.dataset  # per-round held-out curve on data no site holds
    rounds = run.num_server_rounds
    arms = {"federated": (f"federated ({run.strategy}, {rounds} rounds)", base)}
    if privacy is None:
        return arms
    if run.loss != SAMPLE_DP_LOSS:
        arms["federated-proxy"] = (
            f"federated, {SAMPLE_DP_LOSS} loss (no DP: the sample-level arm's baseline)",
            {**base, "loss": SAMPLE_DP_LOSS},
        )
    arms["sample-dp"] = (
        f"federated + sample-level DP ({SAMPLE_DP_LOSS} loss, target ε={privacy.target_epsilon:g} per site)",
        {**base, **privacy.sample_config()},
    )
    arms["client-dp"] = (
        f"federated + client-level DP ({run.loss} loss, σ={privacy.noise_multiplier:g}, C={privacy.clipping_norm:g})",
        {**base, **privacy.client_config()},
    )
    for _, config in arms.values():
        RunSettings.from_run_config(config)  # a bad arm fails before any arm runs
    check_declared_classes(run)  # the sample-level arm's sites would refuse it in round 1
    return arms


def _by_name(comparison: Comparison) -> dict[str, dict[str, Any]]:
    """Rows keyed by the method's name before its parenthesis ("frozen", "centralized", ...)."""
    return {r["method"].strip().split(" (")[0]: r for r in comparison.rows}


def ratios(comparison: Comparison) -> dict[str, float]:
    """Federated / centralized for each headline metric (the issue's acceptance ratios)."""
    rows = _by_name(comparison)
    if "federated" not in rows:
        return {}
    fed, central = rows["federated"], rows["centralized"]
    return {
        k: fed[k] / central[k] for k in HEADLINE if k in fed and k in central and central[k] > 0
    }


def gains(comparison: Comparison) -> dict[str, dict[str, float]]:
    """Federated minus the frozen embeddings and minus the mean site alone, per headline metric."""
    rows = _by_name(comparison)
    if "federated" not in rows:
        return {}
    fed = rows["federated"]
    return {
        name: {k: fed[k] - rows[base][k] for k in HEADLINE if k in fed and k in rows[base]}
        for name, base in (("minus_frozen", "frozen"), ("minus_alone", "each site alone"))
    }
