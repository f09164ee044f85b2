"""The checks the CLI and the coordinator make before round 1: each refusal is one ConfigError line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from common.preflight import check_partition, check_run, check_run_config


def _refusal(values: dict[str, Any], *, sites: int | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        check_run(values, sites=sites)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _site_manifest(path: Path, values: str, per_value: int = 2) -> Path:
    """A text-only manifest whose site column cycles through ``values`` (one letter each)."""
    rows = [
        f"r{i},there is a nodule {i},{'nodule' if i % 2 else 'normal'},{values[i % len(values)]}"
        for i in range(per_value * len(values))
    ]
    path.write_text("id,text,label,site\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "dp", [{"dp-noise-multiplier": 1.0}, {"dp-target-epsilon": 8.0}, {"dp-max-epsilon": 3.0}]
)
@pytest.mark.parametrize("loss", ["infonce", "supcon", "pairwise", "infonce+supcon"])
def test_sample_level_dp_with_a_loss_using_in_batch_negatives_is_refused(
    dp: dict[str, float], loss: str
) -> None:
    message = _refusal({"loss": loss, **dp})
    key, value = next(iter(dp.items()))
    assert message.startswith(f"run-config: {key} = {value} turns on sample-level DP")
    valid = "auto, proxy, prompts, infonce-public, infonce-public+prompts"
    assert f"loss '{loss}'" in message and f"valid under sample-level DP: {valid}" in message


def test_sample_level_dp_with_the_proxy_loss_and_dp_off_with_any_loss_pass() -> None:
    for loss in ("proxy", "prompts", "infonce-public", "infonce-public+prompts", "auto"):
        assert check_run_config({"loss": loss, "dp-noise-multiplier": 1.0}).loss == loss
    # The app's defaults: 0 is "off", so the default loss (auto) runs without DP-SGD.
    off = {"dp-noise-multiplier": 0.0, "dp-target-epsilon": 0.0}
    assert check_run_config(off).loss == "auto"
    # Client-level DP is valid for any loss.
    assert check_run_config({"client-dp": "client-side"}).client_dp == "client-side"


def test_sample_level_dp_on_a_readable_manifest_needs_its_classes_declared(
    tmp_path: Path,
) -> None:
    manifest = _site_manifest(tmp_path / "sites.csv", "AB")
    values = {"dataset": str(manifest), "partition": "site", "dp-target-epsilon": 3.0}
    message = _refusal(values, sites=2)
    assert message.startswith("run-config: sample-level DP needs the classes declared")
    assert f"add {manifest}.classes.json" in message
    assert check_run({**values, "dp-target-epsilon": 0.0}, sites=2)  # no DP: the labels' set
    Path(f"{manifest}.classes.json").write_text('{"classes": ["normal", "nodule"]}')
    assert check_run(values, sites=2).dataset == str(manifest)
    assert check_run({"dataset": "synthetic-radiology", "dp-target-epsilon": 3.0})  # built in


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"strategy": "fedavgg"}, "strategy 'fedavgg'"),
        ({"loss": "clip"}, "loss 'clip'"),
        ({"partition": "sites"}, "partition 'sites'"),
        ({"num-rounds": 3}, "unknown key 'num-rounds'"),
        ({"dp-noise-multipler": 1.0}, "unknown privacy key 'dp-noise-multipler'"),
        ({"dp-ledger-scope": "run"}, "'dp-ledger-scope' is a site's own setting"),
        ({"max-empty-rounds": -1}, "max-empty-rounds must be >= 0"),
    ],
)
def test_unknown_names_and_keys_are_refused_naming_them(values: dict[str, Any], named: str) -> None:
    assert named in _refusal(values)


def test_a_site_partition_needs_exactly_one_site_per_value_of_the_site_column(
    tmp_path: Path,
) -> None:
    manifest = str(_site_manifest(tmp_path / "five.csv", "ABCDE"))
    values = {"dataset": manifest, "partition": "site"}
    message = _refusal(values, sites=4)
    assert message == (
        f"run-config: partition 'site' of {manifest}: its site column has 5 distinct values "
        "(A, B, C, D, E), but the run has 4 sites: each site takes one value's rows"
    )
    assert "6 sites" in _refusal(values, sites=6)
    assert check_run(values, sites=5).partition == "site"
    # The coordinator knows only min-sites, a lower bound: 5 values can serve 4 or 5 sites ...
    assert check_run({**values, "min-sites": 4}).min_sites == 4
    # ... but never 6.
    assert "min-sites = 6" in _refusal({**values, "min-sites": 6})
    no_column = tmp_path / "plain.csv"
    no_column.write_text("id,text\na,one\nb,two\n", encoding="utf-8")
    assert "no site column" in _refusal({"dataset": str(no_column), "partition": "site"}, sites=2)


@pytest.mark.parametrize(
    ("values", "sites", "expected"),
    [
        ({"partition": "iid", "dataset-n": 3}, 4, "3 rows cannot be split over 4 sites"),
        ({"partition": "quantity", "dataset-n": 5}, 4, "5 rows cannot be split over 4 sites"),
        (
            {"partition": "dirichlet", "dataset-n": 10, "alpha": 0.05},
            8,
            "10 rows cannot be split over 8 sites",
        ),
    ],
)
def test_a_partition_that_leaves_a_site_without_data_is_refused(
    values: dict[str, Any], sites: int, expected: str
) -> None:
    message = _refusal({"dataset": "digits", **values}, sites=sites)
    assert message.startswith(f"run-config: partition '{values['partition']}' of digits: ")
    assert expected in message


def test_feasible_partitions_pass_and_unreadable_datasets_are_left_to_the_sites(
    tmp_path: Path,
) -> None:
    for partition in ("iid", "quantity", "dirichlet"):
        run = check_run({"dataset": "digits", "dataset-n": 60, "partition": partition}, sites=3)
        assert run.partition == partition
    # A manifest only the sites can read (a real deployment): nothing to check here.
    elsewhere = check_run_config(
        {"dataset": str(tmp_path / "at-the-sites.csv"), "partition": "site"}
    )
    check_partition(elsewhere, sites=4)
    # One site, or no partition at all: nothing is split.
    check_partition(check_run_config({"dataset": "digits", "dataset-n": 1}), sites=1)
