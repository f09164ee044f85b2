"""The ``flwr`` CLI wrapper: connections in FLWR_HOME, ``flwr run``/``ls``/``log``/``stop``, run results."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli
import tomli_w

from common.errors import FedEmbedError
from simulations.flower.run_config import ConfigValue, format_config

FINISHED_COMPLETED = "finished:completed"
FINISHED_PREFIX = "finished:"
DEFAULT_CONNECTION = "fedembed"

# Environment every Flower process gets: no telemetry, update checks, run-time installs or hub access.
FLOWER_ENV_DEFAULTS: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PR_SET_PDEATHSIG = 1


class FlowerError(FedEmbedError):
    """A Flower process that would not start, or a run that failed, timed out or was lost."""


def tail(text: str, lines: int = 5) -> str:
    """The last ``lines`` lines of ``text`` on one line, for error messages."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def set_parent_death_signal() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this child when the process that started it dies.

    prctl(PR_SET_PDEATHSIG) stays: psutil has no equivalent (it can only observe processes), and
    this is what ends a Flower process tree when the CLI itself is SIGKILLed.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def flower_env(home: Path, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower commands: ``base`` (default os.environ) + FLWR_HOME + offline flags.

    The interpreter's bin directory goes first on PATH: the SuperNode starts ``flower-superexec``
    and that starts ``flwr-clientapp`` by name, so they must resolve to this installation.
    """
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV_DEFAULTS)
    env["FLWR_HOME"] = str(Path(home).resolve())
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    return env


def flower_command(name: str) -> str:
    """Path of a Flower console script installed beside the running interpreter (else its name)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS SuperLink: CA certificate, server certificate and server key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class Connection:
    """A named SuperLink connection in ``home``/config.toml, as the ``flwr`` CLI uses it."""

    name: str
    home: Path
    address: str
    root_certificates: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands that use this connection."""
        return flower_env(self.home)


def write_connection(connection: Connection, *, make_default: bool = True) -> Path:
    """Add or replace ``[superlink.NAME]`` in ``home``/config.toml; return the file's path."""
    path = Path(connection.home) / "config.toml"
    config: dict[str, Any] = {}
    if path.exists():
        config = tomli.loads(path.read_text(encoding="utf-8"))
    superlink = config.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": connection.address}
    if connection.root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(connection.root_certificates).resolve())
    superlink[connection.name] = entry
    if make_default:
        superlink["default"] = connection.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(config), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunStatus:
    """One row of ``flwr ls --run-id ID --format json``."""

    run_id: int
    status: str
    details: str
    elapsed: float

    @property
    def finished(self) -> bool:
        """True once the run reached any finished:* status."""
        return self.status.startswith(FINISHED_PREFIX)


@dataclass(frozen=True)
class RunResult:
    """Outcome of run_app: success means status ``finished:completed`` and nothing else."""

    run_id: int
    status: str
    details: str
    elapsed: float
    log_text: str
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        """True only for ``finished:completed``."""
        return self.status == FINISHED_COMPLETED

    def raise_for_status(self) -> RunResult:
        """Return self if the run completed, else raise FlowerError naming status and log."""
        if not self.ok:
            where = f"; log {self.log_path}" if self.log_path else ""
            raise FlowerError(
                f"Flower run {self.run_id} ended {self.status} ({self.details}){where}: "
                f"{tail(self.log_text, 3)}"
            )
        return self


def flwr_cli(
    args: Sequence[str], connection: Connection, *, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` with the connection's FLWR_HOME; raise FlowerError if it fails."""
    argv = [flower_command("flwr"), *args]
    try:
        done = subprocess.run(
            argv,
            env=connection.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        raise FlowerError(f"`flwr {' '.join(args)}` did not return within {timeout:.0f} s") from err
    if done.returncode != 0:
        message = tail(ANSI.sub("", done.stdout + done.stderr), 4)
        raise FlowerError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {message}")
    return done


def _json_output(text: str, command: str) -> dict[str, Any]:
    """The JSON object a ``--format json`` command printed (ignoring any text around it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise FlowerError(f"`{command}` printed no JSON: {tail(text, 3)}")
    data: dict[str, Any] = json.loads(text[start : end + 1])
    if not data.get("success", False):
        raise FlowerError(f"`{command}` reported failure: {data.get('error-message', data)}")
    return data


def submit_run(
    app_dir: Path,
    connection: Connection,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    federation_config: Mapping[str, ConfigValue] | None = None,
    timeout: float = 300.0,
) -> int:
    """``flwr run APP CONNECTION --format json [...]``; return the new run's ID."""
    args = ["run", str(Path(app_dir).resolve()), connection.name, "--format", "json"]
    if run_config:
        args += ["--run-config", format_config(run_config)]
    if federation_config:
        args += ["--federation-config", format_config(federation_config)]
    done = flwr_cli(args, connection, timeout=timeout)
    return int(_json_output(done.stdout, "flwr run")["run-id"])


def run_status(connection: Connection, run_id: int) -> RunStatus:
    """Status of one run from ``flwr ls CONNECTION --run-id ID --format json``."""
    args = ["ls", connection.name, "--run-id", str(run_id), "--format", "json"]
    data = _json_output(flwr_cli(args, connection).stdout, "flwr ls")
    runs = [r for r in data.get("runs", []) if int(r["run-id"]) == run_id]
    if not runs:
        raise FlowerError(f"run {run_id} is unknown to SuperLink {connection.address}")
    row = runs[0]
    details = str(row.get("status-details", ""))
    return RunStatus(
        run_id,
        str(row["status"]),
        "" if details == "N/A" else details,
        float(row.get("elapsed", 0.0)),
    )


def stop_run(connection: Connection, run_id: int) -> None:
    """``flwr stop ID CONNECTION`` (a run that already finished is left alone)."""
    with contextlib.suppress(FlowerError):
        flwr_cli(["stop", str(run_id), connection.name, "--format", "json"], connection)


def run_logs(connection: Connection, run_id: int) -> str:
    """The run's whole log so far (``flwr log ID CONNECTION --show``), colour codes removed."""
    done = flwr_cli(["log", str(run_id), connection.name, "--show"], connection)
    return ANSI.sub("", done.stdout + done.stderr)


class _LogStream:
    """``flwr log ID --stream`` copied to a file (and ``echo``) by a thread; ends with the run."""

    def __init__(
        self, connection: Connection, run_id: int, path: Path, echo: IO[str] | None
    ) -> None:
        self.path = path
        self.echo = echo
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [flower_command("flwr"), "log", str(run_id), connection.name, "--stream"]
        self._popen = subprocess.Popen(
            argv,
            env=connection.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=set_parent_death_signal,
        )
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self._popen.stdout is not None
        with open(self.path, "a", encoding="utf-8") as out:
            for line in self._popen.stdout:
                clean = ANSI.sub("", line)
                out.write(clean)
                out.flush()
                if self.echo is not None:
                    self.echo.write(clean)
                    self.echo.flush()

    @property
    def running(self) -> bool:
        return self._popen.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGTERM)
        try:
            self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self._popen.wait()
        self._thread.join(timeout=timeout)


def wait_for_run(
    connection: Connection,
    run_id: int,
    *,
    timeout: float,
    poll_interval: float = 2.0,
    stream: _LogStream | None = None,
    started: float | None = None,
) -> RunStatus:
    """Poll ``flwr ls`` until the run is finished:*; stop it and raise FlowerError on timeout.

    ``timeout`` counts from ``started`` (a time.monotonic() value; default now). While a log
    stream is open (it ends when the run ends) ``flwr ls`` is only asked every 10 s, and at once
    when the stream ends: each ``flwr`` call costs about a second of CPU.
    """
    deadline = (time.monotonic() if started is None else started) + timeout
    next_poll = time.monotonic() + min(poll_interval, 1.0)
    was_streaming = stream is not None and stream.running
    while True:
        streaming = stream is not None and stream.running
        now = time.monotonic()
        if now >= next_poll or (was_streaming and not streaming):
            status = run_status(connection, run_id)
            if status.finished:
                return status
            next_poll = now + (max(poll_interval, 10.0) if streaming else poll_interval)
        was_streaming = streaming
        if now >= deadline:
            stop_run(connection, run_id)
            final = _await_finish(connection, run_id, 20.0)
            raise FlowerError(
                f"Flower run {run_id} did not finish within {timeout:.0f} s "
                f"(status now {final.status}); it was stopped"
            )
        time.sleep(0.2)


def _await_finish(connection: Connection, run_id: int, timeout: float) -> RunStatus:
    deadline = time.monotonic() + timeout
    status = run_status(connection, run_id)
    while not status.finished and time.monotonic() < deadline:
        time.sleep(1.0)
        status = run_status(connection, run_id)
    return status


def run_app(
    app_dir: Path,
    connection: Connection,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    federation_config: Mapping[str, ConfigValue] | None = None,
    stream: bool = True,
    timeout: float = 1800.0,
    log_dir: Path | None = None,
    echo: IO[str] | None = None,
    poll_interval: float = 2.0,
    check: bool = False,
) -> RunResult:
    """Submit an app with ``flwr run``, wait for finished:*, and return its status and log.

    Success is ``finished:completed`` only (``flwr run`` exits 0 for failed runs too). With
    ``stream`` the log is copied live to ``log_dir``/run-ID.log (and ``echo``); otherwise it is
    fetched once at the end. A run still going after ``timeout`` s is stopped (FlowerError).
    """
    started = time.monotonic()
    run_id = submit_run(
        app_dir, connection, run_config=run_config, federation_config=federation_config
    )
    log_path = (Path(log_dir) / f"run-{run_id}.log") if log_dir is not None else None
    streamer = None
    if stream:
        target = log_path or Path(connection.home) / "logs" / f"run-{run_id}.log"
        streamer = _LogStream(connection, run_id, target, echo)
    try:
        status = wait_for_run(
            connection,
            run_id,
            timeout=timeout,
            poll_interval=poll_interval,
            stream=streamer,
            started=started,
        )
        elapsed = time.monotonic() - started
    finally:
        if streamer is not None:
            streamer.close()
    if streamer is not None:
        log_text = streamer.path.read_text(encoding="utf-8")
        log_path = streamer.path
    else:
        log_text = run_logs(connection, run_id)
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(log_text, encoding="utf-8")
    result = RunResult(run_id, status.status, status.details, elapsed, log_text, log_path)
    return result.raise_for_status() if check else result
