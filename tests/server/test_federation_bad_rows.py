"""A site whose manifest has a bad row, inside a federation: by default that site fails the round
with a named ``failed:`` outcome (the other site's update is aggregated); with its node-config
``on-bad-row = "skip"`` it trains on its other rows.

Through Flower's objects end to end, in one process: the ServerApp's body (run_federation, Flower's
strategy loop) sends Flower Messages that fedembed's real ClientApp (with its mods) answers, each
site with its own Context and node-config. Only the transport is a stand-in (no SuperLink): the
simulation engine gives every virtual site the same node-config, so ``fedembed simulate`` cannot set
``on-bad-row`` for one site.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from common.config import RunSettings
from server.app import run_federation
from tests.hospital_data import make_rows, write_manifest
from tests.server.clientapp_grid import ClientAppSites, serverapp_identity
from tests.tiny_config import tiny_encoders

ROWS = 12  # usable rows at each site
BAD_LINE = 5  # the manifest line (header = line 1) of hospital-b's unreadable image
SITES = {11: "hospital-a", 12: "hospital-b"}


@pytest.fixture(autouse=True)
def _serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    serverapp_identity(monkeypatch)


def _manifests(root: Path) -> dict[str, Path]:
    """hospital-a: ROWS good rows; hospital-b: ROWS good rows and, on line BAD_LINE, a row whose PNG
    is cut short (the file exists, so only decoding it fails)."""
    manifests = {}
    for name in SITES.values():
        count = ROWS + (name == "hospital-b")
        rows = make_rows(root / name, count, prefix=f"{name[-1]}-")
        if name == "hospital-b":
            bad = root / name / rows[BAD_LINE - 2].image
            bad.write_bytes(bad.read_bytes()[:40])
        manifests[name] = write_manifest(root / name / "manifest.csv", rows)
    return manifests


def _federate(tmp_path: Path, tiny: dict[str, Path], bad_site_mode: str) -> list[dict[str, Any]]:
    """One round with both hospitals; hospital-b's node-config has ``on-bad-row = bad_site_mode``."""
    manifests = _manifests(tmp_path)
    run_config: dict[str, Any] = {
        k.replace("_", "-"): v for k, v in RunSettings().to_dict().items()
    }
    run_config.update(
        {
            **tiny_encoders(tiny),
            "num-server-rounds": 1,
            "min-sites": 2,
            "local-epochs": 1,
            "batch-size": 8,
            "head": "small",
            "run-dir": str(tmp_path / "run"),
            "round-timeout": 120.0,
            "first-round-timeout": 120.0,
            "reply-poll-interval": 0.01,
        }
    )
    contexts = {}
    for node, name in SITES.items():
        node_config: dict[str, Any] = {
            "site-name": name,
            "data": str(manifests[name]),
            "state-dir": str(tmp_path / name / "state"),
            "cache-dir": str(tmp_path / name / "cache"),
            "worker": "off",
        }
        if name == "hospital-b":
            node_config["on-bad-row"] = bad_site_mode
        contexts[node] = Context(
            run_id=1,
            node_id=node,
            node_config=node_config,
            state=RecordDict(),
            run_config=run_config,
        )
    run_dir = run_federation(
        ClientAppSites(contexts), RunSettings.from_run_config(run_config), run_id=1
    )
    lines = (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert (run_dir / "final").is_dir()  # the run completed and exported its head
    return [json.loads(line) for line in lines]


def _examples(entry: dict[str, Any]) -> dict[str, int]:
    names = entry["site_names"]
    return {names[node]: int(m["num-examples"]) for node, m in entry["site_metrics"].items()}


def test_by_default_the_site_with_a_bad_row_fails_the_round_with_a_named_reason(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    (entry,) = _federate(tmp_path, tiny_model_dirs, "raise")
    outcomes = entry["outcomes"]
    assert outcomes["hospital-a"] == "aggregated"
    failed = outcomes["hospital-b"]
    manifest = tmp_path / "hospital-b" / "manifest.csv"
    assert failed.startswith(f"failed: DataError: {manifest} line {BAD_LINE}"), failed
    assert "field 'image'" in failed
    assert entry["head_updated"] is True and list(_examples(entry)) == ["hospital-a"]


def test_with_on_bad_row_skip_the_site_trains_on_its_other_rows(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    (entry,) = _federate(tmp_path, tiny_model_dirs, "skip")
    assert entry["outcomes"] == {"hospital-a": "aggregated", "hospital-b": "aggregated"}
    examples = _examples(entry)
    # hospital-b kept its ROWS good rows, as many as hospital-a has: the same training share.
    assert examples["hospital-b"] == examples["hospital-a"] > 0
