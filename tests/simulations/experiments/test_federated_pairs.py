"""Two federations' comparison_runs results compared seed by seed (federated_pairs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from simulations.experiments.federated_pairs import main


def _entry(seed: int, *, scores: list[float], r5: float, pooled_r5: float = 0.3) -> dict[str, Any]:
    metrics = {"mean_R@5": r5, "zs_auroc": 0.8}
    return {
        "partition": "dirichlet(alpha=0.3)",
        "run": {"seed": seed, "ntd_beta": 0.0},
        "rows": [
            {"method": "frozen (+ closed-form lstsq alignment)", "mean_R@5": 0.2, "zs_auroc": 0.7},
            {"method": "centralized (pooled, upper bound)", "mean_R@5": pooled_r5, "zs_auroc": 0.9},
            {"method": "federated (fedavg, 30 rounds)", **metrics},
        ],
        "selections": {"federated (fedavg, 30 rounds)": {"validation_scores": scores}},
        "seconds": {"federated": 100.0},
    }


def _write(directory: Path, entries: list[dict[str, Any]], beta: float) -> Path:
    directory.mkdir()
    for entry in entries:
        entry["run"]["ntd_beta"] = beta
    (directory / "comparison.json").write_text(json.dumps({"comparisons": entries}))
    return directory


def test_differences_are_paired_by_seed_with_the_late_rounds_and_ratios(tmp_path: Path) -> None:
    late = [0.5] * 10
    base = _write(
        tmp_path / "base",
        [_entry(s, scores=[0.4, 0.6, *late, 0.5], r5=0.24) for s in (0, 1, 2)],
        0.0,
    )
    other = _write(
        tmp_path / "ntd",
        [_entry(s, scores=[0.4, 0.6 + 0.01 * s, *late, 0.6], r5=0.27) for s in (1, 2, 3)],
        1.0,
    )
    main(["--runs", f"base={base}", f"ntd={other}", "--out", str(tmp_path / "out")])
    document = json.loads((tmp_path / "out" / "federated_pairs.json").read_text())
    result = document["comparisons"]["ntd"]["dirichlet(alpha=0.3)"]
    assert result["seeds"] == [1, 2]  # only the seeds both runs hold
    assert result["settings"] == "ntd_beta=1.0 (reference 0.0)"
    differences = result["differences"]
    assert differences["validation best"]["values"] == pytest.approx([0.01, 0.02])
    assert differences["validation late mean"]["values"] == pytest.approx([0.1 / 3] * 2)
    assert differences["test mean_R@5"]["values"] == pytest.approx([0.03, 0.03])
    assert differences["federated / pooled mean_R@5"]["mean"] == pytest.approx(0.1)
    assert differences["validation best"]["higher"] == 2
    assert not result["unchanged_arms_differ"]
    assert "| validation best" in (tmp_path / "out" / "federated_pairs.md").read_text()


def test_runs_whose_pooled_arms_differ_are_reported_as_not_paired(tmp_path: Path) -> None:
    base = _write(tmp_path / "a", [_entry(0, scores=[0.5, 0.6], r5=0.2)], 0.0)
    other = _write(tmp_path / "b", [_entry(0, scores=[0.5, 0.6], r5=0.2, pooled_r5=0.31)], 1.0)
    main(["--runs", f"a={base}", f"b={other}", "--out", str(tmp_path / "out")])
    markdown = (tmp_path / "out" / "federated_pairs.md").read_text()
    assert "NOT PAIRED: arms the change cannot touch differ: seed 0: centralized" in markdown


def test_a_missing_directory_or_a_lone_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere/comparison.json does not exist"):
        main(["--runs", "a=nowhere", "b=nowhere", "--out", str(tmp_path)])
    base = _write(tmp_path / "a", [_entry(0, scores=[0.5], r5=0.2)], 0.0)
    with pytest.raises(ConfigError, match="at least one other run"):
        main(["--runs", f"a={base}", "--out", str(tmp_path / "out")])
