"""Secure aggregation (SecAgg+) through a real flower-superlink and three real flower-supernode processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from flwr.common.config import get_fused_config_from_dir

from client.audit import SECAGG_PAYLOADS, verify_audit_log
from client.training import execute
from common.artifacts import load_head, state_arrays
from server.checkpoints import RunStore
from simulations.flower.federate import (
    APP_DIR,
    SITE_ENV,
    STARTUP_TIMEOUT,
    _with_home,
    site_name,
    site_node_config,
)
from simulations.flower.flwr_cli import RunResult, run_app
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow

SITES = 3


@dataclass
class Federation:
    home: Path
    link: LocalSuperLink

    def run(self, name: str, config: dict[str, Any]) -> tuple[RunResult, Path]:
        run_dir = self.home / name
        config = {"min-sites": SITES, **config, "run-dir": str(run_dir)}
        result = run_app(
            APP_DIR, self.link.connection, run_config=config, log_dir=self.home / "logs"
        )
        return result, run_dir


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """One SuperLink and three SuperNodes (one per site, own state dir) for both runs."""
    home = _with_home(tmp_path_factory.mktemp("secagg"))
    flower = home / "flower"
    with LocalSuperLink(flower, startup_timeout=STARTUP_TIMEOUT) as link:
        nodes = [
            LocalSuperNode(
                link.address,
                flower,
                name=site_name(i),
                home=link.home,
                node_config=site_node_config(home, i, SITES),
                startup_timeout=STARTUP_TIMEOUT,
                extra_env=SITE_ENV,
            )
            for i in range(SITES)
        ]
        try:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_connected()
            yield Federation(home, link)
        finally:
            for node in nodes:
                node.stop()


def _gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian mechanisms (sensitivity 1, noise ``sigma``), from the formulas:
    RDP alpha / (2 sigma^2) per release (Mironov 2017), converted as in Canonne, Kamath and Steinke
    (2020), minimised over dp-accounting's default orders (Flower's RdpAccountant uses them too)."""
    orders = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)
    rdp = releases * orders / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
    return float(max(0.0, eps.min()))


def _run_config(tiny: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return tiny_run_config(
        tiny,
        **{"report-eval": False, "secure-aggregation": True, "secagg-max-weight": 64.0, **extra},
    )


def _site_updates(
    home: Path, config: dict[str, Any], head: dict[str, np.ndarray]
) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each site's round-1 update over ``head``, recomputed here with the site's own code and data."""
    updates = []
    for index in range(SITES):
        result = execute(
            {
                "op": "train",
                "incoming": head,
                "run": get_fused_config_from_dir(APP_DIR, {"min-sites": SITES, **config}),
                "site": site_node_config(home, index, SITES),
                "config": {"server-round": 1, "round-offset": 0, "proximal-mu": 0.0},
                "run_id": 0,
            }
        )
        delta = {k: result["arrays"][k].astype(np.float64) - head[k] for k in head}
        updates.append((delta, int(result["metrics"]["num-examples"])))
    return updates


def _checkpoint(run_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    store = RunStore(run_dir)
    path = store.checkpoints / f"round-{server_round:04d}.safetensors"
    return {
        k: v.astype(np.float64) for k, v in store.load_checkpoint(path, server_round).arrays.items()
    }


def _audit_entries(home: Path, index: int, run_id: int) -> list[dict[str, Any]]:
    log = home / "sites" / site_name(index) / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries if e["run_id"] == run_id]


def test_secagg_run_sums_masked_updates_to_the_fedavg_mean(
    federation: Federation, tiny_model_dirs: dict[str, Path]
) -> None:
    config = _run_config(tiny_model_dirs, **{"num-server-rounds": 2})
    result, run_dir = federation.run("plain", config)
    assert result.ok, result.log_text[-3000:]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [e["round"] for e in history] == [1, 2]
    for entry in history:
        assert len(entry["sites"]) == SITES and not entry["failed"], entry
        assert entry["secure_aggregation"]["reconstruction_threshold"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"round-{r:04d}.safetensors" for r in range(3)
    ]
    initial, round_one = _checkpoint(run_dir, 0), _checkpoint(run_dir, 1)

    # The server never saw a site's update, yet its round-1 head is the initial head plus the
    # example-weighted FedAvg mean of the updates the sites trained, up to SecAgg+'s quantization.
    updates = _site_updates(federation.home, config, initial)
    total = sum(n for _, n in updates)
    worst, spread = 0.0, 0.0
    for name in initial:
        mean = sum(u[name] * n for u, n in updates) / total
        worst = max(worst, float(np.abs(round_one[name] - initial[name] - mean).max()))
        spread = max(spread, *(float(np.abs(u[name] - mean).max()) for u, _ in updates))
    assert worst < 1e-4 and spread > 1e-3, (worst, spread)  # the mean, not any one site's update

    model, meta = load_head(run_dir / "final")
    final = state_arrays(model)
    assert meta["secure_aggregation"]["num_shares"] == SITES
    assert all(np.isfinite(v).all() for v in final.values())
    assert max(np.abs(final[k] - initial[k]).max() for k in initial) > 1e-3
    shapes = {k: v.shape for k, v in final.items()}
    for index in range(SITES):
        log = federation.home / "sites" / site_name(index) / "audit.jsonl"
        summary = verify_audit_log(log, allowed_arrays=shapes)
        assert summary.ok, summary.violations
        entries = _audit_entries(federation.home, index, result.run_id)
        assert [e["secagg"]["stage"] for e in entries] == list(SECAGG_PAYLOADS) * 2
        assert all(not e["arrays"] for e in entries)  # no unmasked head or update ever left
        # each stage's handling is timed at the site, as on the plain path
        assert all(e["timing"]["handler_started"] <= e["time"] for e in entries), entries


def test_secagg_with_client_side_clipping_releases_only_a_noisy_mean(
    federation: Federation, tiny_model_dirs: dict[str, Path]
) -> None:
    sigma, clip = 1.0, 0.05
    config = _run_config(
        tiny_model_dirs,
        **{
            "num-server-rounds": 1,
            "client-dp": "client-side",
            "client-dp-noise-multiplier": sigma,
            "client-dp-clipping-norm": clip,
        },
    )
    result, run_dir = federation.run("dp", config)
    assert result.ok, result.log_text[-3000:]
    (entry,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(entry["sites"]) == SITES and entry["secure_aggregation"]["max_weight"] == 1.0
    dp = entry["client_dp"]
    assert dp["released"] and dp["releases"] == 1
    assert dp["epsilon"] == pytest.approx(_gaussian_epsilon(sigma, 1, dp["delta"]), rel=1e-6)

    # Sites clipped their updates to `clip` and each added a noise share of std sigma * clip /
    # sqrt(sites) before masking; every site weighs 1: the unmasked mean carries Gaussian noise of
    # std sigma * clip / sites, the central mechanism's, and the server added none.
    initial, released = _checkpoint(run_dir, 0), _checkpoint(run_dir, 1)
    updates = _site_updates(federation.home, config, initial)
    norms = [np.sqrt(sum(float((u[k] ** 2).sum()) for k in u)) for u, _ in updates]
    assert max(norms) > clip  # clipping was exercised
    clipped = [
        {k: v * min(1.0, clip / n) for k, v in u.items()}
        for (u, _), n in zip(updates, norms, strict=True)
    ]
    noise = np.concatenate(
        [(released[k] - initial[k] - sum(c[k] for c in clipped) / SITES).ravel() for k in initial]
    )
    assert noise.std() == pytest.approx(sigma * clip / SITES, rel=0.05)
    assert abs(noise.mean()) < 5 * noise.std() / np.sqrt(noise.size)
    for index in range(SITES):
        entries = _audit_entries(federation.home, index, result.run_id)
        (masked,) = [e for e in entries if e["secagg"]["stage"] == "collect_masked_vectors"]
        assert masked["privacy"]["client-dp-clipping-norm"] == clip
        assert masked["metrics"]["num_examples"] == 1
