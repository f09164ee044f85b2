"""The federation's closed-form start (server/closed_form.py): the head a fresh ``aligned`` run starts
from is the pooled ridge least-squares map of frozen + lstsq, computed from per-site sums; round 1
returns it untrained; the sites' audit logs (query replies included) verify against the coordinator's
receipts; a site that requires sample-level DP sends no sums and the run starts from the sites' own
maps instead.

Through Flower's objects in one process (tests/server/clientapp_grid.py): fedembed's real ServerApp
body and ClientApp, each site with its own Context and manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.audit import audit_path, verify_audit_log
from client.site import load_site
from common.artifacts import load_head
from common.config import RunSettings, SiteSettings
from common.metrics import linear_alignment
from server.app import run_federation
from server.closed_form import solve
from server.receipts import receipts_path
from tests.hospital_data import make_rows, write_manifest
from tests.server.clientapp_grid import ClientAppSites, serverapp_identity
from tests.tiny_config import tiny_encoders

SITES = {11: ("hospital-a", 14), 12: ("hospital-b", 10)}  # node: (site, rows)
RIDGE = 0.5


@pytest.fixture(autouse=True)
def _serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    serverapp_identity(monkeypatch)


def test_conjugate_gradient_solves_a_ridge_system_within_its_round_cap() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    gram = x.T @ x + 2.0 * np.eye(6)
    truth = rng.normal(size=(3, 6))  # the weight rows of a 6 -> 3 map

    def matvec(m: np.ndarray) -> np.ndarray:
        return m @ gram

    rhs = matvec(truth)
    solution, used, residual = solve(matvec, rhs, steps=50)
    assert used <= 6 + 1 and residual < 1e-6  # at most one step per distinct eigenvalue
    np.testing.assert_allclose(solution, truth, atol=1e-6)
    _, used_one, residual_one = solve(matvec, rhs, steps=1)
    assert used_one == 1 and residual_one > 1e-2  # the cap on the rounds holds


def _federate(
    root: Path, tiny: dict[str, Path], *, private_site: bool = False, rounds: int = 1
) -> tuple[Path, RunSettings, dict[str, SiteSettings]]:
    run_config: dict[str, Any] = {
        k.replace("_", "-"): v for k, v in RunSettings().to_dict().items()
    }
    run_config.update(
        {
            **tiny_encoders(tiny),
            "num-server-rounds": rounds,
            "min-sites": 2,
            "local-epochs": 1,
            "batch-size": 8,
            "head": "aligned",
            "start-steps": 40,
            "start-ridge": RIDGE,
            "run-dir": str(root / "run"),
            "round-timeout": 120.0,
            "first-round-timeout": 120.0,
            "reply-poll-interval": 0.01,
            "test-rows": "holdout",
        }
    )
    if private_site:  # a per-example loss for DP-SGD; a site's own map moves the head far
        run_config.update({"loss": "proxy", "max-update-norm": 1e4})
    manifests = {
        name: write_manifest(
            root / name / "manifest.csv",
            make_rows(root / name, count, prefix=f"{name[-1]}-"),
            declared=private_site,  # DP-SGD needs the classes declared (public)
        )
        for name, count in SITES.values()
    }
    run_config["dataset"] = str(manifests["hospital-a"])  # the task's classes, for the coordinator
    contexts, sites = {}, {}
    for node, (name, _) in SITES.items():
        node_config: dict[str, Any] = {
            "site-name": name,
            "data": str(manifests[name]),
            "state-dir": str(root / name / "state"),
            "cache-dir": str(root / name / "cache"),
            "worker": "off",
        }
        if private_site and name == "hospital-b":  # DP-SGD at this site (loss proxy below)
            node_config.update({"dp-noise-multiplier": 1.0, "dp-max-epsilon": 50.0})
        contexts[node] = Context(
            run_id=1,
            node_id=node,
            node_config=node_config,
            state=RecordDict(),
            run_config=run_config,
        )
        sites[name] = SiteSettings.from_node_config(node_config)
    run = RunSettings.from_run_config(run_config)
    return run_federation(ClientAppSites(contexts), run, run_id=1), run, sites


def test_a_fresh_aligned_run_starts_at_the_pooled_ridge_map_and_round_one_keeps_it(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    run_dir, run, sites = _federate(tmp_path, tiny_model_dirs)
    start = json.loads((run_dir / "run.json").read_text())["start"]
    assert start["method"] == "federated ridge least squares (CG)", start
    assert start["residual"] < 1e-4 and start["sites"] == 2

    # the pooled fit the start must equal: every site's training rows in one place
    train = [load_site(s, run).train for s in sites.values()]
    x = np.concatenate([t.image for t in train if t.image is not None])
    y = np.concatenate([t.text for t in train if t.text is not None])
    assert start["rows"] == len(x)
    pooled = linear_alignment(x, y, method="lstsq", ridge=RIDGE)

    model, _ = load_head(run_dir / "final")  # 1 round: the sites returned the start untrained
    towers = model.head.towers()
    image, text = towers["image"].linear, towers["text"].linear
    assert image is not None and text is not None
    d = y.shape[1]
    weight = image.weight.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(
        weight[:d], pooled.proj_a.T, rtol=0, atol=2e-4 * abs(pooled.proj_a).max()
    )
    bias = -pooled.mean_a @ pooled.proj_a  # float32 on the wire: relative 1e-3 is ample
    np.testing.assert_allclose(image.bias.detach().numpy()[:d], bias, atol=1e-3 * abs(bias).max())
    np.testing.assert_allclose(text.bias.detach().numpy()[:d], -pooled.mean_b, atol=1e-5)
    np.testing.assert_allclose(text.weight.detach().numpy()[:d, :d], np.eye(d), atol=1e-6)

    # every reply that left a site, the start's queries included, verifies against the receipts
    receipts = [json.loads(line) for line in receipts_path(run_dir).read_text().splitlines()]
    queries = [r for r in receipts if r["message_type"] == "query"]
    assert len(queries) == 2 * (2 + start["steps"])  # cross + the image sums + one per CG step
    for settings in sites.values():
        summary = verify_audit_log(audit_path(settings.state_path), receipts=receipts)
        assert summary.ok, summary.violations
        assert summary.confirmed == 2 + start["steps"] + 2  # the queries, round 1: train, evaluate


def test_a_site_that_requires_sample_level_dp_sends_no_sums_and_the_run_starts_from_own_maps(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    run_dir, _, sites = _federate(tmp_path, tiny_model_dirs, private_site=True)
    start = json.loads((run_dir / "run.json").read_text())["start"]
    assert start["method"] == "each site's own map"
    assert start["reason"].startswith("abandoned:") and "sample-level DP" in start["reason"]
    lines = audit_path(sites["hospital-b"].state_path).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    queries = [e for e in entries if e["message_type"] == "query"]
    assert queries and all(e["declined"] and not e.get("arrays") for e in queries)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history[0]["outcomes"] == {"hospital-a": "aggregated", "hospital-b": "aggregated"}
