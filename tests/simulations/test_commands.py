"""The federation commands parse --run-config exactly like `flwr run` and refuse malformed text clearly."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from simulations.commands import _parse_pairs


def test_run_config_values_are_toml_typed() -> None:
    parsed = _parse_pairs(
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
    assert _parse_pairs(None) == {}
    assert _parse_pairs("") == {}


@pytest.mark.parametrize("text", ["strategy=fedprox rounds", "no-equals-sign"])
def test_malformed_run_config_names_the_text(text: str) -> None:
    with pytest.raises(ConfigError, match="--run-config"):
        _parse_pairs(text)
