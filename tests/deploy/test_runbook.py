"""The operator runbook's local rehearsal (TLS + SuperNode authentication on loopback), typed as an operator would.

Command sequence (run from the repository root; R is a scratch directory, here a pytest tmp_path;
the test uses free ports where this text says 9092 / 9094 / 9095):

    # every shell (coordinator and sites)
    source .venv/bin/activate
    export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

    # 1. coordinator: consortium CA, SuperLink certificate, one authentication key per site
    deploy/pki.sh $R/pki hospital-a hospital-b

    # 2. coordinator: SuperLink with TLS and SuperNode authentication
    FLWR_HOME=$R/coordinator/flwr FEDEMBED_HOME=$R/coordinator \\
    flower-superlink --ssl-ca-certfile $R/pki/ca.crt --ssl-certfile $R/pki/server.pem \\
        --ssl-keyfile $R/pki/server.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation \\
        --host 127.0.0.1 --port 9092 --database $R/coordinator/state.db
    curl --cacert $R/pki/ca.crt https://127.0.0.1:9092/health    # 200 once up (test: urllib)

    # 3. coordinator: the flwr CLI connection, file $R/coordinator/flwr/config.toml
    [superlink]
    default = "fedembed"

    [superlink.fedembed]
    address = "127.0.0.1:9092"
    root-certificates = "$R/pki/ca.crt"

    # 4. coordinator: register each site's public key
    export FLWR_HOME=$R/coordinator/flwr
    flwr supernode register $R/pki/sites/hospital-a/site.key.pub fedembed
    flwr supernode register $R/pki/sites/hospital-b/site.key.pub fedembed

    # 5. each site receives ca.crt and its own site.key (never ca.key), then starts its SuperNode
    install -D -m 0644 $R/pki/ca.crt $R/hospital-a/ca.crt
    install -D -m 0600 $R/pki/sites/hospital-a/site.key $R/hospital-a/site.key
    FLWR_HOME=$R/hospital-a/flwr FEDEMBED_HOME=$R/hospital-a \\
    flower-supernode --superlink 127.0.0.1:9092 --root-certificates $R/hospital-a/ca.crt \\
        --auth-supernode-private-key $R/hospital-a/site.key --port 9094 \\
        --node-config "site-name='hospital-a' data='synthetic-radiology' site=0 n=60 state-dir='$R/hospital-a/state' cache-dir='$R/hospital-a/cache'"
    #    (hospital-b: the same with hospital-b, site=1 and --port 9095)

    # 6. coordinator: both sites online?
    flwr supernode list fedembed --format json      # 2 nodes, "status": "online"

    # 7. coordinator: start the run; judge it by `flwr ls`, never by `flwr run`'s exit code
    flwr run . fedembed --format json \\
        --run-config "num-server-rounds=1 min-sites=2 run-dir='$R/coordinator/run'"    # -> "run-id"
    flwr ls fedembed --run-id RUN_ID --format json    # until "status" is finished:*;
                                                      # success is "finished:completed" only
    flwr log RUN_ID fedembed --show

    # 8. each site: what left it (only head arrays and scalar metrics)
    fedembed audit $R/hospital-a/state

    # 9. stop: Ctrl-C (SIGTERM) each flower-supernode, then flower-superlink

The test adds tiny encoders to the run-config (image-encoder, text-encoder = local model dirs,
encoder-image-size=0, dataset-n=120, local-epochs=2, batch-size=16; the default head 'aligned' with
start-steps=2, so its closed-form start's queries run too) so it runs in
about a minute; an operator keeps the packaged defaults or sets the consortium's encoders. One round
is enough to rehearse the commands (each further round costs every site a ClientApp process per
message); several rounds over real SuperNodes are run by tests/deploy/test_secure_deployment.py
(TLS + authentication, through ``deploy_local``) and tests/deploy/test_secagg_deployment.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from common.config import HOME_ENV
from simulations.flower.federate import APP_DIR, STARTUP_TIMEOUT
from simulations.flower.flwr_cli import FINISHED_COMPLETED, flower_command, flower_env
from simulations.flower.processes import ManagedProcess, free_port
from simulations.flower.run_config import ConfigValue, format_config
from tests.tiny_config import tiny_run_config

PKI = APP_DIR / "deploy" / "pki.sh"
SITES = ("hospital-a", "hospital-b")
RUN_TIMEOUT = 900.0


def _env(home: Path) -> dict[str, str]:
    """The operator's shell: venv on PATH, offline flags, FLWR_HOME and FEDEMBED_HOME of one party."""
    env = flower_env(home / "flwr")
    env[HOME_ENV] = str(home)
    return env


def _sh(
    argv: Sequence[str], env: Mapping[str, str], *, cwd: Path | None = None, timeout: float = 300
) -> str:
    """Run one command like an operator would; fail the test with its output if it fails."""
    done = subprocess.run(
        list(argv),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _flwr_json(args: Sequence[str], env: Mapping[str, str], **kwargs: Any) -> dict[str, Any]:
    """``flwr ARGS --format json``: the JSON it printed, which must say success."""
    out = _sh([flower_command("flwr"), *args, "--format", "json"], env, **kwargs)
    data: dict[str, Any] = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert data.get("success") is True, data
    return data


def _wait(predicate: Any, *, timeout: float, what: str, interval: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"not {what} after {timeout:.0f} s")


def _healthy(url: str, ca_cert: Path) -> bool:
    """``curl --cacert ca.crt URL`` answers 200."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def _daemons() -> Iterator[list[ManagedProcess]]:
    """Started daemons, stopped by PID in reverse order (sites first) even if the test fails."""
    started: list[ManagedProcess] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop(timeout=20)


def test_pki_script_is_idempotent_and_adds_sites_with_the_same_ca(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    first = _sh([str(PKI), str(out), "--server-name", "superlink.example", "a"], os.environ)
    assert f"flwr supernode register {out}/sites/a/site.key.pub fedembed" in first
    files = ["ca.crt", "ca.key", "server.pem", "server.key", "sites/a/site.key"]
    before = {name: (out / name).read_bytes() for name in files}
    for private in ("ca.key", "server.key", "sites/a/site.key"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    pub = (out / "sites/a/site.key.pub").read_text().split()
    assert pub[0] == "ecdsa-sha2-nistp384" and pub[2] == "a"

    # Again, plus a new site: nothing that existed changes; the new site gets its own key.
    _sh([str(PKI), str(out), "--server-name", "superlink.example", "a", "b"], os.environ)
    assert {name: (out / name).read_bytes() for name in files} == before
    assert (out / "sites/b/site.key").read_bytes() != before["sites/a/site.key"]

    # A new server name re-issues the SuperLink certificate under the same CA, keeping old names.
    _sh([str(PKI), str(out), "--server-ip", "10.1.2.3", "a"], os.environ)
    assert (out / "ca.crt").read_bytes() == before["ca.crt"]
    san = _sh(
        ["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
        os.environ,
    )
    for entry in (
        "DNS:localhost",
        "DNS:superlink.example",
        "IP Address:127.0.0.1",
        "IP Address:10.1.2.3",
    ):
        assert entry in san
    _sh(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")], os.environ)

    # --force: a new CA, and the sites named get new keys.
    _sh([str(PKI), str(out), "--force", "a"], os.environ)
    assert (out / "ca.crt").read_bytes() != before["ca.crt"]
    assert (out / "sites/a/site.key").read_bytes() != before["sites/a/site.key"]

    bad = subprocess.run([str(PKI), str(out), "../escape"], capture_output=True, text=True)
    assert bad.returncode == 2 and "site name '../escape'" in bad.stderr
    assert "Usage:" in _sh([str(PKI), "--help"], os.environ)


@pytest.mark.slow
def test_runbook_local_rehearsal_with_tls_and_authentication(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    r = tmp_path
    coordinator = r / "coordinator"
    coordinator.mkdir()
    operator = _env(coordinator)
    link_port = free_port()
    address = f"127.0.0.1:{link_port}"
    ca = r / "pki" / "ca.crt"

    # 1. PKI
    _sh([str(PKI), str(r / "pki"), *SITES], operator)

    with _daemons() as daemons:
        # 2. SuperLink (TLS + SuperNode authentication)
        argv = [flower_command("flower-superlink")]
        argv += ["--ssl-ca-certfile", str(ca)]
        argv += ["--ssl-certfile", str(r / "pki" / "server.pem")]
        argv += ["--ssl-keyfile", str(r / "pki" / "server.key")]
        argv += ["--enable-supernode-auth", "--disable-runtime-dependency-installation"]
        argv += ["--host", "127.0.0.1", "--port", str(link_port)]
        argv += ["--database", str(coordinator / "state.db")]
        link = ManagedProcess(
            "superlink", argv, env=operator, log_dir=coordinator / "logs", cwd=coordinator
        )
        daemons.append(link)
        _wait(
            lambda: _healthy(f"https://{address}/health", ca) or not link.running,
            timeout=STARTUP_TIMEOUT,
            what="SuperLink healthy",
        )
        assert link.running, link.logs()[-2000:]

        # 3. CLI connection
        (coordinator / "flwr" / "config.toml").write_text(
            '[superlink]\ndefault = "fedembed"\n\n'
            f'[superlink.fedembed]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
        )

        # 4. register the sites' public keys
        registered: dict[str, int] = {}
        for site in SITES:
            public_key = r / "pki" / "sites" / site / "site.key.pub"
            reply = _flwr_json(["supernode", "register", str(public_key), "fedembed"], operator)
            registered[site] = int(reply["node-id"])

        # 5. each site: its copy of ca.crt and its own key, then its SuperNode
        for index, site in enumerate(SITES):
            home = r / site
            _sh(["install", "-D", "-m", "0644", str(ca), str(home / "ca.crt")], operator)
            key = r / "pki" / "sites" / site / "site.key"
            _sh(["install", "-D", "-m", "0600", str(key), str(home / "site.key")], operator)
            node_config: dict[str, ConfigValue] = {
                "site-name": site,
                "data": "synthetic-radiology",
                "site": index,
                "n": 60,
                "state-dir": str(home / "state"),
                "cache-dir": str(home / "cache"),
            }
            argv = [flower_command("flower-supernode"), "--superlink", address]
            argv += ["--root-certificates", str(home / "ca.crt")]
            argv += ["--auth-supernode-private-key", str(home / "site.key")]
            argv += ["--port", str(free_port())]
            argv += ["--node-config", format_config(node_config)]
            daemons.append(
                ManagedProcess(
                    f"supernode-{site}", argv, env=_env(home), log_dir=home / "logs", cwd=home
                )
            )

        # 6. both sites online, with the identities that were registered
        def online() -> set[int]:
            assert all(d.running for d in daemons), [d.logs()[-1500:] for d in daemons]
            nodes = _flwr_json(["supernode", "list", "fedembed"], operator)["nodes"]
            return {int(n["node-id"]) for n in nodes if n["status"] == "online"}

        _wait(
            lambda: online() == set(registered.values()),
            timeout=STARTUP_TIMEOUT,
            what="both sites online",
            interval=3.0,
        )

        # 7. the run, judged by `flwr ls`
        run_config: dict[str, ConfigValue] = {
            "num-server-rounds": 1,
            "min-sites": 2,
            "run-dir": str(coordinator / "run"),
            # the default head: the run starts with the closed-form start's queries (2 CG steps)
            **tiny_run_config(tiny_model_dirs, head="aligned", **{"start-steps": 2}),
        }
        started = _flwr_json(
            ["run", ".", "fedembed", "--run-config", format_config(run_config)],
            operator,
            cwd=APP_DIR,
        )
        run_id = str(started["run-id"])

        asked = [0.0]

        def finished() -> dict[str, Any] | None:
            # `flwr ls` (a second of CPU) when the run exported its head or every 20 s
            exported = (coordinator / "run" / "final").is_dir()
            if not exported and time.monotonic() - asked[0] < 20.0:
                return None
            asked[0] = time.monotonic()
            runs = _flwr_json(["ls", "fedembed", "--run-id", run_id], operator)["runs"]
            row: dict[str, Any] = runs[0]
            return row if str(row["status"]).startswith("finished:") else None

        row = _wait(finished, timeout=RUN_TIMEOUT, what=f"run {run_id} finished", interval=0.5)
        log = _sh([flower_command("flwr"), "log", run_id, "fedembed", "--show"], operator)
        assert row["status"] == FINISHED_COMPLETED, f"{row}\n{log[-3000:]}"

        history = [
            json.loads(line)
            for line in (coordinator / "run" / "history.jsonl").read_text().splitlines()
            if line.strip()
        ]
        assert [e["round"] for e in history] == [1]
        assert all(len(e["sites"]) == 2 and not e["rejected"] for e in history)
        start = json.loads((coordinator / "run" / "run.json").read_text())["start"]
        assert start["method"] == "federated ridge least squares (CG)" and start["sites"] == 2

        # 8. each site's audit: only head arrays and scalars left it
        for site in SITES:
            audit = _sh([flower_command("fedembed"), "audit", str(r / site / "state")], operator)
            assert "verified" in audit, audit

    # 9. stopped by PID: nothing we started is still running
    assert all(not d.running for d in daemons)
