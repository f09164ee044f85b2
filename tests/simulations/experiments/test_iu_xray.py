"""Tiny end-to-end runs of simulations.experiments.iu_xray (central, and federated on Flower's simulation engine) with a tiny random BERT."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.data.registry import load_dataset
from common.errors import ConfigError, DataError
from common.tensorfile import read_tensorfile
from simulations.experiments.iu_xray import run_experiment
from simulations.experiments.iu_xray_arms import (
    DATASET,
    FROZEN,
    FederationPlan,
    check_no_leak,
    split_reports,
)

CLASSIFIERS = ["knn", "logreg_scaled"]
TASKS = ["abnormal", "cardiomegaly"]
N, N_TRAIN = 300, 240
FED_KEY, MATCHED_KEY = "default/supcon/fed-iid", "default/supcon/matched-iid"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the module's runs (the tiny encoder embeds each report once)."""
    return tmp_path_factory.mktemp("cache")


def _experiment(tiny: dict[str, Path], cache: Path, out: Path, **options: Any) -> dict[str, Any]:
    """``run_experiment`` at test scale: one seed, SupCon, 2 epochs, the tiny text encoder."""
    defaults: dict[str, Any] = {"tasks": TASKS, "heads": ["default", "paper"]}
    return run_experiment(
        **{**defaults, **options},
        seeds=[0],
        losses=["supcon"],
        epochs=2,
        cache_dir=cache,
        out_dir=out,
        n=N,
        text_encoder=str(tiny["text"]),
        classifiers=CLASSIFIERS,
    )


@pytest.fixture(scope="module")
def result(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, cache: Path
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("results")
    return _experiment(tiny_model_dirs, cache, out), out


@pytest.fixture(scope="module")
def federated(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, cache: Path
) -> dict[str, Any]:
    """One task, one seed, the central default head and one FedAvg arm: 2 sites, 2 rounds x 1 epoch."""
    out, work = tmp_path_factory.mktemp("fed-results"), tmp_path_factory.mktemp("fed-work")
    plan = FederationPlan(sites=2, rounds=2, partitions=("iid",), losses=("supcon",), work_dir=work)
    document = _experiment(
        tiny_model_dirs,
        cache,
        out,
        tasks=["cardiomegaly"],
        heads=["default"],
        batch_size=32,
        federation=plan,
    )
    split = split_reports(
        task="cardiomegaly", seed=0, n=N, text_encoder=str(tiny_model_dirs["text"]), cache_dir=cache
    )
    return {"document": document, "out": out, "work": work, "split": split}


def test_writes_json_equal_to_returned_document(result: tuple[dict[str, Any], Path]) -> None:
    document, out = result
    assert json.loads((out / "iu_xray.json").read_text()) == json.loads(json.dumps(document))
    assert not list(out.glob(".*.tmp"))
    assert document["config"]["federation"] is None  # central-only mode: no Flower run


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
        assert sum(split["train"].values()) == N_TRAIN
        assert sum(split["test"].values()) == N - N_TRAIN


def test_markdown_has_one_table_per_task(result: tuple[dict[str, Any], Path]) -> None:
    document, out = result
    text = (out / "iu_xray.md").read_text()
    for task in TASKS:
        assert f"## Task `{task}`" in text
    assert text.count("| embeddings") == 2 * len(TASKS)  # F1 table + change-vs-frozen table
    frozen = f"{document['summary']['abnormal'][FROZEN]['knn']['mean']:.3f} ± 0.000"
    assert frozen in text
    assert "paper head 32-16-128, supcon" in text
    assert "Federated vs central" not in text


@pytest.mark.slow  # the `federated` fixture runs Flower simulations
def test_split_is_the_loaders_seeded_subset_and_its_complement(
    federated: dict[str, Any],
) -> None:
    split = federated["split"]
    pool = load_dataset(DATASET, n=N_TRAIN, seed=0, task="cardiomegaly")  # what sites partition
    assert split.train.ids == pool.ids
    assert len(split.test) == N - N_TRAIN
    assert not set(split.test.ids) & set(pool.ids)


@pytest.mark.slow  # the `federated` fixture runs Flower simulations
def test_federated_arm_runs_on_flower_and_no_site_holds_a_test_report(
    federated: dict[str, Any],
) -> None:
    document, work, split = federated["document"], federated["work"], federated["split"]
    assert document["variants"][FED_KEY] == "default head 32-512-128, supcon, FedAvg 2 sites iid"
    runs = {r["variant"]: r for r in document["runs"]}
    assert set(runs) == {FROZEN, "default/supcon", FED_KEY, MATCHED_KEY}
    fed = runs[FED_KEY]
    assert fed["arm"] == "federated" and fed["dim"] == 128
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in fed["f1"].values())
    assert list(fed["f1"]) == CLASSIFIERS
    assert fed["train"]["rounds"] == 2 and fed["train"]["local_epochs"] == 1
    # The real sites' data, read from the bundles their ClientApps wrote (not from the experiment).
    home = work / "cardiomegaly" / "seed0" / FED_KEY.replace("/", "-")
    history = (home / "run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in history] == [1, 2]
    held: dict[str, set[str]] = {}
    site_train: set[str] = set()
    for site in ("site-0", "site-1"):
        (bundle,) = (home / "sites" / site / "embeddings").glob("*.safetensors")
        _, meta = read_tensorfile(bundle, key="fedembed")
        held[site] = set(meta["train.ids"]) | set(meta["test.ids"])
        site_train |= set(meta["train.ids"])
        assert len(held[site]) == fed["sites"][site]["train"] + fed["sites"][site]["local_held_out"]
    assert not held["site-0"] & held["site-1"]
    assert held["site-0"] | held["site-1"] == set(split.train.ids)  # the whole pool, nothing else
    assert not (held["site-0"] | held["site-1"]) & set(split.test.ids)
    # The matched central head trained on exactly the sites' labelled training rows.
    labels = dict(zip(split.train.ids, split.train.labels.tolist(), strict=True))
    assert runs[MATCHED_KEY]["train"]["examples"] == sum(labels[i] >= 0 for i in site_train)


@pytest.mark.slow  # the `federated` fixture runs Flower simulations
def test_federated_markdown_and_comparison(federated: dict[str, Any]) -> None:
    document, out = federated["document"], federated["out"]
    comparison = document["federated_vs_central"]["cardiomegaly"][FED_KEY]
    f1 = {r["variant"]: r["f1"] for r in document["runs"]}
    for arm, reference in (("central", "default/supcon"), ("matched", MATCHED_KEY)):
        assert comparison[arm]["reference"] == reference
        for name in CLASSIFIERS:
            assert comparison[arm]["per_classifier"][name]["delta_mean"] == pytest.approx(
                f1[FED_KEY][name] - f1[reference][name]
            )
    text = (out / "iu_xray.md").read_text()
    assert "Federated vs central" in text
    assert "FedAvg over 2 simulated sites" in text
    assert "default head 32-512-128, supcon, FedAvg 2 sites iid − matched central" in text


@pytest.mark.slow  # the `federated` fixture runs Flower simulations
def test_check_no_leak_names_the_site(federated: dict[str, Any]) -> None:
    split = federated["split"]
    ok = {"site-0": {"train_ids": split.train.ids[:5], "held_out_ids": split.train.ids[5:7]}}
    check_no_leak(ok, split)
    leaked = {"site-1": {"train_ids": split.train.ids[:5], "held_out_ids": split.test.ids[:1]}}
    with pytest.raises(DataError, match="site-1 held 1 held-out test reports"):
        check_no_leak(leaked, split)


def test_rejects_bad_configuration(tmp_path: Path) -> None:
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
    with pytest.raises(ConfigError, match="rounds"):  # 3 rounds cannot make 1 central epoch
        run_experiment(
            losses=["supcon"], heads=["default"], federation=FederationPlan(rounds=3), **common
        )
    with pytest.raises(ConfigError, match="quantity"):
        run_experiment(
            losses=["supcon"],
            heads=["default"],
            federation=FederationPlan(rounds=1, partitions=("quantity",)),
            **common,
        )
    assert not list(tmp_path.iterdir())
