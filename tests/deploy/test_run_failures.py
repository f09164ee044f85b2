"""`fedembed deploy-local` (a real flower-superlink and real flower-supernode processes) when every
site fails: Flower's status finished:failed, a non-zero exit, each site's reason, no final head."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.simulations.cli.test_federation_failures import (
    assert_failed_without_final_head,
    run_every_site_failing,
)

pytestmark = pytest.mark.slow


def test_deployment_in_which_every_site_fails_exits_nonzero_with_flower_status_failed(
    tmp_path: Path,
    tiny_model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "deploy"
    assert run_every_site_failing("deploy-local", tmp_path, out, tiny_model_dirs, monkeypatch) == 1
    printed = capsys.readouterr().out
    assert_failed_without_final_head(out, printed)
    # The coordinator's own log names each site (deploy-local names them site-0, site-1).
    log = next((out / "logs").glob("run-*.log")).read_text(encoding="utf-8")
    for site in ("site-0", "site-1"):
        assert f"[fedembed] round 1: {site} (node " in log
    assert "[fedembed] run failed: round 1: no site's update was aggregated" in log
