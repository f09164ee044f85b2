"""Should we federate? Frozen vs each site alone vs centralized vs federated (with and without DP), same splits, same evaluation."""

from __future__ import annotations

import argparse
import math
import os
import platform
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
from common.evaluation import evaluate_head
from common.heads import HEAD_PRESETS
from common.metrics import format_table
from common.pipeline import SiteData, prepare_site_data
from common.training import HeadModel, TrainConfig, build_head_model, train_head

HEADLINE = ("mean_R@1", "mean_R@5", "mean_R@10", "zs_acc", "zs_auroc", "probe_f1_macro")
# The metric a figure shows: the first of these the rows have (paired data: retrieval).
PRIMARY = ("mean_R@5", "probe_f1_macro", "zs_acc")
PRIVACY_COLUMNS = ("epsilon",)  # delta is in the note under the table
# Datasets whose coordinator-held evaluation set (another seed of the generator) shares no example
# with the sites' data; for the others the round curves come from the sites' own held-out splits.
DISJOINT_SERVER_EVAL = ("synthetic-radiology",)
SAMPLE_DP_LOSS = "proxy"  # the decomposable loss: the only one DP-SGD's guarantee holds for


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
    site, each method's metrics on that site's own held-out split.
    """

    partition: str
    sites: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_site: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None

    def table(self) -> str:
        shown = [*PRIVACY_COLUMNS, *HEADLINE]
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


def _train(run: RunSettings, data: EmbeddedDataset, *, epochs: int) -> HeadModel:
    model = build_head_model(
        dims=data.dims,
        head_config=HEAD_PRESETS[run.head],
        layout=run.layout,
        loss=run.loss,
        num_classes=data.num_classes or None,
        seed=run.seed,
    )
    config = TrainConfig(
        loss=run.loss, epochs=epochs, batch_size=run.batch_size, lr=run.lr, seed=run.seed
    )
    train_head(model, data, config)
    return model


def _row(
    method: str, model: HeadModel | None, train: EmbeddedDataset, test: EmbeddedDataset
) -> dict[str, Any]:
    report = evaluate_head(model, train, test)
    if model is not None:
        source = report.row("projected")
    else:  # paired data also has the closed-form aligned row; label-only data has just "frozen"
        rows = {r["embeddings"]: r for r in report.rows}
        source = {**rows.get("frozen+lstsq", {}), **rows["frozen"]}
    return {"method": method, **{k: v for k, v in source.items() if k in HEADLINE}}


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
    return FederatedArm(label, model, fed.history, privacy)


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
) -> Comparison:
    """Run every method on the run's dataset split over ``sites`` sites (partition from ``run``).

    ``privacy`` adds the two DP arms (and, when the run's loss is not the proxy loss, the
    non-private federated proxy-loss run the sample-level arm must be read against).
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
    cache_dir = out_dir / "cache"
    site_data = prepare_sites(run, sites, cache_dir=cache_dir)
    comparison.seconds["embedding"] = time.perf_counter() - started
    pooled_train = concat_embedded([s.train for s in site_data])
    pooled_test = concat_embedded([s.test for s in site_data])
    epochs = run.num_server_rounds * run.local_epochs
    comparison.rows.append(
        _row("frozen (+ closed-form lstsq alignment)", None, pooled_train, pooled_test)
    )

    started = time.perf_counter()
    local_models = [_train(run, s.train, epochs=epochs) for s in site_data]
    local_rows = [
        _row(f"site {i} alone", m, s.train, pooled_test)
        for i, (m, s) in enumerate(zip(local_models, site_data, strict=True))
    ]
    comparison.seconds["local"] = time.perf_counter() - started
    average: dict[str, Any] = {"method": "each site alone (mean)"}
    for key in HEADLINE:
        values = [r[key] for r in local_rows if key in r]
        if values:
            average[key] = float(np.mean(values))
    comparison.rows.append(average)

    started = time.perf_counter()
    central = _train(run, pooled_train, epochs=epochs)
    comparison.rows.append(
        _row("centralized (pooled, upper bound)", central, pooled_train, pooled_test)
    )
    comparison.seconds["centralized"] = time.perf_counter() - started
    models: dict[str, HeadModel] = {"centralized": central}

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
        comparison.seconds[key] = time.perf_counter() - started
        comparison.histories[label] = arm.history
        row = _row(label, arm.model, pooled_train, pooled_test)
        if arm.privacy:
            row = {"method": label, "epsilon": arm.privacy["epsilon"], **row, **arm.privacy}
        comparison.rows.append(row)
        models[label] = arm.model
    comparison.rows.extend({**r, "method": f"  {r['method']}"} for r in local_rows)

    started = time.perf_counter()
    for i, s in enumerate(site_data):
        own = {"this site alone": local_models[i], **models}
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


def ratios(comparison: Comparison) -> dict[str, float]:
    """Federated / centralized for each headline metric (the issue's acceptance ratios)."""
    rows = {r["method"].strip().split(" (")[0]: r for r in comparison.rows}
    if "federated" not in rows:
        return {}
    fed, central = rows["federated"], rows["centralized"]
    return {
        k: fed[k] / central[k] for k in HEADLINE if k in fed and k in central and central[k] > 0
    }


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
                title=f"{round_metric} per round ({comparison.partition}, {comparison.sites} sites)",
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


def run_comparisons(
    *,
    out_dir: Path,
    work_dir: Path,
    sites: int = 4,
    partitions: Sequence[tuple[str, float]] = (("iid", 0.5), ("dirichlet", 0.3)),
    overrides: dict[str, Any] | None = None,
    federated: bool = True,
    privacy: PrivacyArms | None = None,
    echo: bool = False,
) -> dict[str, Any]:
    """One comparison per partition scheme; results JSON, markdown and PNGs in ``out_dir``, caches and runs in ``work_dir``."""
    results: dict[str, Any] = {"machine": _machine(), "sites": sites, "comparisons": []}
    markdown = [f"# Federated vs centralized vs local ({sites} sites)\n"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for scheme, alpha in partitions:
        settings = {"partition": scheme, "alpha": alpha, "min-sites": sites, **(overrides or {})}
        run = RunSettings.from_run_config(settings)
        comparison = compare(
            run=run,
            sites=sites,
            out_dir=work_dir / scheme,
            federated=federated,
            privacy=privacy,
            echo=echo,
        )
        figures = plot_comparison(comparison, out_dir, prefix=scheme)
        entry: dict[str, Any] = {
            "partition": comparison.partition,
            "run": run.to_dict(),
            "privacy_arms": comparison.privacy,
            "rows": comparison.rows,
            "federated_over_centralized": ratios(comparison),
            "per_site": comparison.per_site,
            "histories": comparison.histories,
            "figures": [p.name for p in figures],
            "seconds": comparison.seconds,
        }
        results["comparisons"].append(entry)
        markdown += [f"## partition: {comparison.partition}\n", comparison.table(), ""]
        if entry["federated_over_centralized"]:
            shown = ", ".join(
                f"{k} {v:.3f}" for k, v in entry["federated_over_centralized"].items()
            )
            markdown.append(f"federated / centralized: {shown}\n")
        if comparison.has("epsilon"):
            markdown.append(_privacy_note(comparison) + "\n")
        if comparison.per_site:
            markdown += [
                f"{comparison.primary} on each site's own held-out split:\n",
                comparison.per_site_table(),
                "",
            ]
        markdown += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    atomic_write_json(out_dir / "comparison.json", results)
    atomic_write_text(out_dir / "comparison.md", "\n".join(markdown) + "\n")
    return results


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


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


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
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument(
        "--partitions",
        default="iid:0.5,dirichlet:0.3",
        help="comma-separated scheme:alpha pairs",
    )
    parser.add_argument(
        "--no-federated", action="store_true", help="skip the Flower runs (baselines only)"
    )
    parser.add_argument("--no-dp", action="store_true", help="skip the two DP arms")
    parser.add_argument("--dp-target-epsilon", type=float, default=defaults.target_epsilon)
    parser.add_argument("--dp-delta", type=float, default=defaults.delta)
    parser.add_argument("--dp-max-grad-norm", type=float, default=defaults.max_grad_norm)
    parser.add_argument(
        "--client-dp-noise-multiplier", type=float, default=defaults.noise_multiplier
    )
    parser.add_argument("--client-dp-clipping-norm", type=float, default=defaults.clipping_norm)
    parser.add_argument("--client-dp-delta", type=float, default=defaults.client_delta)
    args = parser.parse_args(argv)
    overrides = {
        "dataset-n": args.n,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
    }
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
    )
    print((Path(args.out) / "comparison.md").read_text())


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
