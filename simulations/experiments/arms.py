"""The comparison's arms: the sites' splits, how each arm is trained, stopped on validation and scored."""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.artifacts import load_head
from common.config import RunSettings, SiteSettings
from common.data.partition import split_indices
from common.embedding import EmbeddedDataset
from common.errors import ConfigError
from common.evaluation import aligned_metrics, evaluate_head, projected_metrics
from common.head_start import (
    SELECTION_REPLICATES,
    ValidationScores,
    beats_start,
    validation_scores,
)
from common.metrics import RIDGES, linear_alignments
from common.pipeline import SiteData, prepare_site_data
from common.privacy import PrivacySettings
from common.registries import sample_dp_losses
from common.training import (
    HeadModel,
    build_run_model,
    choose_objective,
    objectives_to_try,
    train_head,
)

HEADLINE = ("mean_R@1", "mean_R@5", "mean_R@10", "zs_acc", "zs_auroc", "probe_f1_macro")
PRIVACY_COLUMNS = ("epsilon",)  # delta is in the note under the table


# The sample-level DP arm's loss: per-example decomposable, which DP-SGD's guarantee needs.
SAMPLE_DP_LOSS = sample_dp_losses()[0]


# Each site's held-out split (never trained on) is halved, stratified by label, with this seed:
# one half is the VALIDATION split every trained arm stops on, the other the TEST split it is
# scored on once. The sites' own per-round ``eval-*`` reports cover both halves, so they are
# plotted but never used for selection.
VALIDATION_SEED = 1


SELECTION = (
    "mean of validation R@5, zero-shot (mean of accuracy and AUROC) and linear-probe macro-F1 "
    "(a head with a closed-form start: the untrained start is a candidate like every trained "
    "state)"
)
"""What every trained arm is stopped on (``selection_metrics``; the parts the data supports)."""


@dataclass
class FederatedArm:
    """One federated run of the comparison: its head (the final round's, or the round
    ``federated_selected`` kept) and what its history says."""

    label: str
    model: HeadModel
    history: list[dict[str, Any]]
    privacy: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None  # checkpoints of every round (server/checkpoints.py RunStore)


def concat_embedded(parts: Sequence[EmbeddedDataset]) -> EmbeddedDataset:
    """Row-wise union of several sites' embedded data (same classes and prompts)."""

    def cat(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else np.concatenate(values)

    groups = None
    site_groups = [p.text_groups for p in parts]
    if all(g is not None and g.size for g in site_groups):  # per-site ids: shift them apart
        offset, shifted = 0, []
        for g in site_groups:
            assert g is not None
            shifted.append(g + offset)
            offset += int(g.max()) + 1
        groups = np.concatenate(shifted)
    return EmbeddedDataset(
        ids=[i for p in parts for i in p.ids],
        image=cat("image"),
        text=cat("text"),
        labels=cat("labels"),
        class_names=list(parts[0].class_names),
        prompts=parts[0].prompts,
        classes_declared=all(p.classes_declared for p in parts),
        text_groups=groups,
    )


def partition_label(run: RunSettings) -> str:
    """How the run splits its dataset over the sites, for a report: "iid", "dirichlet(alpha=0.3)"."""
    return run.partition + (f"(alpha={run.alpha})" if run.partition == "dirichlet" else "")


def prepare_sites(run: RunSettings, sites: int, *, cache_dir: Path) -> list[SiteData]:
    """Every simulated site's embedded train/test split, exactly as its ClientApp will see it."""
    return [
        prepare_site_data(
            SiteSettings(partition_id=i, num_partitions=sites).data_spec(run), cache_dir=cache_dir
        )
        for i in range(sites)
    ]


@dataclass
class SiteSplits:
    """A site's training split (what its ClientApp trains on) and its held-out split, halved."""

    train: EmbeddedDataset
    val: EmbeddedDataset
    test: EmbeddedDataset


@dataclass
class CommonTest:
    """One test set that scores every arm instead of the sites' test halves.

    Its rows are in no site's data (sites run with ``test-rows = "exclude"``), so each site's whole
    held-out split is its validation split. ``per_site``: each site's own rows of it, for the
    per-site table (None: no site has rows of its own).
    """

    data: EmbeddedDataset
    per_site: Sequence[EmbeddedDataset] | None = None

    def site_tests(self, run: RunSettings, sites: Sequence[SiteData]) -> list[EmbeddedDataset]:
        """Each site's own test rows (maybe none), after checking the set fits the run and sites."""
        if run.test_rows != "exclude":
            raise ConfigError(
                'a common test set needs run-config test-rows = "exclude" (the sites would '
                "otherwise keep the rows marked split=test as their held-out split)"
            )
        reference = sites[0].train
        if self.data.class_names != reference.class_names or self.data.dims != reference.dims:
            raise ConfigError(
                f"the common test set has classes {self.data.class_names} and inputs "
                f"{self.data.dims}, the sites {reference.class_names} and {reference.dims}"
            )
        if self.per_site is None:
            return [self.data.subset([]) for _ in sites]
        if len(self.per_site) != len(sites):
            raise ConfigError(
                f"the common test set has rows for {len(self.per_site)} sites, not {len(sites)}"
            )
        return list(self.per_site)


def split_holdout(
    site: SiteData, *, seed: int = VALIDATION_SEED, own_test: EmbeddedDataset | None = None
) -> SiteSplits:
    """Halve ``site``'s held-out split into validation and test (stratified by label); train untouched.

    With ``own_test`` (the site's rows of a ``CommonTest``), the whole held-out split is
    validation and ``own_test`` is the site's test split.
    """
    if own_test is not None:
        return SiteSplits(site.train, site.test, own_test)
    test_rows, val_rows = split_indices(
        len(site.test), site.test.labels, test_fraction=0.5, seed=seed
    )
    return SiteSplits(site.train, site.test.subset(val_rows), site.test.subset(test_rows))


@dataclass
class Selection:
    """Where a trained arm was stopped: the validation scores after each step and the best step.

    ``unit`` is "epoch" (a step = ``per_step`` epochs of local training) or "round" (a federated
    round); ``chosen`` is the 1-based step of the best score (the earliest on ties). ``metrics``
    holds each step's validation metrics (``common.head_start.validation_scores``); with
    ``closed_form_start``, step 1 is the untrained closed-form start, a candidate like every
    trained step, so the arm's validation score is never below its start's. (Guards that keep the
    start unless a trained step is lower on no metric, or better in most bootstrap resamples,
    lost more cells against frozen on test: ``selection_rules``, docs/results.md.)
    ``objective``: what the arm trained (an ``auto`` loss's choice); ``tried``: with several
    objectives tried (``train_selected``), each one's best validation score.
    """

    unit: str
    scores: list[float]
    per_step: int = 1
    metrics: list[ValidationScores] = field(default_factory=list)
    closed_form_start: bool = False
    objective: str = ""
    tried: dict[str, float] = field(default_factory=dict)

    @property
    def chosen(self) -> int:
        return select_best(self.scores)

    @property
    def trained(self) -> int:
        """Epochs (or the round) at the chosen step: with a closed-form start step 1 trained 0."""
        return self._units(self.chosen)

    @property
    def budget(self) -> int:
        return self._units(len(self.scores))

    def _units(self, steps: int) -> int:
        if self.unit == "epoch" and self.closed_form_start:
            return (steps - 1) * self.per_step
        return steps * self.per_step

    @property
    def label(self) -> str:
        start = " (closed-form start)" if self.closed_form_start and self.chosen == 1 else ""
        return f"{self.unit} {self.trained}/{self.budget}{start}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "chosen": self.trained,
            "budget": self.budget,
            "validation_scores": self.scores,
            **({"objective": self.objective} if self.objective else {}),
            **({"objectives_tried": self.tried} if self.tried else {}),
            **(
                {
                    "closed_form_start": True,
                    "validation_metrics": [dict(m) for m in self.metrics],
                    "beats_start": [beats_start(m, self.metrics[0]) for m in self.metrics],
                }
                if self.closed_form_start and self.metrics
                else {}
            ),
        }


def select_best(scores: Sequence[float]) -> int:
    """1-based index of the highest validation score (the earliest on ties; NaN never wins)."""
    if not scores:
        raise ConfigError("model selection: no validation scores (zero epochs or rounds?)")
    values = np.asarray(scores, dtype=np.float64)
    if np.isnan(values).all():
        raise ConfigError("model selection: every validation score is NaN")
    return int(np.nanargmax(values)) + 1


def selection_metrics(
    model: HeadModel, splits: Sequence[tuple[EmbeddedDataset, EmbeddedDataset]]
) -> ValidationScores:
    """The validation metrics of ``model`` over ``(fit, validation)`` splits, ``score`` the one
    every arm is stopped on (higher is better).

    Per split: ``common.head_start.validation_scores`` (retrieval R@5, zero-shot accuracy and
    AUROC, a linear probe fitted on ``fit``; ``score`` their mean), the score the trained head
    keeps its best state by. Several splits (the sites' own halves) are averaged weighted by
    their validation sizes, as the sites' reports would be; a split whose score is NaN (it
    supports no metric) is left out.
    """
    per_split = [
        validation_scores(model, fit, val, replicates=SELECTION_REPLICATES) for fit, val in splits
    ]
    # a split that gives no metric (a label-skewed site's one-class halves, text only) does not vote
    voting = [
        (m, len(val))
        for m, (_, val) in zip(per_split, splits, strict=True)
        if np.isfinite(m["score"])
    ]
    if not voting:
        raise ConfigError("model selection: the validation split gives no metric to select on")
    scores, weights = [m for m, _ in voting], [w for _, w in voting]
    keys = set.intersection(*(set(m) for m in scores))
    values = {k: float(np.average([m[k] for m in scores], weights=weights)) for k in sorted(keys)}
    per_metric = {
        k: np.average(np.vstack([m.metric_replicates[k] for m in scores]), axis=0, weights=weights)
        for k in sorted(keys)
        if all(k in m.metric_replicates for m in scores)
    }
    return ValidationScores(values, metric_replicates=per_metric)


def train_selected(
    run: RunSettings,
    train: EmbeddedDataset,
    val: EmbeddedDataset,
    *,
    steps: int,
    on_step: Callable[[int, HeadModel], None] | None = None,
) -> tuple[HeadModel, Selection]:
    """Train ``steps`` x ``run.local_epochs`` epochs; return the head at the best validation step.

    Each step is one federated round's local training on all of ``train`` (same optimiser reset
    and per-round seed), so a site alone or the pooled data get exactly a round's procedure (a
    head with a linear path: step 1 is the untrained closed-form start, as round 1 is), and the
    stopping point is chosen as the federated arm's is: by ``selection_metrics`` on ``val``.
    An ``auto`` loss trains one such run per objective (its choice for ``train`` and the
    ``AUTO_ALTERNATIVES`` of it) and keeps the one whose best step scores higher, as
    ``train_head`` does with validation rows (``Selection.objective``, ``Selection.tried``).
    ``on_step(step, model)`` sees the head after each step (1-based) is scored (``model.objective``
    says which run).
    """
    template = build_run_model(run, dims=train.dims, num_classes=train.num_classes)
    objective, _ = choose_objective(template, train, distilling=run.ntd_beta > 0)
    candidates = objectives_to_try(template, objective)
    kept: tuple[HeadModel, Selection] | None = None
    tried: dict[str, float] = {}
    for candidate in candidates:
        model, selection = _train_steps(run, train, val, steps, candidate, on_step)
        tried[candidate] = selection.scores[selection.chosen - 1]
        if kept is None or tried[candidate] > tried[kept[1].objective]:
            kept = model, selection
    assert kept is not None
    kept[1].tried = tried if len(tried) > 1 else {}
    return kept


def _train_steps(
    run: RunSettings,
    train: EmbeddedDataset,
    val: EmbeddedDataset,
    steps: int,
    objective: str,
    on_step: Callable[[int, HeadModel], None] | None,
) -> tuple[HeadModel, Selection]:
    model = build_run_model(run, dims=train.dims, num_classes=train.num_classes)
    closed_form = model.head.has_linear_path
    selection = Selection(
        "epoch", [], per_step=run.local_epochs, closed_form_start=closed_form, objective=objective
    )
    best: dict[str, Any] | None = None
    for step in range(1, steps + 1):
        config = run.train_config(
            seed=run.seed * 100_003 + step,
            first_round=step == 1,
            start_only=closed_form,
            objective=objective,
        )
        train_head(model, train, config)
        metrics = selection_metrics(model, [(train, val)])
        selection.metrics.append(metrics)
        selection.scores.append(metrics["score"])
        if on_step is not None:
            on_step(step, model)
        if selection.chosen == step:
            best = copy.deepcopy(model.state_dict())
    assert best is not None
    model.load_state_dict(best)
    return model, selection


def round_checkpoints(run_dir: Path) -> list[tuple[int, Path, dict[str, np.ndarray]]]:
    """``(round, path, arrays)`` of every checkpoint of a federated run from round 1 on (round 0,
    the initial head, is no round's result); ConfigError when a round is missing."""
    from server.checkpoints import RunStore

    store = RunStore(run_dir)
    paths = [(int(p.stem.split("-")[1]), p) for p in store.checkpoints.glob("round-*.safetensors")]
    rounds = sorted((r, p) for r, p in paths if r >= 1)
    if [r for r, _ in rounds] != list(range(1, len(rounds) + 1)):
        raise ConfigError(f"{store.checkpoints}: rounds missing from the checkpoints")
    return [(r, p, RunStore.load_checkpoint(p, r).arrays) for r, p in rounds]


def select_round(
    run_dir: Path,
    model: HeadModel,
    splits: Sequence[tuple[EmbeddedDataset, EmbeddedDataset]],
    *,
    closed_form_start: bool = False,
) -> tuple[HeadModel, Selection]:
    """Load into ``model`` the federated run's checkpoint (round >= 1) with the best validation
    score on the sites' ``(fit, validation)`` splits; ``closed_form_start``: round 1 is the
    federation's closed-form start, returned untrained (see ``Selection``)."""
    from common.artifacts import load_state_arrays

    checkpoints = round_checkpoints(run_dir)
    selection = Selection("round", [], closed_form_start=closed_form_start)
    for _, path, arrays in checkpoints:
        load_state_arrays(model, arrays, source=str(path))
        selection.metrics.append(selection_metrics(model, splits))
        selection.scores.append(selection.metrics[-1]["score"])
    _, path, arrays = checkpoints[selection.chosen - 1]
    load_state_arrays(model, arrays, source=str(path))
    return model, selection


def round_rows(
    run_dir: Path, model: HeadModel, train: EmbeddedDataset, test: EmbeddedDataset
) -> dict[str, list[float]]:
    """The headline metrics (``metric_row``) of every checkpoint (round >= 1) of a federated run
    on ``test``, as ``{"round": [...], metric: [...]}``: the table's test set round by round, for
    the figure only (the stopping point is chosen on validation by ``select_round``)."""
    from common.artifacts import load_state_arrays

    series: dict[str, list[float]] = {"round": []}
    for server_round, path, arrays in round_checkpoints(run_dir):
        load_state_arrays(model, arrays, source=str(path))
        row = metric_row("", model, train, test)
        series["round"].append(float(server_round))
        for key in HEADLINE:
            if key in row:
                series.setdefault(key, []).append(float(row[key]))
    return series


def metric_row(
    method: str,
    model: HeadModel | None,
    train: EmbeddedDataset,
    test: EmbeddedDataset,
    *,
    alignments: Sequence[str] = ("lstsq",),
) -> dict[str, Any]:
    """The headline metrics of ``model`` (None: the frozen embeddings' probe and, for paired data,
    the ``alignments`` rows of ``evaluate_head``) fitted on ``train`` and scored on ``test``."""
    if model is not None:
        source = projected_metrics(model, train, test)
    else:  # paired data also has the closed-form aligned row; label-only data has just "frozen"
        rows = {
            r["embeddings"]: r for r in evaluate_head(None, train, test, alignments=alignments).rows
        }
        source = {**rows.get("frozen+lstsq", {}), **rows["frozen"]}
    return {"method": method, **{k: v for k, v in source.items() if k in HEADLINE}}


# The frozen baseline's one hyperparameter, the least-squares map's relative ridge (one of
# common.metrics.RIDGES), is chosen on the pooled validation halves by the same score.
def frozen_row(
    method: str, train: EmbeddedDataset, val: EmbeddedDataset, test: EmbeddedDataset
) -> tuple[dict[str, Any], Selection | None]:
    """The frozen embeddings' row: the probe, and for paired data the least-squares alignment
    whose ridge (``RIDGES``) scores best on ``val`` by the selection score, scored on ``test``."""
    row = metric_row(method, None, train, test, alignments=())  # the map is tuned below
    if train.image is None or train.text is None:
        return row, None
    aligned, selection, ridge = tuned_alignment("lstsq", train, val, test)
    return {**row, **aligned, "stop": f"ridge {ridge:g}"}, selection


def tuned_alignment(
    method: str, train: EmbeddedDataset, val: EmbeddedDataset, test: EmbeddedDataset
) -> tuple[dict[str, float], Selection, float]:
    """The closed-form ``method`` map ("lstsq" or "cca") whose ridge (``RIDGES``) scores best on
    ``val`` (mean of R@5 and zero-shot AUROC): its headline metrics on ``test``, the selection
    and the ridge."""
    assert train.image is not None and train.text is not None
    alignments = linear_alignments(train.image, train.text, method=method, ridges=RIDGES)
    scores = []
    for alignment in alignments:
        metrics = _finite(aligned_metrics(alignment, val, ks=(5,)))
        keys = [k for k in ("mean_R@5", "zs_auroc") if k in metrics]
        scores.append(float(np.mean([metrics[k] for k in keys])))
    selection = Selection("ridge", scores)
    aligned = _finite(aligned_metrics(alignments[selection.chosen - 1], test))
    headline = {k: v for k, v in aligned.items() if k in HEADLINE}
    return headline, selection, RIDGES[selection.chosen - 1]


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def ridge_selection(selection: Selection) -> dict[str, Any]:
    """The frozen row's selection as JSON: the chosen ridge itself, and every ridge's score."""
    return {
        "unit": selection.unit,
        "chosen": RIDGES[selection.chosen - 1],
        "ridges": list(RIDGES),
        "validation_scores": selection.scores,
    }


def run_config_of(run: RunSettings, **extra: Any) -> dict[str, Any]:
    """``run`` as Flower run-config keys (without run-dir/resume, which the simulation sets)."""
    config = {
        k.replace("_", "-"): v for k, v in run.to_dict().items() if k not in ("run_dir", "resume")
    }
    return {**config, **extra}


def federate(
    *,
    label: str,
    run_config: Mapping[str, Any],
    sites: int,
    home: Path,
    cache_dir: Path,
    echo: bool = False,
) -> FederatedArm:
    """One federated arm on Flower's simulation engine, in its own ``home``.

    The simulated sites start fresh (their state dir, privacy ledger and audit log included: each
    arm is a new consortium) and share the embedding cache ``cache_dir``. Raises ConfigError for a
    run-config its coordinator would refuse (before any process starts) and FlowerError, with
    Flower's reason, if the run does not finish ``finished:completed``. ``privacy`` of the result:
    the epsilon spent as the sites' audit logs (sample-level) or the history's accountant record
    (client-level) report it.
    """
    from simulations.flower.federate import simulate

    home = home.resolve()
    shutil.rmtree(home / "sites", ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    link, target = home / "cache", cache_dir.resolve()
    if link.resolve() != target:
        if link.is_symlink():
            link.unlink()
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link, target_is_directory=True)
    fed = simulate(out_dir=home, sites=sites, run_config=dict(run_config), echo=echo)
    fed.raise_for_status(f"federated arm '{label}'")
    model, _ = load_head(fed.final_head)
    privacy: dict[str, Any] = {}
    if float(run_config.get("dp-target-epsilon", 0) or 0) > 0:
        accountant = PrivacySettings.from_config(run_config).accountant
        privacy = sample_level_spent(
            home, sites, delta=float(run_config["dp-delta"]), accountant=accountant
        )
    elif str(run_config.get("client-dp", "off")) != "off":
        privacy = client_level_spent(fed.history)
    return FederatedArm(label, model, fed.history, privacy, fed.run_dir)


def federated_selected(
    label: str,
    run_config: Mapping[str, Any],
    splits: Sequence[SiteSplits],
    *,
    home: Path,
    cache_dir: Path,
    echo: bool = False,
) -> tuple[FederatedArm, Selection]:
    """One federated arm (``federate``, one simulated site per split) with its head stopped at
    the round whose checkpoint scores best on the sites' validation halves (``select_round``;
    round 1 is the closed-form start for a head with a linear path trained without DP). The arm's
    ``model`` holds that round's head."""
    arm = federate(
        label=label,
        run_config=run_config,
        sites=len(splits),
        home=home,
        cache_dir=cache_dir,
        echo=echo,
    )
    assert arm.run_dir is not None
    _, selection = select_round(
        arm.run_dir,
        arm.model,
        [(s.train, s.val) for s in splits],
        closed_form_start=arm.model.head.has_linear_path and not arm.privacy,
    )
    return arm, selection


def sample_level_spent(
    home: Path, sites: int, *, delta: float, accountant: str = PrivacySettings().accountant
) -> dict[str, Any]:
    """Each site's cumulative epsilon at ``delta`` as its audit log records it (its ledger's total).

    ``epsilon`` is the largest: the guarantee every site's examples have at least.
    """
    from client.audit import audit_path, verify_audit_log
    from simulations.flower.federate import site_name

    per_site: dict[str, float] = {}
    for i in range(sites):
        path = audit_path(home / "sites" / site_name(i))
        summary = verify_audit_log(path)
        if not summary.ok:
            raise ConfigError(f"{path}: egress audit failed: {summary.violations[:3]}")
        if summary.epsilon_spent is None:
            raise ConfigError(f"{path}: no privacy spend recorded although DP-SGD was on")
        per_site[site_name(i)] = summary.epsilon_spent
    return {
        "privacy": "sample-level",
        "epsilon": max(per_site.values()),
        "delta": delta,
        "epsilon_per_site": per_site,
        "accounting": f"dp-accountant {accountant} (the sites' dp-epsilon), per site, cumulative "
        "over all rounds (site audit log)",
    }


def client_level_spent(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The federation's (epsilon, delta) after the last round, from the accountant's history record."""
    records = [e["client_dp"] for e in history if "client_dp" in e]
    if not records:
        raise ConfigError("client-level DP was on but the run's history has no client_dp record")
    last = records[-1]
    return {
        "privacy": "client-level",
        "epsilon": float(last["epsilon"]),
        "delta": float(last["delta"]),
        "releases": int(last["releases"]),
        "noise_multiplier": float(last["noise_multiplier"]),
        "clipping_norm": float(last["clipping_norm"]),
        "accounting": str(last["accounting"]),
    }
