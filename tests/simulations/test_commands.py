"""The federation commands parse --run-config exactly like `flwr run` and refuse malformed text clearly."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from simulations.commands import parse_run_config


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
    from simulations.experiment import main

    with pytest.raises(ConfigError, match=r"--set 'loss=supcon'"):  # strings are quoted, as in flwr
        main(["--set", "loss=supcon", "--no-federated", "--seeds", "0"])
