"""The objective comparison: the choice is made on the kept states' validation metrics, paired by
seed; the test verdicts are reported beside it, never used for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from simulations.experiments.objective_choice import compare_runs, kept_state, main
from simulations.experiments.selection_rules import DEFAULT


def _entry(seed: int, kept: int, scores: list[float], test_r5: float) -> dict[str, Any]:
    metrics = [{"R@5": s, "score": s} for s in scores]
    return {
        "seed": seed,
        "selections": {"centralized": {"validation_metrics": metrics}},
        "rules": {DEFAULT: {"step": kept, "difference": {"mean_R@5": test_r5}}},
    }


def _run(
    entries: list[dict[str, Any]], command: str = "cmd", arm: str = "centralized"
) -> dict[str, Any]:
    settings = {"arm": arm, "partition": "iid"}
    return {"command": command, "settings": settings, "datasets": {"toy": {"seeds": entries}}}


def test_only_centralized_runs_of_one_partition_are_compared() -> None:
    entries = [_entry(s, 1, [0.4, 0.5], test_r5=0.0) for s in range(2)]
    with pytest.raises(ConfigError, match="reads centralized --rules runs, not federated"):
        compare_runs({"a": _run(entries, arm="federated"), "b": _run(entries, arm="federated")})
    other = _run(entries)
    other["settings"]["partition"] = "dirichlet(alpha=0.3)"
    with pytest.raises(ConfigError, match="do not pool"):
        compare_runs({"a": _run(entries), "b": other})


def test_the_choice_is_the_higher_kept_validation_score_paired_by_seed() -> None:
    # candidate "a" keeps validation 0.50 on every seed but wins on test; "b" keeps 0.52-0.56
    a = _run([_entry(s, 1, [0.4, 0.50, 0.3], test_r5=0.05) for s in range(5)])
    b = _run([_entry(s, 2 if s else 1, [0.4, 0.45, 0.52 + 0.01 * s], -0.02) for s in range(5)])
    b["datasets"]["toy"]["seeds"].append(_entry(9, 0, [0.9], test_r5=0.5))  # unpaired: left out
    result = compare_runs({"a": a, "b": b})["toy"]
    assert result["seeds"] == [0, 1, 2, 3, 4]
    assert result["choice"] == "b"  # by validation, though its test difference is worse
    vs_first = result["candidates"]["b"]["validation_vs_first"]["score"]
    assert vs_first["values"] == pytest.approx([-0.05, 0.03, 0.04, 0.05, 0.06])
    assert vs_first["mean"] == pytest.approx(0.026)
    # per seed (what auto does): seed 0 keeps "a" (0.50 > 0.45), the others "b"
    per_seed = result["per_seed_choice"]
    assert per_seed["picks"] == {"0": "a", "1": "b", "2": "b", "3": "b", "4": "b"}
    assert per_seed["test_vs_best_frozen"]["mean_R@5"]["mean"] == pytest.approx(-0.006)
    assert result["candidates"]["a"]["test_vs_best_frozen"]["mean_R@5"]["bar_met"]
    assert not result["candidates"]["b"]["test_vs_best_frozen"]["mean_R@5"]["holds"]
    assert result["candidates"]["a"]["cells_met"] == 1


def test_a_run_without_rules_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run default_vs_frozen with --rules"):
        kept_state({"seed": 3, "selections": {}})
    with pytest.raises(ConfigError, match="NAME=DIR"):
        main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")])


def test_main_writes_the_report(tmp_path: Path) -> None:
    for name, score in (("x", 0.5), ("y", 0.6)):
        directory = tmp_path / name
        directory.mkdir()
        run = _run([_entry(s, 0, [score + 0.01 * s], test_r5=0.0) for s in range(5)], name)
        (directory / "default_vs_frozen.json").write_text(json.dumps(run), encoding="utf-8")
    out = tmp_path / "out"
    main(["--runs", f"x={tmp_path / 'x'}", f"y={tmp_path / 'y'}", "--out", str(out)])
    report = (out / "objective_choice.md").read_text(encoding="utf-8")
    assert "| toy" in report and "higher kept validation score: 0 y, 1 y, 2 y" in report
    assert (
        json.loads((out / "objective_choice.json").read_text())["datasets"]["toy"]["choice"] == "y"
    )
