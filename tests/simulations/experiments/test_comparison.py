"""The comparison end to end (real Flower simulation, Opacus, tiny encoders), its model selection and validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from client.privacy import PrivacyLedger, ledger_path
from common.config import RunSettings
from common.errors import ConfigError
from simulations.experiments import arms, comparison_runs
from simulations.experiments import comparison as experiment
from simulations.experiments.arms import SiteSplits, select_best
from simulations.experiments.comparison import PrivacyArms, _arm_configs, compare, ratios
from simulations.experiments.comparison_figures import plot_comparison
from tests.dp_reference import ledger_reference_epsilon
from tests.simulations.site_files import write_site
from tests.tiny_config import tiny_encoders

SITES, ROUNDS, TARGET, SIGMA, CLIP, DELTA = 2, 2, 4.0, 1.5, 0.05, 1e-5


def _run(tiny: dict[str, Path], **extra: Any) -> RunSettings:
    return RunSettings.from_run_config(
        {
            **tiny_encoders(tiny),
            "dataset-n": 120,
            "server-eval-n": 40,
            "local-epochs": 1,
            "batch-size": 16,
            "head": "small",
            "loss": "proxy",
            "min-sites": SITES,
            "num-server-rounds": ROUNDS,
            **extra,
        }
    )


def _rdp_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Independent RDP of ``releases`` Gaussian mechanisms (no sampling), Opacus' conversion."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, releases)]
    return float(accountant.get_epsilon(delta=delta))


@pytest.fixture(scope="module")
def with_dp(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("comparison")
    arms = PrivacyArms(
        target_epsilon=TARGET, delta=DELTA, noise_multiplier=SIGMA, clipping_norm=CLIP
    )
    return compare(run=_run(tiny_model_dirs), sites=SITES, out_dir=out, privacy=arms), out


@pytest.mark.slow
def test_dp_arms_report_the_epsilon_their_accountants_spent(with_dp: tuple[Any, Path]) -> None:
    comparison, out = with_dp
    rows = {r["method"].strip(): r for r in comparison.rows}
    (sample,) = [r for r in comparison.rows if r.get("privacy") == "sample-level"]
    (client,) = [r for r in comparison.rows if r.get("privacy") == "client-level"]
    # Sample-level: every site's accountant stays within the stated target, and the row shows the
    # largest one, which equals an independent computation from the site's own ledger by its
    # accountant (dp-accountant: PLD by default).
    assert set(sample["epsilon_per_site"]) == {"site-0", "site-1"}
    assert sample["epsilon"] == max(sample["epsilon_per_site"].values())
    assert 0.5 * TARGET < sample["epsilon"] <= TARGET
    for name, spent in sample["epsilon_per_site"].items():
        ledger = PrivacyLedger(ledger_path(out / "arms" / "sample-dp" / "sites" / name))
        assert len(ledger.entries()) == ROUNDS
        reference = ledger_reference_epsilon(ledger.path, DELTA)  # a second library
        assert spent == pytest.approx(reference.pld, rel=1e-6)
    # Client-level: Flower's RDP accountant after one release per round, as the history says.
    assert client["releases"] == ROUNDS and client["delta"] == DELTA
    assert client["epsilon"] == pytest.approx(_rdp_epsilon(SIGMA, ROUNDS, DELTA), rel=1e-6)
    # Same evaluation as the other rows: the same headline metrics, non-DP rows carry no epsilon.
    federated = next(r for m, r in rows.items() if m.startswith("federated (fedavg"))
    assert "epsilon" not in federated
    for row in (sample, client):
        assert {"mean_R@5", "zs_acc", "probe_f1_macro"} <= set(row)
    # Every federated arm (DP ones included) is stopped at its best-validation round.
    for label in comparison.histories:
        selection = comparison.selections[label]
        assert selection["unit"] == "round" and selection["budget"] == ROUNDS
        assert selection["chosen"] == select_best(selection["validation_scores"])
        assert rows[label.strip()]["stop"] == f"round {selection['chosen']}/{ROUNDS}"
    # The frozen row's ridge is chosen on validation too; the JSON names the ridge, not its index.
    frozen = comparison.selections["frozen"]
    assert frozen["chosen"] == frozen["ridges"][select_best(frozen["validation_scores"]) - 1]
    assert rows["frozen (+ closed-form lstsq alignment)"]["stop"] == f"ridge {frozen['chosen']:g}"
    assert ratios(comparison)  # the plain federated row is still the one ratios use
    assert comparison.table().splitlines()[0].split("|")[2].strip() == "epsilon"


@pytest.mark.slow
def test_histories_per_site_and_figures(with_dp: tuple[Any, Path], tmp_path: Path) -> None:
    comparison, _ = with_dp
    labels = list(comparison.histories)
    assert len(labels) == 3  # loss is already proxy: no extra no-DP proxy baseline arm
    for history in comparison.histories.values():
        assert [e["round"] for e in history] == list(range(1, ROUNDS + 1))
        # server evaluation was switched on for synthetic data (disjoint coordinator set)
        assert all("server-R@5" in e["server_metrics"] for e in history)
    assert set(comparison.per_site) == {"site 0", "site 1"}
    for per_method in comparison.per_site.values():
        assert list(per_method)[:2] == ["this site alone", "centralized"]
        assert set(labels) <= set(per_method)
    from simulations.experiments.plots import round_series

    figures = plot_comparison(comparison, tmp_path, prefix="iid")
    assert sorted(p.name for p in figures) == [
        "iid_metric_vs_round.png",
        "iid_per_site.png",
        "iid_utility_vs_epsilon.png",
    ]
    for path in figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(round_series(h)[0] == "server" for h in comparison.histories.values())
    # --replot redraws the same figures from the results JSON alone (no training).
    import json

    from simulations.experiments.comparison_runs import _entry, replot

    replotted = tmp_path / "replot"
    replotted.mkdir()
    entry = _entry(comparison, RunSettings.from_run_config({"partition": "iid"}), [])
    (replotted / "comparison.json").write_text(
        json.dumps({"sites": SITES, "comparisons": [entry]}, default=str)
    )
    assert sorted(p.name for p in replot(replotted)) == sorted(p.name for p in figures)


def test_arms_add_the_proxy_baseline_and_validate_before_running(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    arms = PrivacyArms()
    infonce = _arm_configs(_run(tiny_model_dirs, loss="infonce"), federated=True, privacy=arms)
    assert list(infonce) == ["federated", "federated-proxy", "sample-dp", "client-dp"]
    assert infonce["sample-dp"][1]["loss"] == "proxy"
    assert infonce["sample-dp"][1]["dp-target-epsilon"] == arms.target_epsilon
    assert infonce["client-dp"][1]["loss"] == "infonce"  # client-level DP holds for any loss
    assert all(c["server-eval"] == "synthetic-radiology" for _, c in infonce.values())
    assert list(_arm_configs(_run(tiny_model_dirs), federated=True, privacy=None)) == ["federated"]
    with pytest.raises(ConfigError, match="client-dp needs strategy"):
        _arm_configs(_run(tiny_model_dirs, strategy="fedadam"), federated=True, privacy=arms)
    with pytest.raises(ConfigError, match="dp-delta"):
        _arm_configs(_run(tiny_model_dirs), federated=True, privacy=PrivacyArms(delta=2.0))
    with pytest.raises(ConfigError, match="federated"):
        _arm_configs(_run(tiny_model_dirs), federated=False, privacy=arms)
    manifest = write_site(tmp_path / "site.csv", 6)  # labelled, no .classes.json
    on_manifest = _run(tiny_model_dirs, dataset=str(manifest))
    with pytest.raises(ConfigError, match=r"sample-level DP needs the classes declared"):
        _arm_configs(on_manifest, federated=True, privacy=arms)
    assert list(_arm_configs(on_manifest, federated=True, privacy=None)) == ["federated"]
    assert math.isfinite(PrivacyArms().target_epsilon)


def test_baselines_never_look_at_the_test_half(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scrambling the test halves changes the scores but not a single stopping point."""
    import numpy as np

    run = _run(tiny_model_dirs, **{"num-server-rounds": 4, "loss": "infonce"})
    first = compare(run=run, sites=SITES, out_dir=tmp_path, federated=False)
    honest = experiment.split_holdout

    def scrambled(site: Any, *, seed: int = arms.VALIDATION_SEED) -> SiteSplits:
        splits = honest(site, seed=seed)
        rng = np.random.default_rng(7)
        test = splits.test.subset(np.arange(len(splits.test)))
        assert test.image is not None and test.text is not None
        test.image = rng.normal(size=test.image.shape).astype(np.float32)
        test.text = rng.permutation(test.text)
        return SiteSplits(splits.train, splits.val, test)

    monkeypatch.setattr(experiment, "split_holdout", scrambled)
    second = compare(run=run, sites=SITES, out_dir=tmp_path, federated=False)
    assert first.selections == second.selections
    assert set(first.selections) == {"frozen", "site 0 alone", "site 1 alone", "centralized"}
    assert [r.get("stop") for r in first.rows] == [r.get("stop") for r in second.rows]
    assert [r.get("mean_R@5") for r in first.rows] != [r.get("mean_R@5") for r in second.rows]


def _results(
    seeds: list[int],
    *,
    ratio: float = 0.9,
    partition: str = "iid",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    entries = []
    for seed in seeds:
        settings = {"partition": partition, **(config or {}), "seed": seed}
        run = RunSettings.from_run_config(settings)
        central = {"method": "centralized", "mean_R@5": 0.3, "zs_auroc": 0.8}
        fed = {"method": "federated", "mean_R@5": 0.3 * ratio, "zs_auroc": 0.8}
        entries.append(
            {
                "partition": partition,
                "run": run.to_dict(),
                "rows": [central, fed],
                "federated_over_centralized": {"mean_R@5": ratio, "zs_auroc": 1.0},
                "federated_gains": {},
            }
        )
    return {"sites": 4, "selection": "mean", "machine": {}, "comparisons": entries}


def test_merge_reports_the_seeds_of_separate_runs_as_one_experiment(tmp_path: Path) -> None:
    import json

    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    for path, results in ((first, _results([0, 1], ratio=0.9)), (second, _results([2], ratio=1.0))):
        path.mkdir()
        (path / "comparison.json").write_text(json.dumps(results))
    comparison_runs.main(["--merge", str(second), str(first), "--out", str(out)])
    merged = json.loads((out / "comparison.json").read_text())
    assert merged["seeds"] == [0, 1, 2] and merged["merged_from"] == [str(second), str(first)]
    (summary,) = merged["summaries"]
    assert summary["seeds"] == [0, 1, 2]  # sorted, whichever run held them
    ratio = summary["federated_over_centralized"]["mean_R@5"]
    assert ratio["mean"] == pytest.approx(2.8 / 3) and ratio["n"] == 3
    text = (out / "comparison.md").read_text()
    assert "mean ± sd over seeds 0, 1, 2" in text
    assert (
        f"- seed 2: federated / centralized mean_R@5 1.000, zs_auroc 1.000 (tables: {second}"
        in text
    )


def test_merge_refuses_runs_that_are_not_one_experiment(tmp_path: Path) -> None:
    import json

    def source(name: str, results: dict[str, Any] | str) -> Path:
        path = tmp_path / name
        path.mkdir()
        text = results if isinstance(results, str) else json.dumps(results)
        (path / "comparison.json").write_text(text)
        return path

    base = source("base", _results([0, 1]))
    again = source("again", _results([1]))
    with pytest.raises(ConfigError, match=r"again/comparison.json: iid seed 1 is also in .*base"):
        comparison_runs.merge_comparisons([base, again], out_dir=tmp_path / "out")
    other = source("other", _results([2], config={"local-epochs": 2}))
    with pytest.raises(ConfigError, match=r"seed 2 has run-config local_epochs=2, .*base.* has 5"):
        comparison_runs.merge_comparisons([base, other], out_dir=tmp_path / "out")
    # the partition scheme may differ between entries, nothing else may
    skewed = source("skewed", _results([0], partition="dirichlet", config={"local-epochs": 2}))
    with pytest.raises(ConfigError, match=r"dirichlet seed 0 has run-config local_epochs=2"):
        comparison_runs.merge_comparisons([base, skewed], out_dir=tmp_path / "out")
    torn = source("torn", '{"comparisons": [')
    with pytest.raises(ConfigError, match=r"torn/comparison.json: not a readable comparison"):
        comparison_runs.merge_comparisons([base, torn], out_dir=tmp_path / "out")
    broken = _results([3])
    del broken["comparisons"][0]["rows"]
    with pytest.raises(ConfigError, match=r"broken/comparison.json: not a readable comparison"):
        comparison_runs.merge_comparisons(
            [base, source("broken", broken)], out_dir=tmp_path / "out"
        )
    with pytest.raises(ConfigError, match=r"--out .*base is one of the sources"):
        comparison_runs.merge_comparisons([base, again], out_dir=base)
    with pytest.raises(
        ConfigError, match=r"--merge: name the merged report's directory with --out"
    ):
        comparison_runs.main(["--merge", str(base)])  # never onto the committed default report
    assert not (tmp_path / "out").exists()  # nothing written when a source is refused
