"""Run the fedembed Flower app on one machine: Flower's simulation engine, or real SuperLink/SuperNode processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import HOME_ENV
from common.errors import ConfigError
from simulations.flower.flwr_cli import (
    Connection,
    FlowerError,
    RunResult,
    TlsFiles,
    flwr_cli,
    run_app,
)
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from simulations.flower.run_config import ConfigValue

APP_DIR = Path(__file__).resolve().parents[2]
# Flower's SuperExec polls for a new message every 1 s by default; its documented knob makes a
# site pick up the round sooner (the SuperNode's own 3 s idle poll is fixed in Flower 1.41).
SITE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
PKI_SCRIPT = APP_DIR / "deploy" / "pki.sh"
# Generous: on a loaded 2-core machine a SuperLink or SuperNode can take a minute to come up.
STARTUP_TIMEOUT = 180.0


@dataclass
class FederationResult:
    """A finished federation: Flower's verdict, where the run's files are, and its per-round history."""

    result: RunResult
    run_dir: Path
    home: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    pki_dir: Path | None = None  # set when the federation ran with TLS and SuperNode authentication

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def final_head(self) -> Path:
        return self.run_dir / "final"

    def raise_for_status(self, what: str) -> FederationResult:
        """Return self if the run completed, else raise FlowerError naming ``what``, why and the log."""
        if not self.ok:
            raise FlowerError(
                f"{what} failed: Flower run {self.result.run_id} ended {self.result.status}"
                f"{f' ({self.result.details})' if self.result.details else ''}; "
                f"log {self.result.log_path}"
            )
        return self


# Ray CPUs per simulated site when a caller does not say: as many sites train at once as there
# are cores.
CPUS_PER_SITE = 1


def check_federation(run_config: Mapping[str, ConfigValue], *, sites: int) -> None:
    """Refuse, before any Flower process starts, a run-config the app's coordinator would refuse.

    The overrides must be keys of the app's ``[tool.flwr.app.config]`` (Flower refuses others);
    the run-config they give, with ``sites`` sites taking a partition each, must pass
    common/preflight.py (the checks the coordinator makes before round 1).
    """
    from flwr.common.config import get_fused_config_from_dir

    from common.preflight import check_run, check_run_config

    check_run_config(run_config)  # an unknown key is named with the valid ones
    try:
        fused = get_fused_config_from_dir(APP_DIR, dict(run_config))
    except ValueError as exc:
        raise ConfigError(
            f"run-config: {exc} ([tool.flwr.app.config] of {APP_DIR / 'pyproject.toml'})"
        ) from None
    check_run(fused, sites=sites)


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _with_home(out_dir: Path) -> Path:
    """Point $FEDEMBED_HOME (caches, site state) at ``out_dir`` for the processes we start."""
    home = out_dir.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[HOME_ENV] = str(home)
    return home


def simulate(
    *,
    out_dir: Path,
    sites: int,
    run_config: Mapping[str, ConfigValue],
    cpus_per_site: int | None = None,
    timeout: float = 3600.0,
    echo: bool = True,
) -> FederationResult:
    """``sites`` virtual sites on Flower's simulation engine (our own SuperLink, stopped on exit).

    ``cpus_per_site`` (default ``CPUS_PER_SITE``): Ray CPUs per virtual site, so the machine's
    cores over it is how many sites train at once (one Ray actor each).
    """
    home = _with_home(out_dir)
    run_dir = home / "run"
    config = {
        "run-dir": str(run_dir),
        "min-sites": min(sites, int(run_config.get("min-sites", sites))),
        **run_config,
    }
    config["run-dir"] = str(run_dir)
    check_federation(config, sites=sites)
    with LocalSuperLink(home / "flower", simulation=True) as link:
        result = run_app(
            APP_DIR,
            link.connection,
            run_config=config,
            federation_config={
                "num-supernodes": sites,
                "client-resources-num-cpus": cpus_per_site or CPUS_PER_SITE,
            },
            timeout=timeout,
            log_dir=home / "logs",
            echo=sys.stdout if echo else None,
        )
    return FederationResult(result, run_dir, home, _read_history(run_dir))


def site_name(index: int) -> str:
    """Name of local site ``index`` (its node-config site-name and its key directory under pki/)."""
    return f"site-{index}"


def site_node_config(
    home: Path, index: int, sites: int, **extra: ConfigValue
) -> dict[str, ConfigValue]:
    """The ``--node-config`` of local site ``index``: its share of the data, its own state directory."""
    return {
        "partition-id": index,
        "num-partitions": sites,
        "site-name": site_name(index),
        "state-dir": str(home / "sites" / site_name(index)),
        "cache-dir": str(home / "sites" / site_name(index) / "cache"),
        **extra,
    }


@dataclass(frozen=True)
class SitePki:
    """Output of deploy/pki.sh: the CA, the SuperLink's TLS files and one auth key per site."""

    root: Path

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.root / "ca.crt", self.root / "server.pem", self.root / "server.key")

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    def private_key(self, site: str) -> Path:
        return self.root / "sites" / site / "site.key"

    def public_key(self, site: str) -> Path:
        return self.root / "sites" / site / "site.key.pub"


def make_pki(out_dir: Path, sites: list[str]) -> SitePki:
    """Run deploy/pki.sh into ``out_dir`` for these sites (an existing CA and keys are kept)."""
    argv = ["bash", str(PKI_SCRIPT), str(out_dir), *sites]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FlowerError(f"{PKI_SCRIPT} did not run: {err}") from err
    if done.returncode != 0:
        raise FlowerError(
            f"{PKI_SCRIPT} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )
    return SitePki(Path(out_dir).resolve())


def register_supernode(connection: Connection, public_key: Path) -> int | None:
    """``flwr supernode register KEY CONNECTION``: the node ID, or None if the key already was.

    Raises FlowerError on any other refusal (``flwr`` exits 0 then too: the JSON says so).
    """
    args = ["supernode", "register", str(public_key), connection.name, "--format", "json"]
    done = flwr_cli(args, connection)
    text = done.stdout
    start, end = text.find("{"), text.rfind("}")
    data: dict[str, Any] = json.loads(text[start : end + 1]) if 0 <= start < end else {}
    if data.get("success"):
        return int(data["node-id"])
    message = str(data.get("error-message", text.strip() or done.stderr.strip()))
    if "already in use" in message:  # registered by an earlier run on the same database
        return None
    raise FlowerError(f"`flwr supernode register {public_key}` failed: {message}")


def deploy_local(
    *,
    out_dir: Path,
    sites: int,
    run_config: Mapping[str, ConfigValue],
    timeout: float = 3600.0,
    echo: bool = True,
    secure: bool = False,
    database: bool = False,
) -> FederationResult:
    """A real ``flower-superlink`` and ``sites`` real ``flower-supernode`` processes on 127.0.0.1.

    ``database``: the SuperLink keeps its state in ``flower/state.db`` (a restarted SuperLink keeps
    its runs and node ids); by default it is in memory, Flower's default, which is faster (Flower's
    SQLite object store writes every object of every message: +1.6 s per round here,
    docs/results/bench_rounds.md).

    ``secure``: deploy/pki.sh writes a CA, the SuperLink certificate and one key per site into
    ``out_dir``/pki; the SuperLink runs with TLS and ``--enable-supernode-auth``, every site's
    public key is registered with ``flwr supernode register``, and each SuperNode connects with
    the CA certificate and its own private key.
    """
    home = _with_home(out_dir)
    run_dir = home / "run"
    config = {"min-sites": sites, **run_config, "run-dir": str(run_dir)}
    check_federation(config, sites=sites)
    flower = home / "flower"
    names = [site_name(i) for i in range(sites)]
    pki = make_pki(home / "pki", names) if secure else None
    link = LocalSuperLink(
        flower,
        database=flower / "state.db" if database else None,
        tls=pki.tls if pki is not None else None,
        enable_supernode_auth=pki is not None,
        startup_timeout=STARTUP_TIMEOUT,
    )
    with link:
        if pki is not None:
            for name in names:
                register_supernode(link.connection, pki.public_key(name))
        nodes = [
            LocalSuperNode(
                link.address,
                flower,
                name=name,
                home=link.home,
                node_config=site_node_config(home, i, sites),
                root_certificates=pki.ca_cert if pki is not None else None,
                auth_private_key=pki.private_key(name) if pki is not None else None,
                startup_timeout=STARTUP_TIMEOUT,
                extra_env=SITE_ENV,
            )
            for i, name in enumerate(names)
        ]
        try:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_connected()
            result = run_app(
                APP_DIR,
                link.connection,
                run_config=config,
                timeout=timeout,
                log_dir=home / "logs",
                echo=sys.stdout if echo else None,
            )
        finally:
            for node in nodes:
                node.stop()
    return FederationResult(
        result, run_dir, home, _read_history(run_dir), pki.root if pki is not None else None
    )


def summarize(fed: FederationResult) -> str:
    """A short human summary: verdict, per-round outcomes and metrics, final head or why none."""
    from server.strategy import round_counts

    lines = [f"Flower run {fed.result.run_id}: {fed.result.status} in {fed.result.elapsed:.0f} s"]
    if fed.pki_dir is not None:
        lines.append(
            f"  TLS + SuperNode authentication; CA, certificates and site keys in {fed.pki_dir}"
        )
    for entry in fed.history:
        metrics = {**entry.get("site_metrics_mean", {}), **entry.get("server_metrics", {})}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "seconds" not in k)
        lines.append(
            f"  round {entry['round']}: {round_counts(entry)}, "
            f"{entry.get('wall_seconds', 0):.1f} s{'; ' + shown if shown else ''}"
        )
    if fed.ok:
        lines.append(
            f"final head: {fed.final_head} (evaluate with: fedembed evaluate --head {fed.final_head})"
        )
    else:
        if fed.result.details:
            lines.append(f"failed: {fed.result.details}")
        lines.append(f"no final head; log: {fed.result.log_path}")
    return "\n".join(lines)
