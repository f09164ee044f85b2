"""An experiment's entry point: a named failure is one line and exit status 2."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from simulations.experiments.entry import run_main


def test_a_named_failure_is_one_line_on_stderr_and_exit_two(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def main() -> None:
        raise ConfigError("--seeds: 'x' is not a seed")

    with pytest.raises(SystemExit) as stopped:
        run_main("comparison_runs", main)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "comparison_runs: error: --seeds: 'x' is not a seed\n"


@pytest.mark.parametrize(("returned", "code"), [(None, 0), (0, 0), (3, 3)])
def test_the_exit_status_is_mains(returned: int | None, code: int) -> None:
    with pytest.raises(SystemExit) as stopped:
        run_main("iu_xray", lambda: returned)
    assert stopped.value.code == code


def test_an_unexpected_error_keeps_its_traceback() -> None:
    def main() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_main("privacy", main)
