"""The default-vs-frozen runner: paired splits, centralized minus the better frozen row, interval and verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from common.config import RunSettings
from common.errors import ConfigError
from common.evaluation import evaluate_head
from simulations.experiments import default_vs_frozen as dvf
from simulations.experiments.arms import concat_embedded, prepare_sites, split_holdout
from tests.tiny_config import tiny_encoders

SITES, SEEDS = 2, (0, 1)
TINY = dvf.DatasetConfig("digits-tiny", "digits", n=120, note="tiny")


def _overrides(tiny: dict[str, Path]) -> dict[str, Any]:
    return {**tiny_encoders(tiny), "batch-size": 16}


@pytest.fixture(scope="module")
def result(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("default-vs-frozen")
    document = dvf.run_all(
        names=[TINY.name],
        seeds=SEEDS,
        out_dir=out,
        cache_dir=out / "cache",
        sites=SITES,
        rounds=2,
        local_epochs=1,
        overrides=_overrides(tiny_model_dirs),
        configs={TINY.name: TINY},
        echo=False,
        rules=True,
    )
    return document, out


def test_difference_is_centralized_minus_the_better_frozen_row(result: Any) -> None:
    document, _ = result
    entries = document["datasets"][TINY.name]["seeds"]
    assert [e["seed"] for e in entries] == list(SEEDS)
    for entry in entries:
        # the default head: the run-config defaults, not a test preset
        assert (entry["head"], entry["loss"]) == (RunSettings().head, RunSettings().loss)
        methods = [r["method"] for r in entry["frozen"]]
        assert any("cca" in m for m in methods) and any("lstsq" in m for m in methods)
        # paired digits data: every issue-15 metric is checked
        assert set(entry["difference"]) == set(dvf.CHECKED)
        for metric, diff in entry["difference"].items():
            best = max(r[metric] for r in entry["frozen"] if metric in r)
            assert entry["best_frozen"][metric]["value"] == best
            assert diff == pytest.approx(entry["centralized"][metric] - best, abs=1e-12)
            winners = [r["method"] for r in entry["frozen"] if r.get(metric) == best]
            assert entry["best_frozen"][metric]["from"] == winners


def test_each_selection_rule_scores_a_step_of_the_same_trajectory(result: Any) -> None:
    """The default rule keeps the step the centralized row reports, with the same differences;
    "start only" keeps step 0; the summary and the report carry every rule."""
    from simulations.experiments.selection_rules import ONE_SE, ORACLE, RULES

    document, out = result
    default = next(r for r in RULES if "(default)" in r)
    for entry in document["datasets"][TINY.name]["seeds"]:
        rules = entry["rules"]
        assert set(rules) == {*RULES, ONE_SE, ORACLE}
        selection = entry["selections"]["centralized"]
        assert rules[default]["step"] == selection["chosen"]  # epochs trained = 0-based step
        assert rules[default]["difference"] == pytest.approx(entry["difference"])
        assert rules["start only"]["step"] == 0
        assert all(0 <= r["step"] < len(selection["validation_scores"]) for r in rules.values())
    summary = document["datasets"][TINY.name]["summary"]["rules"]
    assert set(summary) == {*RULES, ONE_SE, ORACLE}
    assert "Selection rules on the same trajectories" in (out / "default_vs_frozen.md").read_text()


def test_both_sides_are_scored_on_the_same_test_rows(
    result: Any, tiny_model_dirs: dict[str, Path]
) -> None:
    """Rebuild seed 1's split independently: same test rows, and the CV-tuned frozen rows agree."""
    document, out = result
    entry = document["datasets"][TINY.name]["seeds"][1]
    run = RunSettings.from_run_config(
        {**TINY.run_config(), **_overrides(tiny_model_dirs), "min-sites": SITES, "seed": 1}
    )
    splits = [split_holdout(s) for s in prepare_sites(run, SITES, cache_dir=out / "cache")]
    train = concat_embedded([s.train for s in splits])
    test = concat_embedded([s.test for s in splits])
    assert entry["test_ids_sha256"] == dvf.ids_digest(test)
    assert entry["sizes"]["test"] == len(test) and entry["sizes"]["train"] == len(train)
    report = evaluate_head(None, train, test, alignments=("cca",))
    cca = next(
        r for r in entry["frozen"] if r["method"].startswith("frozen + cca (ridge by 3-fold")
    )
    for metric in ("mean_R@5", "zs_auroc"):
        assert cca[metric] == pytest.approx(report.row("frozen+cca")[metric], abs=1e-9)
    assert cca["probe_f1_macro"] == pytest.approx(report.row("frozen")["probe_f1_macro"])
    # seed 0 and seed 1 are different data splits, each paired within itself
    assert (
        document["datasets"][TINY.name]["seeds"][0]["test_ids_sha256"] != entry["test_ids_sha256"]
    )


def test_summary_mean_interval_and_verdict_from_the_seeds(result: Any) -> None:
    document, out = result
    summary = document["datasets"][TINY.name]["summary"]
    entries = document["datasets"][TINY.name]["seeds"]
    for metric, s in summary["metrics"].items():
        diffs = np.array([e["difference"][metric] for e in entries])
        d = s["difference"]
        assert d["values"] == pytest.approx(diffs.tolist())
        assert d["mean"] == pytest.approx(diffs.mean())
        half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        assert d["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
        assert not d["bar_met"]  # two seeds never meet a bar that needs five
        # against one tuning's rows alone: the better of its lstsq and CCA (or the probe)
        for tuning, mark in (("validation", "ridge on validation"), ("cv", "3-fold CV")):
            expected = [
                e["centralized"][metric]
                - max(r[metric] for r in e["frozen"] if mark in r["method"] and metric in r)
                for e in entries
            ]
            assert summary["by_tuning"][tuning][metric]["values"] == pytest.approx(expected)
    written = json.loads((out / f"{dvf.RESULT_NAME}.json").read_text())
    assert written["datasets"][TINY.name]["summary"] == summary  # what was run is what is written
    assert "digits-tiny" in (out / f"{dvf.RESULT_NAME}.md").read_text()


@pytest.mark.parametrize(
    ("values", "holds", "bar_met"),
    [
        ([0.01, 0.0, 0.02, -0.01, 0.005], True, True),  # mean > 0
        ([-0.01, 0.004, -0.008, 0.006, -0.007], True, True),  # mean -0.003, CI spans 0
        ([-0.003, -0.0031, -0.0029, -0.003, -0.003], False, False),  # mean -0.003, CI below 0
        ([-0.02, 0.01, -0.03, 0.0, -0.01], False, False),  # mean -0.01 < -0.005
        ([0.01, 0.02], True, False),  # holds, but on two seeds
    ],
)
def test_verdict_applies_the_issue_bar(values: list[float], holds: bool, bar_met: bool) -> None:
    v = dvf.verdict(values)
    assert (v["holds"], v["bar_met"]) == (holds, bar_met)
    assert v["mean"] == pytest.approx(np.mean(values))


def test_merge_pools_the_seeds_of_a_dataset_run_in_several_sittings(
    result: Any, tmp_path: Path
) -> None:
    document, _ = result
    entries = document["datasets"][TINY.name]["seeds"]
    for i, entry in enumerate(entries):
        part = json.loads(json.dumps(document))
        part["datasets"][TINY.name]["seeds"] = [entry]
        (tmp_path / f"part-{i}").mkdir()
        (tmp_path / f"part-{i}" / "default_vs_frozen.json").write_text(json.dumps(part))
    merged = dvf.merge(
        [tmp_path / f"part-{i}" for i in reversed(range(len(entries)))], out_dir=tmp_path / "all"
    )
    pooled = merged["datasets"][TINY.name]
    assert [e["seed"] for e in pooled["seeds"]] == list(SEEDS)
    assert json.dumps(pooled["summary"], sort_keys=True) == json.dumps(
        json.loads(json.dumps(document["datasets"][TINY.name]["summary"])), sort_keys=True
    )


def test_the_federated_arm_is_a_flower_run_scored_against_the_same_frozen_rows(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, result: Any
) -> None:
    """--arm federated: the head is the federation's checkpoint chosen on the sites' validation
    halves, compared with the frozen rows of the same splits; the partition is the run's; the
    report says which arm it scored; a centralized and a federated run do not merge."""
    out = tmp_path / "federated"
    document = dvf.run_all(
        names=[TINY.name],
        seeds=(0,),
        out_dir=out,
        cache_dir=tmp_path / "cache",
        sites=SITES,
        rounds=2,
        local_epochs=1,
        overrides={**_overrides(tiny_model_dirs), "partition": "dirichlet", "alpha": 0.3},
        configs={TINY.name: TINY},
        echo=False,
        arm="federated",
    )
    assert (document["settings"]["arm"], document["settings"]["partition"]) == (
        "federated",
        "dirichlet(alpha=0.3)",
    )
    (entry,) = document["datasets"][TINY.name]["seeds"]
    assert "centralized" not in entry and entry["run"]["partition"] == "dirichlet"
    selection = entry["selections"]["federated"]
    assert len(selection["validation_scores"]) == 2  # one checkpoint per round
    assert entry["federated"]["stop"].startswith("round ")
    for metric, diff in entry["difference"].items():
        best = entry["best_frozen"][metric]["value"]
        assert diff == pytest.approx(entry["federated"][metric] - best, abs=1e-12)
    # the Flower run happened: its checkpoints are where the selection read them
    (home,) = (tmp_path / "arms").glob(f"dirichlet(alpha=0.3)-*/{TINY.name}/seed-0")
    assert list(home.rglob("round-*"))
    summary = document["datasets"][TINY.name]["summary"]["metrics"]["mean_R@5"]
    assert summary["federated_mean"] == pytest.approx(entry["federated"]["mean_R@5"])
    report = (out / f"{dvf.RESULT_NAME}.md").read_text()
    assert "# Default federated head" in report and "dirichlet(alpha=0.3) partition" in report
    _, centralized_out = result
    with pytest.raises(ConfigError, match="different arms or partitions do not pool"):
        dvf.merge([centralized_out, out], out_dir=tmp_path / "merged")
    relabelled = json.loads((centralized_out / f"{dvf.RESULT_NAME}.json").read_text())
    relabelled["settings"]["arm"] = "federated"  # the same partition, another arm
    (tmp_path / "relabelled").mkdir()
    (tmp_path / "relabelled" / f"{dvf.RESULT_NAME}.json").write_text(json.dumps(relabelled))
    with pytest.raises(ConfigError, match="different arms or partitions do not pool"):
        dvf.merge([centralized_out, tmp_path / "relabelled"], out_dir=tmp_path / "merged")
    with pytest.raises(ConfigError, match="use --arm centralized"):
        dvf.run_seed(
            TINY,
            seed=0,
            sites=SITES,
            rounds=1,
            local_epochs=1,
            cache_dir=tmp_path / "cache",
            rules=True,
            arm="federated",
        )
