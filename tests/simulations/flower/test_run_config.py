"""The one run-config codec: --run-config text parsed exactly like `flwr run`; values formatted for flwr."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from simulations.flower.run_config import format_config, parse_run_config


def test_run_config_values_are_toml_typed() -> None:
    parsed = parse_run_config(
        "num-server-rounds=5 strategy=\"fedprox\" lr=0.01 resume=true run-dir='a b'"
    )
    assert parsed == {
        "num-server-rounds": 5,
        "strategy": "fedprox",
        "lr": 0.01,
        "resume": True,
        "run-dir": "a b",
    }


def test_empty_run_config_is_no_override() -> None:
    assert parse_run_config(None) == {}
    assert parse_run_config("") == {}


@pytest.mark.parametrize("text", ["strategy=fedprox rounds", "no-equals-sign"])
def test_malformed_run_config_names_the_text(text: str) -> None:
    with pytest.raises(ConfigError, match="--run-config"):
        parse_run_config(text)


def test_experiment_set_uses_the_same_parser_and_names_its_option() -> None:
    from simulations.experiments.comparison_runs import main

    with pytest.raises(ConfigError, match=r"--set 'loss=supcon'"):  # strings are quoted, as in flwr
        main(["--set", "loss=supcon", "--no-federated", "--seeds", "0"])


def test_format_config_quotes_strings_and_rejects_bad_values() -> None:
    text = format_config({"a": 1, "b": True, "c": 0.5, "path": "/x y/z", "q": "it's"})
    assert text == "a=1 b=true c=0.5 path='/x y/z' q=\"it's\""
    with pytest.raises(ConfigError, match="both"):
        format_config({"bad": "'\""})
    with pytest.raises(ConfigError, match="key"):
        format_config({"bad key": 1})
    with pytest.raises(ConfigError, match="list"):
        format_config({"k": [1, 2]})  # type: ignore[dict-item]
