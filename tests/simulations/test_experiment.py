"""The comparison end to end (real Flower simulation, Opacus, tiny encoders), its model selection and validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from client.privacy import PrivacyLedger, ledger_path
from common.config import RunSettings
from common.errors import ConfigError
from simulations import experiment
from simulations.experiment import (
    PrivacyArms,
    SiteSplits,
    _arm_configs,
    compare,
    plot_comparison,
    ratios,
    select_best,
    select_round,
    selection_score,
    summarize_seeds,
    train_selected,
)

SITES, ROUNDS, TARGET, SIGMA, CLIP, DELTA = 2, 2, 4.0, 1.5, 0.05, 1e-5


def _run(tiny: dict[str, Path], **extra: Any) -> RunSettings:
    return RunSettings.from_run_config(
        {
            "image-encoder": str(tiny["image"]),
            "text-encoder": str(tiny["text"]),
            "encoder-image-size": 0,
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
    # largest one, which equals an independent RDP computation from the site's own ledger.
    assert set(sample["epsilon_per_site"]) == {"site-0", "site-1"}
    assert sample["epsilon"] == max(sample["epsilon_per_site"].values())
    assert 0.5 * TARGET < sample["epsilon"] <= TARGET
    for name, spent in sample["epsilon_per_site"].items():
        ledger = PrivacyLedger(ledger_path(out / "arms" / "sample-dp" / "sites" / name))
        assert len(ledger.entries()) == ROUNDS
        assert spent == pytest.approx(ledger.epsilon(DELTA), rel=1e-9)
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
    from simulations.plots import round_series

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

    from simulations.experiment import _entry, replot

    replotted = tmp_path / "replot"
    replotted.mkdir()
    entry = _entry(comparison, RunSettings.from_run_config({"partition": "iid"}), [])
    (replotted / "comparison.json").write_text(
        json.dumps({"sites": SITES, "comparisons": [entry]}, default=str)
    )
    assert sorted(p.name for p in replot(replotted)) == sorted(p.name for p in figures)


def test_arms_add_the_proxy_baseline_and_validate_before_running(
    tiny_model_dirs: dict[str, Path],
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
    assert math.isfinite(PrivacyArms().target_epsilon)


def test_frozen_row_of_text_only_data_has_the_probe_and_no_retrieval() -> None:
    import numpy as np

    from common.embedding import EmbeddedDataset
    from simulations.experiment import _row

    rng = np.random.default_rng(0)

    def part(n: int) -> EmbeddedDataset:
        labels = np.arange(n) % 2
        text = rng.normal(size=(n, 8)).astype(np.float32) + 3.0 * labels[:, None]
        return EmbeddedDataset(
            ids=[str(i) for i in range(n)], text=text, labels=labels, class_names=["a", "b"]
        )

    row = _row("frozen", None, part(60), part(30))
    assert row["probe_f1_macro"] > 0.9  # separable classes: the frozen probe finds them
    assert not any(k.startswith("mean_R@") for k in row)  # no image side: no retrieval


def _paired(n: int, seed: int) -> Any:
    """Paired image/text embeddings of 3 classes (text = a noisy linear map of image), with prompts."""
    import numpy as np

    from common.embedding import EmbeddedDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.random.default_rng(99).normal(size=(3, 12))
    image = centres[labels] + rng.normal(size=(n, 12))
    text = image @ np.random.default_rng(98).normal(size=(12, 10)) + rng.normal(size=(n, 10))
    prompts = centres @ np.random.default_rng(98).normal(size=(12, 10))
    return EmbeddedDataset(
        ids=[f"{seed}-{i}" for i in range(n)],
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        labels=labels,
        class_names=["a", "b", "c"],
        prompts=prompts.astype(np.float32),
    )


def _small_run(**extra: Any) -> RunSettings:
    return RunSettings.from_run_config(
        {"head": "small", "local-epochs": 1, "batch-size": 16, "lr": 0.01, **extra}
    )


def test_select_best_is_the_earliest_validation_argmax() -> None:
    assert select_best([0.1, 0.3, 0.3, math.nan, 0.2]) == 2
    assert select_best([math.nan, 0.0]) == 2
    with pytest.raises(ConfigError, match="no validation scores"):
        select_best([])
    with pytest.raises(ConfigError, match="NaN"):
        select_best([math.nan, math.nan])


def test_train_selected_keeps_the_head_of_its_best_validation_step() -> None:
    train, val = _paired(96, 0), _paired(30, 1)
    model, selection = train_selected(_small_run(), train, val, steps=6)
    assert len(selection.scores) == 6 and selection.unit == "epoch"
    assert selection.chosen == select_best(selection.scores)
    # The returned head is the chosen step's, not the last one's: it reproduces that score.
    assert selection_score(model, [val]) == pytest.approx(selection.scores[selection.chosen - 1])
    assert selection.to_dict()["chosen"] == selection.chosen  # 1 local epoch per step


def test_select_round_loads_the_checkpoint_best_on_the_sites_validation(tmp_path: Path) -> None:
    import numpy as np

    from common.artifacts import state_arrays
    from server.checkpoints import RunStore
    from simulations.experiment import _new_model

    run, train = _small_run(), _paired(96, 0)
    vals = [_paired(20, 2), _paired(40, 3)]
    store = RunStore(tmp_path)
    model = _new_model(run, train)
    store.save_checkpoint(0, state_arrays(model), {})  # the initial head is never a candidate
    saved, expected = {}, []
    for server_round in range(1, 5):
        trained, _ = train_selected(_small_run(seed=server_round), train, vals[1], steps=1)
        saved[server_round] = state_arrays(trained)
        store.save_checkpoint(server_round, saved[server_round], {})
        expected.append(selection_score(trained, vals))
    loaded, selection = select_round(tmp_path, _new_model(run, train), vals)
    assert selection.scores == pytest.approx(expected)
    assert selection.chosen == int(np.argmax(expected)) + 1
    for key, value in state_arrays(loaded).items():
        np.testing.assert_array_equal(value, saved[selection.chosen][key])


def test_baselines_never_look_at_the_test_half(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scrambling the test halves changes the scores but not a single stopping point."""
    import numpy as np

    run = _run(tiny_model_dirs, **{"num-server-rounds": 4, "loss": "infonce"})
    first = compare(run=run, sites=SITES, out_dir=tmp_path, federated=False)
    honest = experiment.split_holdout

    def scrambled(site: Any, *, seed: int = experiment.VALIDATION_SEED) -> SiteSplits:
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


def test_summarize_seeds_reports_mean_sd_and_the_issue_bars() -> None:
    import numpy as np

    def entry(seed: int, fed: float, central: float) -> dict[str, Any]:
        rows = [
            {"method": "frozen (+ lstsq)", "mean_R@5": 0.1, "zs_auroc": 0.6},
            {"method": "each site alone (mean)", "mean_R@5": 0.12, "zs_auroc": 0.6},
            {"method": "centralized (pooled)", "mean_R@5": central, "zs_auroc": 0.7},
            {"method": "federated (fedavg, 3 rounds)", "mean_R@5": fed, "zs_auroc": 0.7},
            {"method": "  site 0 alone", "mean_R@5": 0.5},
        ]
        return {
            "run": {"seed": seed, "partition": "iid"},
            "rows": rows,
            "federated_over_centralized": {"mean_R@5": fed / central, "zs_auroc": 1.0},
            "federated_gains": {"minus_frozen": {"mean_R@5": fed - 0.1}},
        }

    summary = summarize_seeds([entry(0, 0.2, 0.2), entry(1, 0.18, 0.2)])
    ratio = summary["federated_over_centralized"]["mean_R@5"]
    assert ratio["mean"] == pytest.approx(0.95) and ratio["n"] == 2
    assert ratio["sd"] == pytest.approx(np.std([1.0, 0.9], ddof=1))
    assert summary["thresholds"]["mean_R@5"] == {
        "bar": 0.95,
        "mean_holds": True,
        "every_seed_holds": False,
    }
    assert "  site 0 alone" not in summary["methods"]
    gain = summary["federated_gains"]["minus_frozen"]["mean_R@5"]
    assert gain["mean"] == pytest.approx(0.09)
