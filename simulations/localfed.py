"""Run a Flower SuperLink, SuperNodes and apps as real local processes (tests, simulate, deploy-local)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import tomli
import tomli_w

from common.errors import ConfigError, FedEmbedError

ConfigValue = bool | int | float | str

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

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_PR_SET_PDEATHSIG = 1


class FlowerError(FedEmbedError):
    """A Flower process that would not start, or a run that failed, timed out or was lost."""


# ---------------------------------------------------------------- environment and config


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Render ``{key: value}`` as Flower's ``--node-config`` / ``--run-config`` string.

    Strings become TOML literal strings ('...', backslashes kept) or, when they contain a single
    quote, basic strings ("..."); a string with both quote kinds cannot be passed this way.
    """
    return " ".join(f"{key}={_format_value(key, value)}" for key, value in values.items())


def _format_value(key: str, value: ConfigValue) -> str:
    if not _KEY.match(key):
        raise ConfigError(f"config key {key!r}: use letters, digits, '-', '_' or '.' only")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        has_control = any(ord(ch) < 32 for ch in value)
        if "'" not in value and not has_control:
            return f"'{value}'"
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)
        raise ConfigError(f"config key {key!r}: a string with both ' and \" cannot be passed")
    raise ConfigError(
        f"config key {key!r}: {type(value).__name__} is not a bool, int, float or str"
    )


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


# ---------------------------------------------------------------- process tracking


def _proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgid, session id, start time) of a process from /proc, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _live_processes() -> Iterator[tuple[int, tuple[str, int, int, int, int]]]:
    """(pid, stat) of every process that runs (zombies excluded)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) and stat[0] not in ("Z", "X"):
            yield int(entry), stat


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid``, read from /proc."""
    children: dict[int, list[tuple[int, int]]] = {}
    for child, stat in _live_processes():
        children.setdefault(stat[1], []).append((child, stat[4]))
    found: list[tuple[int, int]] = []
    stack = [pid]
    while stack:
        for child_entry in children.get(stack.pop(), []):
            found.append(child_entry)
            stack.append(child_entry[0])
    return found


def descendants_running(pid: int, command: str) -> list[int]:
    """PIDs of live descendants of ``pid`` whose command line mentions ``command``.

    E.g. the ServerApp of a SuperLink (``flwr-serverapp``) or the ClientApp a SuperNode runs for
    the current message (``flwr-clientapp``), to kill one of them by PID in a fault test.
    """
    found = []
    for child, _ in descendants(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if any(command.encode() in part for part in argv[:2]):
            found.append(child)
    return found


def session_members(session_ids: set[int]) -> list[tuple[int, int]]:
    """(pid, start time) of every live process in one of these sessions (found even if orphaned)."""
    return [(pid, stat[4]) for pid, stat in _live_processes() if stat[3] in session_ids]


def _signal_if_same(pid: int, start: int, sig: int) -> None:
    """Signal ``pid`` unless it exited or its PID now belongs to another process."""
    stat = _proc_stat(pid)
    if stat is not None and stat[4] == start and stat[0] not in ("Z", "X"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _is_session_leader(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[3] == pid


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this child when the process that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_LIVE: dict[int, ManagedProcess] = {}
_LIVE_LOCK = threading.Lock()


def _kill_all_live() -> None:
    """atexit guard: SIGKILL every process tree this module started that is still running."""
    with _LIVE_LOCK:
        processes = list(_LIVE.values())
    for process in processes:
        process.kill()


atexit.register(_kill_all_live)


def live_pids() -> list[int]:
    """PIDs of the processes this module started that still run (not their descendants)."""
    with _LIVE_LOCK:
        return [pid for pid, proc in _LIVE.items() if proc.running]


class ManagedProcess:
    """A child in its own session with logs in files; stop() and kill() also end its descendants."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_dir: Path,
        cwd: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self._out: IO[bytes] = open(self.stdout_path, "ab")  # noqa: SIM115 - closed in _reaped
        self._err: IO[bytes] = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in _reaped
        self.log_offsets = (self._out.tell(), self._err.tell())
        try:
            self._popen = subprocess.Popen(
                self.argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
            )
        except OSError as err:
            self._out.close()
            self._err.close()
            raise FlowerError(f"cannot start {name} ({self.argv[0]}): {err}") from err
        self.pid = self._popen.pid
        self.tree: dict[int, int] = {}
        self.sessions: set[int] = set()
        self._ended = False
        with _LIVE_LOCK:
            _LIVE[self.pid] = self

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code (negative signal number if killed), None while running."""
        return self._popen.poll()

    def remember_tree(self) -> None:
        """Record the current descendants so stop()/kill() can end them even once orphaned."""
        if self.running:
            found = descendants(self.pid)
            self.tree.update(found)
            self.sessions.update(pid for pid, _ in found if _is_session_leader(pid))

    def logs(self, *, since_start: bool = True) -> str:
        """stdout + stderr of this process (only what this start wrote, by default)."""
        out_from, err_from = self.log_offsets if since_start else (0, 0)
        parts = []
        for path, offset in ((self.stdout_path, out_from), (self.stderr_path, err_from)):
            with open(path, "rb") as handle:
                handle.seek(offset)
                parts.append(handle.read().decode("utf-8", errors="replace"))
        return _ANSI.sub("", "".join(parts))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s, then end stray descendants."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the process group and every recorded descendant at once (a crash)."""
        self._end(signal.SIGKILL, 5.0)

    def _end(self, sig: int, timeout: float) -> None:
        if self._ended:  # its PID and session ID may belong to someone else by now
            return
        self._ended = True
        self.remember_tree()
        if self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self._popen.wait(timeout=10)
        self._reaped()
        # Everything left in this session, or in a session a descendant opened (the SuperLink's
        # SuperExec detaches), or recorded in the tree. Flower's parent-PID monitor ends most of
        # it within ~0.2 s of the parent's death; SIGKILL what remains after a grace period.
        sessions = {self.pid} | self.sessions
        deadline = time.monotonic() + (3.0 if sig == signal.SIGTERM else 0.0)
        while True:
            left = dict(session_members(sessions))
            left.update((p, s) for p, s in self.tree.items() if pid_alive(p))
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for pid, start in left.items():
            _signal_if_same(pid, start, signal.SIGKILL)
        # SIGKILL is delivered asynchronously: return only once the processes are really gone.
        deadline = time.monotonic() + 5.0
        while any(pid_alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _reaped(self) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(self.pid, None)
        self._out.close()
        self._err.close()

    def all_pids(self) -> list[int]:
        """This process and every descendant recorded so far."""
        return [self.pid, *self.tree]


def _wait_for(
    predicate: Any, *, timeout: float, process: ManagedProcess, what: str, interval: float = 0.2
) -> Any:
    """Poll ``predicate()`` until truthy; raise FlowerError if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if not process.running:
            raise FlowerError(
                f"{process.name} exited with code {process.returncode} before {what}; "
                f"log {process.stderr_path}: {_tail(process.logs())}"
            )
        time.sleep(interval)
    raise FlowerError(f"{process.name} not {what} after {timeout:.0f} s; log {process.stderr_path}")


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------- SuperLink and SuperNode


class LocalSuperLink:
    """``flower-superlink`` on 127.0.0.1 (one free port serves Fleet, Control and ServerAppIo).

    Writes connection ``connection_name`` into ``home``/config.toml once healthy. Use as a context
    manager, or start()/stop(); the process tree is ended on exit, also after an exception.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        home: Path | None = None,
        simulation: bool = False,
        database: Path | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        connection_name: str = DEFAULT_CONNECTION,
        tls: TlsFiles | None = None,
        enable_supernode_auth: bool = False,
        startup_timeout: float = 60.0,
        die_with_parent: bool = True,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.home = Path(home).resolve() if home is not None else self.run_dir / "flwr-home"
        self.extra_env = dict(extra_env or {})
        self.simulation = simulation
        self.database = Path(database).resolve() if database is not None else None
        self.port = port or free_port(host)
        self.host = host
        self.connection_name = connection_name
        self.tls = tls
        self.enable_supernode_auth = enable_supernode_auth
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.extra_args = list(extra_args)
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        """host:port for local SuperNodes (``--superlink``) and the CLI connection."""
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{host}:{self.port}"

    @property
    def connection(self) -> Connection:
        """The CLI connection to this SuperLink."""
        ca = self.tls.ca_cert if self.tls is not None else None
        return Connection(self.connection_name, self.home, self.address, ca)

    @property
    def env(self) -> dict[str, str]:
        """Environment of this SuperLink (and its ServerApp or simulation processes)."""
        return {**flower_env(self.home), **self.extra_env}

    def argv(self) -> list[str]:
        """The command line that starts this SuperLink."""
        argv = [flower_command("flower-superlink"), "--host", self.host, "--port", str(self.port)]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(self.tls.ca_cert)]
            argv += ["--ssl-certfile", str(self.tls.server_cert)]
            argv += ["--ssl-keyfile", str(self.tls.server_key)]
        if self.enable_supernode_auth:
            argv.append("--enable-supernode-auth")
        if self.simulation:
            argv.append("--simulation")
        if self.database is not None:
            argv += ["--database", str(self.database)]
        return argv + self.extra_args

    def start(self) -> LocalSuperLink:
        """Start the process, wait until /health answers, then write the CLI connection."""
        if self.process is not None and self.process.running:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            "superlink",
            self.argv(),
            env=self.env,
            log_dir=self.run_dir,
            cwd=self.run_dir,
            die_with_parent=self.die_with_parent,
        )
        try:
            _wait_for(
                self.healthy,
                timeout=self.startup_timeout,
                process=self.process,
                what=f"healthy on {self.address}",
            )
            write_connection(self.connection)
        except BaseException:
            self.process.kill()
            raise
        return self

    def healthy(self) -> bool:
        """True if the SuperLink answers GET /health with 200."""
        scheme = "http" if self.tls is None else "https"
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        try:
            with urllib.request.urlopen(
                f"{scheme}://{self.address}/health", timeout=2, context=context
            ) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; descendants (ServerApp, Ray) end too."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the SuperLink and its descendants (a crash)."""
        if self.process is not None:
            self.process.kill()

    def restart(self, *, kill: bool = False) -> LocalSuperLink:
        """Stop (or kill) and start again on the same port and database."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def __enter__(self) -> LocalSuperLink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalSuperNode:
    """``flower-supernode`` connected to a SuperLink, with its own free Runtime API port."""

    def __init__(
        self,
        superlink_address: str,
        run_dir: Path,
        *,
        name: str,
        home: Path | None = None,
        node_config: Mapping[str, ConfigValue] | None = None,
        port: int | None = None,
        root_certificates: Path | None = None,
        auth_private_key: Path | None = None,
        isolation: str | None = None,
        startup_timeout: float = 60.0,
        die_with_parent: bool = True,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.superlink_address = superlink_address
        self.extra_env = dict(extra_env or {})
        self.run_dir = Path(run_dir).resolve()
        self.name = name
        self.home = Path(home).resolve() if home is not None else self.run_dir / "flwr-home"
        self.node_config = dict(node_config or {})
        self.port = port or free_port()
        self.root_certificates = root_certificates
        self.auth_private_key = auth_private_key
        self.isolation = isolation
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.extra_args = list(extra_args)
        self.process: ManagedProcess | None = None
        self.node_id: int | None = None

    def argv(self) -> list[str]:
        """The command line that starts this SuperNode."""
        argv = [flower_command("flower-supernode"), "--superlink", self.superlink_address]
        argv += ["--port", str(self.port)]
        if self.root_certificates is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None:
            argv += ["--auth-supernode-private-key", str(self.auth_private_key)]
        if self.isolation is not None:
            argv += ["--isolation", self.isolation]
        if self.node_config:
            argv += ["--node-config", format_config(self.node_config)]
        return argv + self.extra_args

    def start(self, *, wait: bool = True) -> LocalSuperNode:
        """Start the process; with ``wait``, block until it has registered and got a node ID."""
        if self.process is not None and self.process.running:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        self.node_id = None
        self.process = ManagedProcess(
            f"supernode-{self.name}",
            self.argv(),
            env={**flower_env(self.home), **self.extra_env},
            log_dir=self.run_dir,
            cwd=self.run_dir,
            die_with_parent=self.die_with_parent,
        )
        if wait:
            try:
                self.wait_connected()
            except BaseException:
                self.process.kill()
                raise
        return self

    def wait_connected(self, timeout: float | None = None) -> int:
        """Block until this start's log shows ``SuperNode ID: N``; return N."""
        if self.process is None:
            raise FlowerError(f"supernode {self.name} was not started")
        process = self.process

        def node_id() -> int | None:
            found = _NODE_ID.findall(process.logs())
            return int(found[-1]) if found else None

        self.node_id = _wait_for(
            node_id,
            timeout=self.startup_timeout if timeout is None else timeout,
            process=process,
            what="connected to the SuperLink",
        )
        return self.node_id

    @property
    def running(self) -> bool:
        """True while the SuperNode process runs."""
        return self.process is not None and self.process.running

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s (its SuperExec and ClientApps end too)."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the SuperNode, its SuperExec and any running ClientApp (a site crash)."""
        if self.process is not None:
            self.process.kill()

    def restart(self, *, kill: bool = False, wait: bool = True) -> LocalSuperNode:
        """Stop (or kill) and start again with the same config; it gets a new node ID."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(wait=wait)

    def __enter__(self) -> LocalSuperNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def local_federation(
    run_dir: Path,
    node_configs: Sequence[Mapping[str, ConfigValue]],
    *,
    database: Path | None = None,
    connection_name: str = DEFAULT_CONNECTION,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[LocalSuperLink, list[LocalSuperNode]]]:
    """A SuperLink plus one SuperNode per node config (named site0, site1, ...), stopped on exit."""
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(
            LocalSuperLink(
                run_dir, database=database, connection_name=connection_name, extra_env=extra_env
            )
        )
        nodes = [
            LocalSuperNode(
                link.address,
                run_dir,
                name=f"site{i}",
                home=link.home,
                node_config=cfg,
                extra_env=extra_env,
            )
            for i, cfg in enumerate(node_configs)
        ]
        for node in nodes:
            stack.callback(node.stop)
            node.start(wait=False)
        for node in nodes:
            node.wait_connected()
        yield link, nodes


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
                f"{_tail(self.log_text, 3)}"
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
        message = _tail(_ANSI.sub("", done.stdout + done.stderr), 4)
        raise FlowerError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {message}")
    return done


def _json_output(text: str, command: str) -> dict[str, Any]:
    """The JSON object a ``--format json`` command printed (ignoring any text around it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise FlowerError(f"`{command}` printed no JSON: {_tail(text, 3)}")
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
    return _ANSI.sub("", done.stdout + done.stderr)


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
            preexec_fn=_die_with_parent,
        )
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self._popen.stdout is not None
        with open(self.path, "a", encoding="utf-8") as out:
            for line in self._popen.stdout:
                clean = _ANSI.sub("", line)
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
