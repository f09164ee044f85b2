"""Tiny end-to-end run of simulations.exp_iu_xray with a tiny random BERT in place of MiniLM."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from simulations.exp_iu_xray import FROZEN, run_experiment

CLASSIFIERS = ["knn", "logreg_scaled"]
TASKS = ["abnormal", "cardiomegaly"]


@pytest.fixture(scope="module")
def result(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("results")
    document = run_experiment(
        tasks=TASKS,
        seeds=[0],
        losses=["supcon"],
        heads=["default", "paper"],
        epochs=2,
        cache_dir=tmp_path_factory.mktemp("cache"),
        out_dir=out,
        n=300,
        text_encoder=str(tiny_model_dirs["text"]),
        classifiers=CLASSIFIERS,
    )
    return document, out


def test_writes_json_equal_to_returned_document(result: tuple[dict[str, Any], Path]) -> None:
    document, out = result
    assert json.loads((out / "iu_xray.json").read_text()) == json.loads(json.dumps(document))
    assert not list(out.glob(".*.tmp"))


def test_runs_cover_every_task_variant_and_classifier(result: tuple[dict[str, Any], Path]) -> None:
    document, _ = result
    keys = [FROZEN, "default/supcon", "paper/supcon"]
    assert list(document["variants"]) == keys
    assert document["variants"][FROZEN] == "frozen (32-d)"
    assert document["variants"]["paper/supcon"] == "paper head 32-16-128, supcon"
    runs = {(r["task"], r["variant"]): r for r in document["runs"]}
    assert set(runs) == {(t, k) for t in TASKS for k in keys}
    for (_, key), run in runs.items():
        assert list(run["f1"]) == CLASSIFIERS
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in run["f1"].values())
        assert run["dim"] == (32 if key == FROZEN else 128)
        assert ("train" in run) == (key != FROZEN)
    trained = runs[("cardiomegaly", "default/supcon")]["train"]
    assert trained["steps"] == 2 * (trained["examples"] // 128)
    assert math.isfinite(trained["final_loss"])


def test_summary_matches_single_seed_runs(result: tuple[dict[str, Any], Path]) -> None:
    document, _ = result
    runs = {(r["task"], r["variant"]): r["f1"] for r in document["runs"]}
    for task in TASKS:
        summary = document["summary"][task]
        for key, per_classifier in summary.items():
            for name, stats in per_classifier.items():
                assert stats["n"] == 1 and stats["std"] == 0.0
                assert stats["mean"] == stats["median"] == runs[(task, key)][name]
                assert stats["delta_mean"] == pytest.approx(
                    runs[(task, key)][name] - runs[(task, FROZEN)][name]
                )
        split = document["data"][task]["seed0"]
        total = sum(split["train"].values()) + sum(split["test"].values())
        assert total == 300


def test_markdown_has_one_table_per_task(result: tuple[dict[str, Any], Path]) -> None:
    document, out = result
    text = (out / "iu_xray.md").read_text()
    for task in TASKS:
        assert f"## Task `{task}`" in text
    assert text.count("| embeddings") == 2 * len(TASKS)  # F1 table + change-vs-frozen table
    frozen = f"{document['summary']['abnormal'][FROZEN]['knn']['mean']:.3f} ± 0.000"
    assert frozen in text
    assert "paper head 32-16-128, supcon" in text


def test_rejects_unsupervised_loss_and_unknown_head(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "tasks": ["abnormal"],
        "seeds": [0],
        "epochs": 1,
        "cache_dir": tmp_path,
        "out_dir": tmp_path,
    }
    with pytest.raises(ConfigError, match="infonce"):
        run_experiment(losses=["infonce"], heads=["default"], **common)
    with pytest.raises(ConfigError, match="huge"):
        run_experiment(losses=["supcon"], heads=["huge"], **common)
    assert not list(tmp_path.iterdir())
