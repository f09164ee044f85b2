"""Hospitals edit their manifests between two runs on real Flower processes: the next run trains on
them as they are, and a bad row is handled as the site's own node-config says.

Operator path (README): a real ``flower-superlink`` and two ``flower-supernode``s whose node-config
names ``data='/abs/manifest.csv'``; hospital-a's also sets ``on-bad-row = "skip"``, hospital-b's
keeps the default (``raise``). Run 1 trains on every row. Then hospital-a withdraws half of its
patients, and its edit also adds a row whose PNG is cut short (the file exists, so only decoding
it fails); hospital-b's manifest gets a row whose image file is missing. Run 2, with the same
SuperNodes, site workers and state directories:

- hospital-a leaves its bad row out and trains on the rows it kept: the smaller ``num-examples`` in
  the coordinator's history and in the site's own audit log; the site's log names the skipped
  line, and its bundle holds neither a withdrawn id nor the bad row's;
- hospital-b fails the round with a ``failed:`` outcome naming its manifest, line and field, in
  the coordinator's history and log (its evaluate reply is left out too); its own log names them,
  and no update left it;
- hospital-a's update alone is aggregated, and the run completes and exports a final head.

tests/server/test_federation_bad_rows.py checks both modes in one process, without a SuperLink.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.audit import audit_path
from client.worker import LOG_FILE
from common.tensorfile import read_tensorfile
from simulations.flower.federate import APP_DIR, SITE_ENV, STARTUP_TIMEOUT
from simulations.flower.flwr_cli import RunResult, run_app
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from simulations.flower.run_config import ConfigValue
from tests.hospital_data import Row, make_rows, write_manifest
from tests.tiny_config import tiny_encoders

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 180.0
RUN_TIMEOUT = 420.0
SITES = {"hospital-a": 40, "hospital-b": 24}  # rows in each manifest at first
KEPT = 20  # hospital-a's good rows after the withdrawal
ON_BAD_ROW: dict[str, dict[str, ConfigValue]] = {"hospital-a": {"on-bad-row": "skip"}}
BAD_LINE = {"hospital-a": 7, "hospital-b": 5}  # where run 2's bad row is (header = line 1)


@contextlib.contextmanager
def _federation(root: Path) -> Iterator[tuple[LocalSuperLink, dict[str, LocalSuperNode]]]:
    """A SuperLink and one SuperNode per hospital, each naming its own manifest; stopped by PID."""
    flower = root / "flower"
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(LocalSuperLink(flower, startup_timeout=STARTUP_TIMEOUT))
        nodes = {}
        for name in SITES:
            node_config: dict[str, ConfigValue] = {
                "site-name": name,
                "data": str(root / name / "manifest.csv"),
                "state-dir": str(root / name / "state"),
                "cache-dir": str(root / name / "cache"),
                **ON_BAD_ROW.get(name, {}),
            }
            node = LocalSuperNode(
                link.address,
                flower,
                name=name,
                home=link.home,
                node_config=node_config,
                startup_timeout=STARTUP_TIMEOUT,
                extra_env=SITE_ENV,
            )
            stack.callback(node.stop)
            nodes[name] = node.start(wait=False)
        for node in nodes.values():
            node.wait_connected()
        yield link, nodes


def _run(
    link: LocalSuperLink, tiny: dict[str, Path], run_dir: Path
) -> tuple[RunResult, dict[str, Any]]:
    """One round; returns the completed run and its history line."""
    config: dict[str, ConfigValue] = {
        "num-server-rounds": 1,
        "min-sites": 2,
        **tiny_encoders(tiny),
        "local-epochs": 1,
        "batch-size": 16,
        "head": "small",
        "round-timeout": ROUND_TIMEOUT,
        "first-round-timeout": ROUND_TIMEOUT,
        "run-dir": str(run_dir),
    }
    result = run_app(
        APP_DIR, link.connection, run_config=config, timeout=RUN_TIMEOUT, log_dir=run_dir.parent
    )
    assert result.ok, f"{result.status} {result.details}\n{result.log_text[-3000:]}"
    assert (run_dir / "final" / "head.safetensors").is_file()  # the run exported its head
    (entry,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return result, entry


def _examples(entry: dict[str, Any]) -> dict[str, int]:
    """num-examples each hospital reported in a round, by the name it gave."""
    names = entry["site_names"]
    return {names[node]: int(m["num-examples"]) for node, m in entry["site_metrics"].items()}


def _audited(state: Path, run_id: int) -> list[int]:
    """num-examples in the site's own audit log of what left it, for the run's train replies."""
    entries = [json.loads(line) for line in audit_path(state).read_text().splitlines()]
    return [
        int(e["metrics"]["num-examples"])
        for e in entries
        if e["run_id"] == run_id and e["message_type"] == "train"
    ]


def _bundle(state: Path) -> tuple[set[str], int]:
    """The ids in the site's only bundle, and how many of them it trains on."""
    (bundle,) = (state / "embeddings").glob("*.safetensors")
    _, meta = read_tensorfile(bundle, key="fedembed")
    return set(meta["train.ids"]) | set(meta["test.ids"]), len(meta["train.ids"])


def _with_bad_row(site: Path, rows: list[Row], line: int, *, start: int, image: str) -> list[Row]:
    """``rows`` with a new row at manifest ``line`` whose PNG is cut short (``image="truncated"``:
    the file exists, only decoding it fails) or missing (``image="missing"``)."""
    (bad,) = make_rows(site, 1, prefix=f"{site.name[-1]}-", start=start)
    path = site / bad.image
    if image == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:
        assert image == "missing", image
        path.unlink()
    return [*rows[: line - 2], bad, *rows[line - 2 :]]


def _site_log(root: Path, node: LocalSuperNode) -> str:
    """What the site logged: its SuperNode's output (its ClientApp processes') and its worker's log."""
    assert node.process is not None
    worker = root / node.name / "state" / LOG_FILE
    return node.process.logs(since_start=False) + (
        worker.read_text(encoding="utf-8", errors="replace") if worker.is_file() else ""
    )


def test_the_run_after_a_manifest_edit_trains_on_the_edited_manifest(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    rows = {
        name: make_rows(tmp_path / name, count, prefix=f"{name[-1]}-")
        for name, count in SITES.items()
    }
    manifests = {name: tmp_path / name / "manifest.csv" for name in SITES}
    for name, site_rows in rows.items():
        write_manifest(manifests[name], site_rows)
    state, b_state = tmp_path / "hospital-a" / "state", tmp_path / "hospital-b" / "state"

    with _federation(tmp_path) as (link, nodes):
        first, entry = _run(link, tiny_model_dirs, tmp_path / "run1")
        ids, train = _bundle(state)
        assert ids == {r.id for r in rows["hospital-a"]}
        b_train = _bundle(b_state)[1]
        assert _examples(entry) == {"hospital-a": train, "hospital-b": b_train}
        assert _audited(state, first.run_id) == [train]
        assert _audited(b_state, first.run_id) == [b_train]

        kept, withdrawn = rows["hospital-a"][:KEPT], rows["hospital-a"][KEPT:]
        a_line, b_line = BAD_LINE["hospital-a"], BAD_LINE["hospital-b"]
        edited = _with_bad_row(
            tmp_path / "hospital-a", kept, a_line, start=SITES["hospital-a"], image="truncated"
        )
        write_manifest(manifests["hospital-a"], edited)
        b_rows = _with_bad_row(
            tmp_path / "hospital-b",
            rows["hospital-b"],
            b_line,
            start=SITES["hospital-b"],
            image="missing",
        )
        write_manifest(manifests["hospital-b"], b_rows)

        second, entry = _run(link, tiny_model_dirs, tmp_path / "run2")
        # hospital-a (on-bad-row = "skip") trained on the rows it kept, without the bad one.
        ids, new_train = _bundle(state)
        assert ids == {r.id for r in kept}
        assert not ids & {r.id for r in withdrawn}
        assert new_train < train
        assert _audited(state, second.run_id) == [new_train]
        a_log = _site_log(tmp_path, nodes["hospital-a"])
        assert f"site hospital-a: kept {KEPT} rows, skipped 1 bad rows:" in a_log
        bad_a = edited[a_line - 2].id
        assert f"line {a_line}: (id '{bad_a}') field 'image': cannot decode image" in a_log

        # hospital-b (default: raise) failed the round, naming its manifest, line and field;
        # hospital-a's update alone was aggregated.
        assert _examples(entry) == {"hospital-a": new_train}
        assert entry["head_updated"] is True
        outcomes = entry["outcomes"]
        assert outcomes["hospital-a"] == "aggregated"
        where = f"{manifests['hospital-b']} line {b_line}: image file not found (field 'image')"
        assert outcomes["hospital-b"].startswith("failed: "), outcomes
        assert f"DataError: {where}" in outcomes["hospital-b"], outcomes
        (b_node,) = [n for n, name in entry["site_names"].items() if name == "hospital-b"]
        assert entry["failed"] == {b_node: outcomes["hospital-b"].removeprefix("failed: ")}
        assert f"round 1: hospital-b (node {b_node}) {outcomes['hospital-b']}" in second.log_text
        assert where in entry["evaluate_rejected"][b_node]  # its evaluate reply was left out too
        assert _audited(b_state, second.run_id) == []  # no update left hospital-b
        assert where in _site_log(tmp_path, nodes["hospital-b"])
