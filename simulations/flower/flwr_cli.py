"""Talking to a SuperLink: connections in FLWR_HOME, ``flwr run`` (the CLI), run status, stop and
logs (Flower's Control API in this process), run results."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import tomli
import tomli_w

from common.errors import FedEmbedError
from simulations.flower.run_config import ConfigValue, format_config

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

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


_GLOB = re.compile(r"[*?\[]")


def stage_app(app_dir: Path, into: Path) -> Path:
    """A copy in ``into`` (a new directory) of what ``flwr run`` packs from ``app_dir``; ``app_dir`` itself
    if the app's ``fab-include`` patterns do not name their top-level files and directories.

    ``flwr run DIR`` walks and resolves every file under DIR before it applies the app's
    fab-include patterns: from a checkout that holds its .venv that is about 4 s of CPU per run.
    The copy holds pyproject.toml, .gitignore and the top-level entries the patterns start with
    (``/client/**/*.py`` -> client/); Flower applies the same patterns to it, so the FAB and its
    hash are the same.
    """
    app_dir = Path(app_dir).resolve()
    project = tomli.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = project.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    tops = {str(p).lstrip("/").split("/", 1)[0] for p in patterns or ()}
    if not tops or any(not t or _GLOB.search(t) for t in tops):
        return app_dir
    into.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in sorted(tops | {"pyproject.toml", ".gitignore"}):
        source = app_dir / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, into / name)
    return into


def submit_run(
    app_dir: Path,
    connection: Connection,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    federation_config: Mapping[str, ConfigValue] | None = None,
) -> int:
    """Start a run of ``app_dir`` as ``flwr run APP CONNECTION`` does, from this process: the same
    FAB (Flower's ``build_fab_from_disk`` over the app staged by ``stage_app``), the same
    ``StartRun`` request and overrides; return the new run's ID (a ``flwr`` process would cost
    about 1.5 s of CPU)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import parse_config_args
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab
    from flwr.supercore.utils import simulation_config_from_json

    with tempfile.TemporaryDirectory(prefix="fedembed-app-") as tmp:
        fab_bytes = build_fab_from_disk(stage_app(app_dir, Path(tmp) / "app"))
    overrides = parse_config_args([format_config(run_config)] if run_config else None)
    federation = None
    if federation_config:
        parsed = parse_config_args([format_config(federation_config)])
        federation = simulation_config_from_json(
            {k.replace("-", "_"): v for k, v in parsed.items()}
        )
    request = StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
        override_config=user_config_to_proto(overrides),
        federation="",
        override_federation_config=federation,
        app_spec="",
    )
    with control_api(connection, "flwr run") as client:
        reply = client.StartRun(request)
    if not reply.HasField("run_id"):
        raise FlowerError("`flwr run` failed: the SuperLink started no run")
    return int(reply.run_id)


@contextlib.contextmanager
def control_api(connection: Connection, what: str) -> Iterator[ControlHttpClient]:
    """A Control API client for ``connection``, in this process; Flower's errors as FlowerError.

    ``flwr run`` / ``ls`` / ``log`` / ``stop`` each start a Python process that costs about 1.5 s
    of CPU, and a run is polled many times. These calls send the same requests to the same
    endpoints with the same client and interceptors as the CLI (Flower 1.41's
    ``ControlHttpClient``), and the CLI's own handler words the errors.
    ``what`` names the call in an error (``flwr ls`` ...).
    """
    import click
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.cli.utils import flwr_cli_exc_handler
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    root = connection.root_certificates
    client = ControlHttpClient.from_server_address(
        server_address=connection.address,
        insecure=root is None,
        root_certificates=None if root is None else Path(root).read_bytes(),
        interceptors=[
            CliClientHttpInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
        ],
    )
    try:
        with flwr_cli_exc_handler():
            yield client
    except click.ClickException as err:
        raise FlowerError(f"`{what}` failed: {err.format_message()}") from None
    finally:
        client.close()


def run_status(connection: Connection, run_id: int) -> RunStatus:
    """Status of one run, as ``flwr ls CONNECTION --run-id ID`` shows it."""
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    with control_api(connection, "flwr ls") as client:
        response = client.ListRuns(ListRunsRequest(run_id=run_id))
    rows = [
        r
        for r in format_runs([run_from_proto(p) for p in response.run_dict.values()], response.now)
        if r.run_id == run_id
    ]
    if not rows:
        raise FlowerError(f"run {run_id} is unknown to SuperLink {connection.address}")
    row = rows[0]
    details = str(row.details)
    return RunStatus(
        run_id, str(row.status_text), "" if details == "N/A" else details, float(row.elapsed)
    )


def stop_run(connection: Connection, run_id: int) -> None:
    """Stop a run, as ``flwr stop ID CONNECTION`` does (a run that already finished is left alone)."""
    from flwr.proto.control_pb2 import StopRunRequest

    with contextlib.suppress(FlowerError), control_api(connection, "flwr stop") as client:
        client.StopRun(StopRunRequest(run_id=run_id))


def run_logs(connection: Connection, run_id: int) -> str:
    """The run's whole log so far, as ``flwr log ID CONNECTION --show`` prints it, colour codes removed."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    with control_api(connection, "flwr log") as client:
        for response in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            return ANSI.sub("", response.log_output)
    return ""


class _LogStream:
    """The run's log as ``flwr log ID --stream`` streams it, copied to a file (and ``echo``) by a
    thread; the stream ends when the run does, or when the SuperLink goes away (``error`` then
    says why). The run's status, not its log stream, says whether a run finished."""

    def __init__(
        self, connection: Connection, run_id: int, path: Path, echo: IO[str] | None
    ) -> None:
        self.path = path
        self.echo = echo
        self.connection = connection
        self.run_id = run_id
        self.error = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        from flwr.proto.control_pb2 import StreamLogsRequest

        request = StreamLogsRequest(run_id=self.run_id, after_timestamp=0.0)
        try:
            with (
                open(self.path, "a", encoding="utf-8") as out,
                control_api(self.connection, "flwr log --stream") as client,
            ):
                for response in client.StreamLogs(request):
                    if self._closed.is_set():
                        return
                    clean = ANSI.sub("", response.log_output)
                    out.write(clean)
                    out.flush()
                    if self.echo is not None:
                        self.echo.write(clean)
                        self.echo.flush()
        except Exception as err:  # a broken stream only ends the copy
            self.error = f"{type(err).__name__}: {err}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop copying (the stream itself ends with the run; a daemon thread never blocks exit)."""
        self._closed.set()
        self._thread.join(timeout=timeout)


def wait_for_run(
    connection: Connection,
    run_id: int,
    *,
    timeout: float,
    poll_interval: float = 0.5,
    stream: _LogStream | None = None,
    started: float | None = None,
) -> RunStatus:
    """Poll the run's status until it is finished:*; stop it and raise FlowerError on timeout.

    ``timeout`` counts from ``started`` (a time.monotonic() value; default now). The status is
    asked every ``poll_interval`` seconds, and at once when an open log ``stream`` ends (it ends
    with the run).
    """
    deadline = (time.monotonic() if started is None else started) + timeout
    next_poll = time.monotonic() + poll_interval
    was_streaming = stream is not None and stream.running
    while True:
        streaming = stream is not None and stream.running
        now = time.monotonic()
        if now >= next_poll or (was_streaming and not streaming):
            status = run_status(connection, run_id)
            if status.finished:
                return status
            next_poll = now + poll_interval
        was_streaming = streaming
        if now >= deadline:
            stop_run(connection, run_id)
            final = _await_finish(connection, run_id, 20.0)
            raise FlowerError(
                f"Flower run {run_id} did not finish within {timeout:.0f} s "
                f"(status now {final.status}); it was stopped"
            )
        time.sleep(0.1)


def _await_finish(connection: Connection, run_id: int, timeout: float) -> RunStatus:
    deadline = time.monotonic() + timeout
    status = run_status(connection, run_id)
    while not status.finished and time.monotonic() < deadline:
        time.sleep(0.5)
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
    poll_interval: float = 0.5,
    check: bool = False,
) -> RunResult:
    """Submit an app (``submit_run``), wait for finished:*, and return its status and log.

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
