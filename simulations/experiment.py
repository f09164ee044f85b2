"""Should we federate? Frozen vs each site alone vs centralized vs federated (with and without DP), same splits, same evaluation."""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.artifacts import load_head
from common.atomic import atomic_write_json, atomic_write_text
from common.config import RunSettings, SiteSettings
from common.embedding import EmbeddedDataset
from common.errors import ConfigError
from common.evaluation import evaluate_head, quick_metrics
from common.heads import HEAD_PRESETS
from common.metrics import (
    RIDGES,
    cross_modal_retrieval,
    format_table,
    linear_alignment,
    linear_probe,
    zero_shot,
)
from common.pipeline import SiteData, prepare_site_data, split_indices
from common.training import HeadModel, TrainConfig, build_head_model, train_head
from simulations.commands import parse_run_config
from simulations.machine import machine_info

HEADLINE = ("mean_R@1", "mean_R@5", "mean_R@10", "zs_acc", "zs_auroc", "probe_f1_macro")
# The metric a figure shows: the first of these the rows have (paired data: retrieval).
PRIMARY = ("mean_R@5", "probe_f1_macro", "zs_acc")
PRIVACY_COLUMNS = ("epsilon",)  # delta is in the note under the table
# Datasets whose coordinator-held evaluation set (another seed of the generator) shares no example
# with the sites' data; for the others the round curves come from the sites' own held-out splits.
DISJOINT_SERVER_EVAL = ("synthetic-radiology",)
SAMPLE_DP_LOSS = "proxy"  # the decomposable loss: the only one DP-SGD's guarantee holds for
# Each site's held-out split (never trained on) is halved, stratified by label, with this seed:
# one half is the VALIDATION split every trained arm stops on, the other the TEST split it is
# scored on once. The sites' own per-round ``eval-*`` reports cover both halves, so they are
# plotted but never used for selection.
VALIDATION_SEED = 1
SELECTION = "mean of validation R@5 and zero-shot AUROC"
"""What every trained arm is stopped on (label-only data: nearest-centroid accuracy)."""
# The frozen baseline's one hyperparameter, the least-squares map's relative ridge (one of
# common.metrics.RIDGES), is chosen on the pooled validation halves by the same score.


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

    ``histories``: each federated arm's per-round history (history.jsonl); ``per_site``: for each
    site, each method's metrics on that site's own test half; ``selections``: each trained arm's
    validation score per epoch step / round and the chosen stopping point (``Selection``).
    """

    partition: str
    sites: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_site: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)

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


@dataclass
class FederatedArm:
    """One federated run of the comparison: its final head and what its history says."""

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
        text_groups=groups,
    )


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


def split_holdout(site: SiteData, *, seed: int = VALIDATION_SEED) -> SiteSplits:
    """Halve ``site``'s held-out split into validation and test (stratified by label); train untouched."""
    test_rows, val_rows = split_indices(
        len(site.test), site.test.labels, test_fraction=0.5, seed=seed
    )
    return SiteSplits(site.train, site.test.subset(val_rows), site.test.subset(test_rows))


@dataclass
class Selection:
    """Where a trained arm was stopped: the validation score after each step and the best step.

    ``unit`` is "epoch" (a step = ``per_step`` epochs of local training) or "round" (a federated
    round); ``chosen`` is the 1-based step of the best score (the earliest on ties).
    """

    unit: str
    scores: list[float]
    per_step: int = 1

    @property
    def chosen(self) -> int:
        return select_best(self.scores)

    @property
    def label(self) -> str:
        return f"{self.unit} {self.chosen * self.per_step}/{len(self.scores) * self.per_step}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "chosen": self.chosen * self.per_step,
            "budget": len(self.scores) * self.per_step,
            "validation_scores": self.scores,
        }


def select_best(scores: Sequence[float]) -> int:
    """1-based index of the highest validation score (the earliest on ties; NaN never wins)."""
    if not scores:
        raise ConfigError("model selection: no validation scores (zero epochs or rounds?)")
    values = np.asarray(scores, dtype=np.float64)
    if np.isnan(values).all():
        raise ConfigError("model selection: every validation score is NaN")
    return int(np.nanargmax(values)) + 1


def selection_score(model: HeadModel, val: Sequence[EmbeddedDataset]) -> float:
    """The validation score of ``model`` on one or more validation splits (higher is better).

    Per split: the mean of recall@5 and zero-shot AUROC (paired data), or nearest-centroid
    accuracy (label-only data), as ``quick_metrics`` computes them; several splits (the sites'
    own validation halves) are averaged weighted by their sizes, as the sites' reports would be.
    """
    scores, weights = [], []
    for data in val:
        metrics = quick_metrics(model, data, prefix="")
        keys: list[str] = [k for k in ("R@5", "zs_auroc") if k in metrics] or ["centroid_acc"]
        if keys[0] not in metrics:
            raise ConfigError("model selection: the validation split gives no metric to select on")
        scores.append(float(np.mean([metrics[k] for k in keys])))
        weights.append(len(data))
    return float(np.average(scores, weights=weights))


def _new_model(run: RunSettings, data: EmbeddedDataset) -> HeadModel:
    return build_head_model(
        dims=data.dims,
        head_config=HEAD_PRESETS[run.head],
        layout=run.layout,
        loss=run.loss,
        num_classes=data.num_classes or None,
        seed=run.seed,
    )


def _train(run: RunSettings, data: EmbeddedDataset, *, epochs: int) -> HeadModel:
    """A head trained ``epochs`` epochs in one go (no selection; the emulator's baseline)."""
    model = _new_model(run, data)
    config = TrainConfig(
        loss=run.loss, epochs=epochs, batch_size=run.batch_size, lr=run.lr, seed=run.seed
    )
    train_head(model, data, config)
    return model


def train_selected(
    run: RunSettings, train: EmbeddedDataset, val: EmbeddedDataset, *, steps: int
) -> tuple[HeadModel, Selection]:
    """Train ``steps`` x ``run.local_epochs`` epochs; return the head at the best validation step.

    Each step is one federated round's local training on all of ``train`` (same optimiser reset
    and per-round seed), so a site alone or the pooled data get exactly a round's procedure, and
    the stopping point is chosen as the federated arm's is: by ``selection_score`` on ``val``.
    """
    model = _new_model(run, train)
    scores: list[float] = []
    best: dict[str, Any] | None = None
    for step in range(1, steps + 1):
        config = run.train_config(seed=run.seed * 100_003 + step)
        train_head(model, train, config)
        scores.append(selection_score(model, [val]))
        if select_best(scores) == step:
            best = copy.deepcopy(model.state_dict())
    assert best is not None
    model.load_state_dict(best)
    return model, Selection("epoch", scores, per_step=run.local_epochs)


def select_round(
    run_dir: Path, model: HeadModel, val: Sequence[EmbeddedDataset]
) -> tuple[HeadModel, Selection]:
    """Load into ``model`` the federated run's checkpoint (round >= 1) with the best validation score."""
    from common.artifacts import load_state_arrays
    from server.checkpoints import RunStore

    store = RunStore(run_dir)
    paths = sorted(store.checkpoints.glob("round-*.safetensors"))
    checkpoints = [(int(p.stem.split("-")[1]), p) for p in paths]
    checkpoints = [(r, p) for r, p in checkpoints if r >= 1]
    if [r for r, _ in checkpoints] != list(range(1, len(checkpoints) + 1)):
        raise ConfigError(f"{store.checkpoints}: rounds missing from the checkpoints")
    scores = []
    for server_round, path in checkpoints:
        arrays = RunStore.load_checkpoint(path, server_round).arrays
        load_state_arrays(model, arrays, source=str(path))
        scores.append(selection_score(model, val))
    selection = Selection("round", scores)
    _, path = checkpoints[selection.chosen - 1]
    load_state_arrays(
        model, RunStore.load_checkpoint(path, selection.chosen).arrays, source=str(path)
    )
    return model, selection


def _row(
    method: str, model: HeadModel | None, train: EmbeddedDataset, test: EmbeddedDataset
) -> dict[str, Any]:
    if model is not None:
        source = _projected_metrics(model, train, test)
    else:  # paired data also has the closed-form aligned row; label-only data has just "frozen"
        rows = {r["embeddings"]: r for r in evaluate_head(None, train, test).rows}
        source = {**rows.get("frozen+lstsq", {}), **rows["frozen"]}
    return {"method": method, **{k: v for k, v in source.items() if k in HEADLINE}}


def _projected_metrics(
    model: HeadModel, train: EmbeddedDataset, test: EmbeddedDataset
) -> dict[str, float]:
    """``evaluate_head``'s "projected" row without its frozen rows (the comparison computes those
    once): retrieval and zero-shot on ``test``, the linear probe fitted on projected ``train``."""
    train_z, test_z = model.project(train), model.project(test)
    row: dict[str, float] = {}
    if "image" in test_z and "text" in test_z:
        row.update(
            cross_modal_retrieval(
                test_z["image"], test_z["text"], groups_text=test.text_groups, ks=(1, 5, 10)
            )
        )
        if "prompts" in test_z and test.labels is not None and (test.labels >= 0).all():
            row.update(zero_shot(test_z["image"], test_z["prompts"], test.labels))
    key = "joint" if "joint" in train_z else ("image" if "image" in train_z else "text")
    if train.labels is not None and test.labels is not None:
        tr, te = train.labels >= 0, test.labels >= 0
        if len(np.unique(train.labels[tr])) >= 2 and te.any():
            row.update(
                linear_probe(
                    train_z[key][tr], train.labels[tr], test_z[key][te], test.labels[te], seed=0
                )
            )
    return row


def _aligned_metrics(
    train: EmbeddedDataset, data: EmbeddedDataset, *, ridge: float, ks: tuple[int, ...]
) -> dict[str, float]:
    """Retrieval and zero-shot of the frozen embeddings mapped image -> text by ridge least squares."""
    assert train.image is not None and train.text is not None
    assert data.image is not None and data.text is not None
    alignment = linear_alignment(train.image, train.text, method="lstsq", ridge=ridge)
    image_z, text_z = alignment.transform_a(data.image), alignment.transform_b(data.text)
    metrics = dict(cross_modal_retrieval(image_z, text_z, groups_text=data.text_groups, ks=ks))
    if data.prompts is not None and data.labels is not None and (data.labels >= 0).all():
        metrics.update(zero_shot(image_z, alignment.transform_b(data.prompts), data.labels))
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def frozen_row(
    method: str, train: EmbeddedDataset, val: EmbeddedDataset, test: EmbeddedDataset
) -> tuple[dict[str, Any], Selection | None]:
    """The frozen embeddings' row: the probe, and for paired data the least-squares alignment
    whose ridge (``RIDGES``) scores best on ``val`` by the selection score, scored on ``test``."""
    row = _row(method, None, train, test)
    if train.image is None or train.text is None:
        return row, None
    scores = []
    for ridge in RIDGES:
        metrics = _aligned_metrics(train, val, ridge=ridge, ks=(5,))
        keys = [k for k in ("mean_R@5", "zs_auroc") if k in metrics]
        scores.append(float(np.mean([metrics[k] for k in keys])))
    selection = Selection("ridge", scores)
    ridge = RIDGES[selection.chosen - 1]
    aligned = _aligned_metrics(train, test, ridge=ridge, ks=(1, 5, 10))
    row.update({k: v for k, v in aligned.items() if k in HEADLINE})
    return {**row, "stop": f"ridge {ridge:g}"}, selection


def _ridge_selection(selection: Selection) -> dict[str, Any]:
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
    arm is a new consortium) and share the embedding cache ``cache_dir``. Raises FlowerError if the
    run does not finish ``finished:completed``. ``privacy`` of the result: the epsilon spent as the
    sites' audit logs (sample-level) or the history's accountant record (client-level) report it.
    """
    from simulations.federate import simulate
    from simulations.localfed import FlowerError

    home = home.resolve()
    shutil.rmtree(home / "sites", ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    link, target = home / "cache", cache_dir.resolve()
    if link.resolve() != target:
        if link.is_symlink():
            link.unlink()
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link, target_is_directory=True)
    RunSettings.from_run_config(run_config)  # ConfigError before any process starts
    fed = simulate(out_dir=home, sites=sites, run_config=dict(run_config), echo=echo)
    if not fed.ok:
        raise FlowerError(
            f"federated arm '{label}' failed: {fed.result.status}; log {fed.result.log_path}"
        )
    model, _ = load_head(fed.final_head)
    privacy: dict[str, Any] = {}
    if float(run_config.get("dp-target-epsilon", 0) or 0) > 0:
        privacy = sample_level_spent(home, sites, delta=float(run_config["dp-delta"]))
    elif str(run_config.get("client-dp", "off")) != "off":
        privacy = client_level_spent(fed.history)
    return FederatedArm(label, model, fed.history, privacy, fed.run_dir)


def sample_level_spent(home: Path, sites: int, *, delta: float) -> dict[str, Any]:
    """Each site's cumulative epsilon at ``delta`` as its audit log records it (its ledger's total).

    ``epsilon`` is the largest: the guarantee every site's examples have at least.
    """
    from client.audit import audit_path, verify_audit_log
    from simulations.federate import site_name

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
        "accounting": "Opacus RDP, per site, cumulative over all rounds (site audit log)",
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


def compare(
    *,
    run: RunSettings,
    sites: int,
    out_dir: Path,
    federated: bool = True,
    privacy: PrivacyArms | None = None,
    echo: bool = False,
    cache_dir: Path | None = None,
) -> Comparison:
    """Run every method on the run's dataset split over ``sites`` sites (partition from ``run``).

    Every site's held-out split is halved (``split_holdout``): every trained arm picks its
    stopping point on validation data only (``SELECTION``; each site alone on its own validation
    half, centralized on the pooled halves, each federated arm by the round whose checkpoint
    scores best on the sites' validation halves) and is scored once on the pooled test halves.
    ``privacy`` adds the two DP arms (and, when the run's loss is not the proxy loss, the
    non-private federated proxy-loss run the sample-level arm must be read against).
    ``cache_dir``: the embedding cache (default ``out_dir``/cache; shareable between comparisons).
    """
    import torch

    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(
        partition=f"{run.partition}"
        + (f"(alpha={run.alpha})" if run.partition == "dirichlet" else ""),
        sites=sites,
    )
    started = time.perf_counter()
    cache_dir = cache_dir or out_dir / "cache"
    splits = [split_holdout(s) for s in prepare_sites(run, sites, cache_dir=cache_dir)]
    comparison.seconds["embedding"] = time.perf_counter() - started
    pooled_train = concat_embedded([s.train for s in splits])
    pooled_val = concat_embedded([s.val for s in splits])
    pooled_test = concat_embedded([s.test for s in splits])
    frozen, frozen_sel = frozen_row(
        "frozen (+ closed-form lstsq alignment)", pooled_train, pooled_val, pooled_test
    )
    comparison.rows.append(frozen)
    steps = run.num_server_rounds

    started = time.perf_counter()
    local = [train_selected(run, s.train, s.val, steps=steps) for s in splits]
    local_rows = [
        {**_row(f"site {i} alone", m, s.train, pooled_test), "stop": sel.label}
        for i, ((m, sel), s) in enumerate(zip(local, splits, strict=True))
    ]
    comparison.seconds["local"] = time.perf_counter() - started
    chosen = [sel.chosen * sel.per_step for _, sel in local]
    average: dict[str, Any] = {
        "method": "each site alone (mean)",
        "stop": f"epoch {min(chosen)}-{max(chosen)}/{steps * run.local_epochs}",
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
            **_row("centralized (pooled, upper bound)", central, pooled_train, pooled_test),
            "stop": central_sel.label,
        }
    )
    comparison.seconds["centralized"] = time.perf_counter() - started
    models: dict[str, HeadModel] = {"centralized": central}
    comparison.selections = {
        **({"frozen": _ridge_selection(frozen_sel)} if frozen_sel else {}),
        **{f"site {i} alone": sel.to_dict() for i, (_, sel) in enumerate(local)},
        "centralized": central_sel.to_dict(),
    }

    arms = _arm_configs(run, federated=federated, privacy=privacy)
    if privacy is not None:
        comparison.privacy = asdict(privacy)
    for key, (label, config) in arms.items():
        started = time.perf_counter()
        arm = federate(
            label=label,
            run_config=config,
            sites=sites,
            home=out_dir / "arms" / key,
            cache_dir=cache_dir,
            echo=echo,
        )
        assert arm.run_dir is not None
        model, selection = select_round(arm.run_dir, arm.model, [s.val for s in splits])
        comparison.seconds[key] = time.perf_counter() - started
        comparison.histories[label] = arm.history
        comparison.selections[label] = selection.to_dict()
        row = {**_row(label, model, pooled_train, pooled_test), "stop": selection.label}
        if arm.privacy:
            row = {"method": label, "epsilon": arm.privacy["epsilon"], **row, **arm.privacy}
        comparison.rows.append(row)
        models[label] = model
    comparison.rows.extend({**r, "method": f"  {r['method']}"} for r in local_rows)

    started = time.perf_counter()
    for i, s in enumerate(splits):
        own = {"this site alone": local[i][0], **models}
        comparison.per_site[f"site {i}"] = {
            method: _row(method, model, s.train, s.test) for method, model in own.items()
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


def replot(out_dir: Path) -> list[Path]:
    """Redraw the figures of ``out_dir``/comparison.json (each partition's first seed), no training."""
    import json

    results = json.loads((out_dir / "comparison.json").read_text(encoding="utf-8"))
    written: list[Path] = []
    seen: set[str] = set()
    for entry in results["comparisons"]:
        scheme = str(entry["run"]["partition"])
        if scheme in seen:
            continue
        seen.add(scheme)
        comparison = Comparison(
            partition=entry["partition"],
            sites=int(results["sites"]),
            rows=entry["rows"],
            histories=entry["histories"],
            per_site=entry["per_site"],
            privacy=entry["privacy_arms"],
            selections=entry.get("selections", {}),
        )
        written += plot_comparison(comparison, out_dir, prefix=scheme)
    return written


def plot_comparison(comparison: Comparison, out_dir: Path, *, prefix: str) -> list[Path]:
    """The comparison's figures in ``out_dir``: metric vs round, per-site bars, utility vs epsilon."""
    from simulations.plots import metric_vs_round, per_site_bars, utility_vs_epsilon

    metric = comparison.primary
    written: list[Path] = []
    if comparison.histories:
        round_metric = _round_metric(comparison.histories, metric)
        written.append(
            metric_vs_round(
                comparison.histories,
                out_dir / f"{prefix}_metric_vs_round.png",
                metric=round_metric,
                title=f"{round_metric} per round ({comparison.partition}, {comparison.sites} sites, "
                "★ kept)",
                chosen={
                    label: int(comparison.selections[label]["chosen"])
                    for label in comparison.histories
                    if label in comparison.selections
                },
            ).path
        )
    if comparison.per_site:
        written.append(
            per_site_bars(
                {
                    s: {m: r.get(metric, math.nan) for m, r in v.items()}
                    for s, v in comparison.per_site.items()
                },
                out_dir / f"{prefix}_per_site.png",
                metric=metric,
                title=f"{metric} on each site's own test half",
            ).path
        )
    series = _epsilon_series(comparison, metric)
    if series:
        frozen = comparison.rows[0].get(metric)
        written.append(
            utility_vs_epsilon(
                series,
                out_dir / f"{prefix}_utility_vs_epsilon.png",
                ylabel=f"{metric} (pooled held-out)",
                references={label: frozen for label in series} if frozen is not None else None,
            ).path
        )
    return written


def _round_metric(histories: Mapping[str, Sequence[Mapping[str, Any]]], metric: str) -> str:
    """The per-round name of ``metric`` (the round evaluation is cheaper: R@5, zs_acc, centroid_acc)."""
    from simulations.plots import round_series

    wanted = {"mean_R@5": "R@5", "mean_R@1": "R@1"}.get(metric, metric)
    available = [m for h in histories.values() for m in round_series(h)[1] if m != "round"]
    return wanted if wanted in available or not available else available[0]


def _epsilon_series(comparison: Comparison, metric: str) -> dict[str, list[Any]]:
    """Each DP arm against its non-private federated baseline (the same loss) at epsilon = inf."""
    from simulations.plots import EpsilonPoint

    by_kind = {str(r["privacy"]): r for r in comparison.rows if r.get("privacy")}
    plain = [
        r for r in comparison.rows if r["method"].startswith("federated") and "privacy" not in r
    ]
    proxy = next((r for r in plain if f"{SAMPLE_DP_LOSS} loss" in r["method"]), None)
    baselines = {
        "sample-level": proxy or (plain[0] if plain else None),
        "client-level": plain[0] if plain else None,
    }
    names = {
        "sample-level": "sample-level DP (ε per example)",
        "client-level": "client-level DP (ε per site)",
    }
    series: dict[str, list[Any]] = {}
    for kind, row in by_kind.items():
        if metric not in row:
            continue
        points = [EpsilonPoint(float(row["epsilon"]), float(row[metric]))]
        base = baselines.get(kind)
        if base is not None and metric in base:
            points.append(EpsilonPoint(math.inf, float(base[metric])))
        series[names[kind]] = points
    return series


# The comparison's run-config defaults, chosen on VALIDATION scores only (README "Should we
# federate?"); --set overrides them.
COMPARISON_DEFAULTS: dict[str, Any] = {}
THRESHOLDS = {"iid": 0.95, "dirichlet": 0.9}  # issue 3: federated / centralized, R@5 and AUROC
CHECKED = ("mean_R@5", "zs_auroc")


def _stats(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    sd = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return {"mean": float(array.mean()), "sd": sd, "n": int(array.size), "values": array.tolist()}


def summarize_seeds(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sd over seeds of each method's metrics, the ratios and the gains (one partition).

    ``thresholds``: for each checked metric, whether the mean ratio and every seed's ratio reach
    issue 3's bar for this partition scheme (0.95x IID, 0.9x otherwise).
    """
    methods: dict[str, dict[str, list[float]]] = {}
    for entry in entries:
        for row in entry["rows"]:
            if row["method"].startswith("  "):
                continue  # the individual sites alone
            for key in (*PRIVACY_COLUMNS, *HEADLINE):
                if key in row:
                    methods.setdefault(row["method"], {}).setdefault(key, []).append(row[key])
    summary: dict[str, Any] = {
        "seeds": [e["run"]["seed"] for e in entries],
        "methods": {m: {k: _stats(v) for k, v in ms.items()} for m, ms in methods.items()},
    }
    ratio_values: dict[str, list[float]] = {}
    gain_values: dict[str, dict[str, list[float]]] = {}
    for entry in entries:
        for k, v in entry["federated_over_centralized"].items():
            ratio_values.setdefault(k, []).append(v)
        for name, values in entry["federated_gains"].items():
            for k, v in values.items():
                gain_values.setdefault(name, {}).setdefault(k, []).append(v)
    summary["federated_over_centralized"] = {k: _stats(v) for k, v in ratio_values.items()}
    summary["federated_gains"] = {
        name: {k: _stats(v) for k, v in values.items()} for name, values in gain_values.items()
    }
    scheme = str(entries[0]["run"]["partition"]) if entries else "iid"
    bar = THRESHOLDS.get(scheme, THRESHOLDS["dirichlet"])
    summary["thresholds"] = {
        k: {
            "bar": bar,
            "mean_holds": bool(np.mean(ratio_values[k]) >= bar),
            "every_seed_holds": bool(min(ratio_values[k]) >= bar),
        }
        for k in CHECKED
        if k in ratio_values
    }
    return summary


def _pm(stats: Mapping[str, Any] | None, digits: int = 3) -> str:
    if stats is None:
        return ""
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def summary_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The multi-seed tables of one partition: methods, then ratios and gains (mean ± sd)."""
    shown = [
        c for c in (*PRIVACY_COLUMNS, *HEADLINE) if any(c in v for v in summary["methods"].values())
    ]
    rows = [
        {"method": m, "seeds": next(iter(v.values()))["n"], **{c: _pm(v.get(c)) for c in shown}}
        for m, v in summary["methods"].items()
    ]
    lines = [format_table(rows, ["method", "seeds", *shown]), ""]
    gains = summary["federated_gains"]
    metrics = list(summary["federated_over_centralized"])
    if metrics:
        table = [
            {
                "metric": k,
                "federated / centralized": _pm(summary["federated_over_centralized"][k]),
                "federated − frozen": _pm(gains.get("minus_frozen", {}).get(k)),
                "federated − site alone (mean)": _pm(gains.get("minus_alone", {}).get(k)),
            }
            for k in metrics
        ]
        lines += [format_table(table, list(table[0])), ""]
    for k, verdict in summary["thresholds"].items():
        lines.append(
            f"- {k}: federated / centralized bar {verdict['bar']}x: mean "
            f"{'holds' if verdict['mean_holds'] else 'NOT met'}, every seed "
            f"{'holds' if verdict['every_seed_holds'] else 'NOT met'}"
        )
    return [*lines, ""]


def run_comparisons(
    *,
    out_dir: Path,
    work_dir: Path,
    sites: int = 4,
    partitions: Sequence[tuple[str, float]] = (("iid", 0.5), ("dirichlet", 0.3)),
    overrides: dict[str, Any] | None = None,
    federated: bool = True,
    privacy: PrivacyArms | None = None,
    seeds: Sequence[int] = (0,),
    dp_seeds: Sequence[int] | None = None,
    echo: bool = False,
) -> dict[str, Any]:
    """One comparison per partition scheme and seed; results JSON, markdown and PNGs in ``out_dir``.

    A seed fixes the data (generation, partition, splits), the heads' initialisation and the
    shuffling of every arm alike. The DP arms run for ``dp_seeds`` (default: every seed). Figures
    are drawn for each partition's first seed. Caches and runs go to ``work_dir``.
    """
    dp_seeds = list(seeds) if dp_seeds is None else list(dp_seeds)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "sites": sites,
        "seeds": list(seeds),
        "selection": SELECTION,
        "comparisons": [],
        "summaries": [],
    }
    markdown = [
        f"# Federated vs centralized vs local ({sites} sites)\n",
        "Each site's held-out split is halved: every trained arm is stopped where its "
        f"validation score ({SELECTION}) is best (each site alone: its own validation half; "
        "centralized: the pooled halves; federated: the round whose checkpoint scores best on "
        "the sites' validation halves) and scored once on the pooled test halves. 'stop' = the "
        "chosen epoch / round out of the budget.\n",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    for scheme, alpha in partitions:
        entries: list[dict[str, Any]] = []
        details: list[str] = []
        for seed in seeds:
            settings = {
                "partition": scheme,
                "alpha": alpha,
                "min-sites": sites,
                **(overrides or {}),
                "seed": seed,
            }
            run = RunSettings.from_run_config(settings)
            comparison = compare(
                run=run,
                sites=sites,
                out_dir=work_dir / scheme / f"seed-{seed}",
                federated=federated,
                privacy=privacy if seed in dp_seeds else None,
                echo=echo,
                cache_dir=work_dir / "cache",
            )
            figures = (
                plot_comparison(comparison, out_dir, prefix=scheme) if seed == seeds[0] else []
            )
            entry = _entry(comparison, run, figures)
            entries.append(entry)
            details += _detail_markdown(comparison, entry, seed, figures)
            results["comparisons"].append(entry)
            summary = {"partition": entries[0]["partition"], **summarize_seeds(entries)}
            shown = ", ".join(str(e["run"]["seed"]) for e in entries)
            section = [f"## partition: {summary['partition']}, mean ± sd over seeds {shown}\n"]
            section += summary_markdown(summary) + details
            # Written after every seed: a long run that stops early keeps what it finished.
            atomic_write_json(
                out_dir / "comparison.json",
                {**results, "summaries": [*results["summaries"], summary]},
            )
            atomic_write_text(
                out_dir / "comparison.md", "\n".join([*markdown, *done, *section]) + "\n"
            )
        results["summaries"].append(summary)
        done += section
    return results


def _entry(comparison: Comparison, run: RunSettings, figures: Sequence[Path]) -> dict[str, Any]:
    return {
        "partition": comparison.partition,
        "run": run.to_dict(),
        "privacy_arms": comparison.privacy,
        "rows": comparison.rows,
        "federated_over_centralized": ratios(comparison),
        "federated_gains": gains(comparison),
        "selections": comparison.selections,
        "per_site": comparison.per_site,
        "histories": comparison.histories,
        "figures": [p.name for p in figures],
        "seconds": comparison.seconds,
    }


def _detail_markdown(
    comparison: Comparison, entry: Mapping[str, Any], seed: int, figures: Sequence[Path]
) -> list[str]:
    lines = [f"### {comparison.partition}, seed {seed}\n", comparison.table(), ""]
    if entry["federated_over_centralized"]:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in entry["federated_over_centralized"].items())
        lines.append(f"federated / centralized: {shown}\n")
    if comparison.has("epsilon"):
        lines.append(_privacy_note(comparison) + "\n")
    if comparison.per_site:
        lines += [
            f"{comparison.primary} on each site's own test half:\n",
            comparison.per_site_table(),
            "",
        ]
    return lines + [f"![{p.stem}]({p.name})" for p in figures] + [""]


def _privacy_note(comparison: Comparison) -> str:
    parts = []
    for row in comparison.rows:
        if row.get("privacy") == "sample-level":
            parts.append(
                f"sample-level: ε={row['epsilon']:.3g} at δ={row['delta']:g} is the largest any site's "
                "Opacus RDP accountant reports for the whole run (one example's influence)"
            )
        elif row.get("privacy") == "client-level":
            parts.append(
                f"client-level: ε={row['epsilon']:.3g} at δ={row['delta']:g} from Flower's RdpAccountant "
                f"after {row['releases']} releases (one whole site's influence, no sampling amplification)"
            )
    return "epsilon: " + "; ".join(parts) + "."


def main(argv: Sequence[str] | None = None) -> None:
    defaults = PrivacyArms()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        default="simulations/results/federated",
        help="results directory (JSON + markdown + PNGs)",
    )
    parser.add_argument(
        "--work", default="runs/experiment", help="caches, site state and Flower runs"
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--n", type=int, default=2000, help="pooled examples")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds (data, init, shuffling); e.g. 0,1,2"
    )
    parser.add_argument(
        "--dp-seeds", default=None, help="seeds that also run the DP arms (default: all --seeds)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run-config overrides for every arm, TOML values as in `flwr run --run-config` "
        f'(strings quoted: loss="supcon"; defaults: {_defaults_text()})',
    )
    parser.add_argument(
        "--partitions",
        default="iid:0.5,dirichlet:0.3",
        help="comma-separated scheme:alpha pairs",
    )
    parser.add_argument(
        "--no-federated", action="store_true", help="skip the Flower runs (baselines only)"
    )
    parser.add_argument("--no-dp", action="store_true", help="skip the two DP arms")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the figures of --out/comparison.json"
    )
    parser.add_argument("--dp-target-epsilon", type=float, default=defaults.target_epsilon)
    parser.add_argument("--dp-delta", type=float, default=defaults.delta)
    parser.add_argument("--dp-max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument(
        "--client-dp-noise-multiplier", type=float, default=defaults.noise_multiplier
    )
    parser.add_argument("--client-dp-clipping-norm", type=float, default=defaults.clipping_norm)
    parser.add_argument("--client-dp-delta", type=float, default=defaults.client_delta)
    args = parser.parse_args(argv)
    if args.replot:
        for path in replot(Path(args.out)):
            print(path)
        return
    overrides = {
        **COMPARISON_DEFAULTS,
        "dataset-n": args.n,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        **parse_run_config(" ".join(args.set), option="--set"),
    }
    seeds = _ints(args.seeds, "--seeds")
    dp_seeds = seeds if args.dp_seeds is None else _ints(args.dp_seeds, "--dp-seeds")
    privacy = (
        None
        if args.no_dp or args.no_federated
        else PrivacyArms(
            target_epsilon=args.dp_target_epsilon,
            delta=args.dp_delta,
            max_grad_norm=args.dp_max_grad_norm,
            noise_multiplier=args.client_dp_noise_multiplier,
            clipping_norm=args.client_dp_clipping_norm,
            client_delta=args.client_dp_delta,
        )
    )
    run_comparisons(
        out_dir=Path(args.out),
        work_dir=Path(args.work),
        sites=args.sites,
        partitions=_partitions(args.partitions),
        overrides=overrides,
        federated=not args.no_federated,
        privacy=privacy,
        seeds=seeds,
        dp_seeds=dp_seeds,
    )
    print((Path(args.out) / "comparison.md").read_text())


def _defaults_text() -> str:
    return " ".join(f"{k}={v}" for k, v in COMPARISON_DEFAULTS.items()) or "none"


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{option}: '{text}' is not a comma-separated list of integers") from exc
    if not values:
        raise ConfigError(f"{option}: no seed given")
    return values


def _partitions(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        scheme, _, alpha = item.strip().partition(":")
        try:
            out.append((scheme, float(alpha or 0.5)))
        except ValueError as exc:
            raise ConfigError(f"--partitions: '{item}' is not scheme:alpha") from exc
    return out


if __name__ == "__main__":
    main()
