"""A hospital edits its manifest between two runs on real Flower processes: the next run trains on it as it is.

Operator path (README): a real ``flower-superlink`` and two ``flower-supernode``s whose node-config
names ``data='/abs/manifest.csv'``. Run 1 trains on every row; hospital-a then withdraws half of its
patients; run 2, with the same SuperNodes, site workers and state directories, must report the
smaller ``num-examples`` (in the coordinator's history and in the site's own audit log) and the
site's bundle must no longer hold a withdrawn id.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.audit import audit_path
from common.tensorfile import read_tensorfile
from simulations.flower.federate import APP_DIR, SITE_ENV, STARTUP_TIMEOUT
from simulations.flower.flwr_cli import run_app
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from simulations.flower.run_config import ConfigValue
from tests.hospital_data import make_rows, write_manifest
from tests.tiny_config import tiny_encoders

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 180.0
RUN_TIMEOUT = 420.0
SITES = {"hospital-a": 40, "hospital-b": 24}  # rows in each manifest at first
KEPT = 20  # hospital-a's rows after the withdrawal


@contextlib.contextmanager
def _federation(root: Path) -> Iterator[LocalSuperLink]:
    """A SuperLink and one SuperNode per hospital, each naming its own manifest; stopped by PID."""
    flower = root / "flower"
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(LocalSuperLink(flower, startup_timeout=STARTUP_TIMEOUT))
        nodes = []
        for name in SITES:
            node_config: dict[str, ConfigValue] = {
                "site-name": name,
                "data": str(root / name / "manifest.csv"),
                "state-dir": str(root / name / "state"),
                "cache-dir": str(root / name / "cache"),
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
            nodes.append(node.start(wait=False))
        for node in nodes:
            node.wait_connected()
        yield link


def _run(link: LocalSuperLink, tiny: dict[str, Path], run_dir: Path) -> tuple[int, dict[str, Any]]:
    """One round; returns the run id and its history line."""
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
    (entry,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return result.run_id, entry


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


def test_the_run_after_a_manifest_edit_trains_on_the_edited_manifest(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    rows = {
        name: make_rows(tmp_path / name, count, prefix=f"{name[-1]}-")
        for name, count in SITES.items()
    }
    for name, site_rows in rows.items():
        write_manifest(tmp_path / name / "manifest.csv", site_rows)
    state = tmp_path / "hospital-a" / "state"

    with _federation(tmp_path) as link:
        first_id, first = _run(link, tiny_model_dirs, tmp_path / "run1")
        ids, train = _bundle(state)
        assert ids == {r.id for r in rows["hospital-a"]}
        assert _examples(first)["hospital-a"] == train
        assert _audited(state, first_id) == [train]

        kept, withdrawn = rows["hospital-a"][:KEPT], rows["hospital-a"][KEPT:]
        write_manifest(tmp_path / "hospital-a" / "manifest.csv", kept)

        second_id, second = _run(link, tiny_model_dirs, tmp_path / "run2")
        ids, new_train = _bundle(state)
        assert ids == {r.id for r in kept}
        assert not ids & {r.id for r in withdrawn}
        assert new_train < train
        assert _examples(second) == {
            "hospital-a": new_train,
            "hospital-b": _bundle(tmp_path / "hospital-b" / "state")[1],
        }
        assert _audited(state, second_id) == [new_train]
