"""The utility-vs-epsilon study on a tiny federation: accountant epsilons, one row per epsilon, figure."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from client.privacy import ledger_path
from common.errors import ConfigError
from simulations.experiments.privacy import METRIC, run_study
from tests.dp_reference import ledger_reference_epsilon
from tests.tiny_config import tiny_encoders

pytestmark = pytest.mark.slow
EPSILONS, DELTA = (2.0, math.inf), 1e-5


def _run_study(tiny: dict[str, Path], out: Path, work: Path) -> dict[str, Any]:
    """The study of every test here: one dataset, one seed, 2 sites, 2 rounds, tiny encoders."""
    return run_study(
        out_dir=out,
        work_dir=work,
        datasets=["synthetic-radiology"],
        epsilons=EPSILONS,
        seeds=[0],
        sites=2,
        rounds=2,
        local_epochs=1,
        delta=DELTA,
        overrides={**tiny_encoders(tiny), "dataset-n": 120, "batch-size": 16, "head": "small"},
    )


@pytest.fixture(scope="module")
def study(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path, Path]:
    out, work = tmp_path_factory.mktemp("privacy-out"), tmp_path_factory.mktemp("privacy-work")
    document = _run_study(tiny_model_dirs, out, work)
    return document, out, work


def test_one_row_per_epsilon_with_the_accountants_epsilon(
    study: tuple[dict[str, Any], Path, Path],
) -> None:
    document, _, work = study
    summary = document["summary"]
    assert [row["target_epsilon"] for row in summary] == sorted(EPSILONS)
    private, baseline = summary
    assert 0.5 * EPSILONS[0] < private["epsilon"] <= EPSILONS[0]
    assert private["noise_multiplier_mean"] > 0 and private["delta"] == DELTA
    assert math.isinf(baseline["epsilon"]) and baseline["delta"] is None
    (run,) = [r for r in document["runs"] if r["target_epsilon"] == EPSILONS[0]]
    assert run["rounds_completed"] == 2
    # The reported epsilon is each site's ledger total by its accountant (dp-accountant: PLD by
    # default), recomputed here from the ledger file's raw (sigma, q, steps) by dp-accounting.
    home = work / "synthetic-radiology" / "seed-0" / "eps-2"
    for site, spent in run["epsilon_per_site"].items():
        reference = ledger_reference_epsilon(ledger_path(home / "sites" / site), DELTA)
        assert spent == pytest.approx(reference.pld, rel=1e-6)
    # The no-DP row trained without a ledger: the same federation, just not private.
    inf_home = work / "synthetic-radiology" / "seed-0" / "eps-inf"
    assert not ledger_path(inf_home / "sites" / "site-0").exists()
    for row in summary:
        assert 0.0 <= row[METRIC] <= 1.0 and f"frozen_{METRIC}" in row
    # The default loss (auto) trains a per-example objective under DP; the no-DP row trains that
    # same objective, so the ratio of the two reads DP's cost alone.
    losses = {r["target_epsilon"]: r["loss"] for r in document["runs"]}
    assert losses == {EPSILONS[0]: "auto", EPSILONS[1]: "infonce-public+prompts"}
    no_dp = next(r for r in document["runs"] if math.isinf(r["target_epsilon"]))
    assert private["zs_auroc_ratio"] == pytest.approx(run["zs_auroc"] / no_dp["zs_auroc"])
    assert "zs_auroc_ratio" not in baseline and "frozen_zs_auroc" in baseline


def test_outputs_json_markdown_and_figure(study: tuple[dict[str, Any], Path, Path]) -> None:
    document, out, _ = study
    saved = json.loads((out / "privacy.json").read_text())
    assert saved["summary"][1]["epsilon"] == "inf"  # JSON has no infinity
    assert saved["summary"][0]["epsilon"] == document["summary"][0]["epsilon"]
    markdown = (out / "privacy.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| synthetic-radiology")]
    assert len(table) == len(EPSILONS)
    assert f"{document['summary'][0]['epsilon']:.3f}" in table[0] and "∞ (no DP)" in table[1]
    assert "zs_auroc / no DP" in markdown and f"{summary_ratio(document):.2f}x" in table[0]
    assert "utility_vs_epsilon.png" in markdown
    image = matplotlib.image.imread(out / "utility_vs_epsilon.png")
    assert image.ndim == 3 and image.shape[1] > 300


def summary_ratio(document: dict[str, Any]) -> float:
    return float(document["summary"][0]["zs_auroc_ratio"])


def test_restart_reuses_finished_runs(
    study: tuple[dict[str, Any], Path, Path], tiny_model_dirs: dict[str, Path]
) -> None:
    document, out, work = study
    again = _run_study(tiny_model_dirs, out, work)
    assert again["runs"] == document["runs"]  # from the journal: no Flower run started
    assert again["seconds"] < 60


def test_rejects_non_positive_epsilon(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epsilons"):
        run_study(out_dir=tmp_path, work_dir=tmp_path, epsilons=[0.0, math.inf])
