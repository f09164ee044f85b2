"""The DP throughput benchmark (simulations/benchmarks/dp.py) on a few hundred rows, one repeat."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from client.privacy import PrivacySettings, train_head_private
from common.config import RunSettings
from common.training import is_linear_path, train_head
from simulations.benchmarks.dp import (
    CASES,
    freeze_as_dp,
    fresh_model,
    private_objective,
    round_config,
    run,
    synthetic_data,
    write_report,
)


def test_the_site_default_case_is_what_a_site_trains_under_dp() -> None:
    site, case, data = RunSettings(), CASES["site-default"], synthetic_data(64)
    assert (case.head, case.loss, case.batch_size) == (site.head, site.loss, site.batch_size)
    assert data.prompts is not None and data.prompts.shape == (data.num_classes, 384)
    assert private_objective(case, data) == "infonce-public+prompts"
    assert private_objective(CASES["proxy"], data) == "proxy"
    config = round_config(case, epochs=3)
    assert (config.epochs, config.batch_size, config.lr) == (3, site.batch_size, site.lr)
    assert config.proximal_mu == 0.0
    assert config.validation_fraction == 0.0 and config.init == "keep"


def test_the_non_private_arm_trains_exactly_the_parameters_dp_sgd_trains(tmp_path: Path) -> None:
    data = synthetic_data(64)
    case = CASES["site-default"]
    config = round_config(case, epochs=1)

    def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
        return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}

    private = fresh_model(head=case.head, loss=case.loss)
    start = {n: p.detach().clone() for n, p in private.named_parameters()}
    train_head_private(
        private,
        data,
        config,
        PrivacySettings(noise_multiplier=1.0),
        ledger_path=tmp_path / "ledger.json",
        planned_rounds=1,
        run_id=1,
        server_round=1,
    )
    baseline = fresh_model(head=case.head, loss=private_objective(case, data))
    frozen = freeze_as_dp(baseline, data)
    assert frozen and not any(is_linear_path(name) for name in frozen)  # the residual MLPs
    start_b = {n: p.detach().clone() for n, p in baseline.named_parameters()}
    train_head(baseline, data, config)
    trained = changed(start_b, baseline)
    assert trained == {n for n in changed(start, private) if n.startswith("head.")}
    assert trained == {n for n, _ in baseline.named_parameters() if n not in frozen}


def test_a_small_run_reports_every_case_and_writes_its_files(tmp_path: Path) -> None:
    report = run(modes=("ghost",), repeats=1, examples=256, epochs={"ghost": 1})
    rows = {c.case: c.to_dict() for c in report.comparisons}
    assert set(rows) == {"site-default", "proxy"}
    site, proxy = rows["site-default"], rows["proxy"]
    assert site["objective"] == "infonce-public+prompts" and proxy["objective"] == "proxy"
    # the aligned head trains its affine paths under DP: the whole-head loop is reported beside
    assert "whole_head_samples_per_s" in site and "whole_head_samples_per_s" not in proxy
    for row in rows.values():
        assert row["mode"] == "ghost" and row["epochs"] == 1
        assert len(row["private_runs"]) == len(row["baseline_runs"]) == 1
        private, baseline = row["private_runs"][0], row["baseline_runs"][0]
        assert private["samples"] > 0 and baseline["samples"] > 0
        # a timing ratio is a result, not a verdict: check only that it is the runs' ratio
        ratio = (baseline["samples"] / baseline["loop_seconds"]) / (
            private["samples"] / private["loop_seconds"]
        )
        assert abs(row["overhead_loop_wall"] - ratio) <= 1e-3 * ratio + 1e-3
        assert row["meets_target"] == (row["overhead_loop_wall"] <= 2.0)
        assert len(row["load_average_after"]) == 3
    cases = report.setup["cases"]
    assert cases["site-default"]["dp_trained_parameters"] < cases["site-default"]["parameters"]
    assert cases["proxy"]["dp_trained_parameters"] == cases["proxy"]["parameters"]
    assert {"load_average_1_5_15_min", "load_average_after", "opacus"} <= set(report.machine)
    assert set(report.invalid_modes) == {"ew (site-default)", "ew (proxy)"}
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["comparisons"][0]["case"] == "site-default"
    markdown = md_path.read_text()
    assert "| site-default | ghost | 1 |" in markdown and "| proxy | ghost | 1 |" in markdown
