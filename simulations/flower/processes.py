"""Flower SuperLink and SuperNodes as real local processes whose whole process trees are ended."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import psutil

from simulations.flower.flwr_cli import (
    ANSI,
    DEFAULT_CONNECTION,
    Connection,
    FlowerError,
    TlsFiles,
    flower_command,
    flower_env,
    set_parent_death_signal,
    tail,
    write_connection,
)
from simulations.flower.run_config import ConfigValue, format_config

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- process tracking

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _alive(process: psutil.Process) -> bool:
    """True if ``process`` (the same one, not a reused PID) runs; a zombie counts as gone."""
    try:
        return process.is_running() and process.status() not in _GONE
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [child for child in children if _alive(child)]


def descendants_running(pid: int, command: str) -> list[int]:
    """PIDs of live descendants of ``pid`` whose command line mentions ``command``.

    E.g. the ServerApp of a SuperLink (``flwr-serverapp``) or the ClientApp a SuperNode runs for
    the current message (``flwr-clientapp``), to kill one of them by PID in a fault test.
    """
    found = []
    for child in descendants(pid):
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if any(command in part for part in argv[:2]):
            found.append(child.pid)
    return found


def _session(process: psutil.Process) -> int | None:
    """Session ID of ``process`` (psutil has none: os.getsid), None once it is gone."""
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def session_members(session_ids: set[int]) -> list[psutil.Process]:
    """Every live process in one of these sessions (found even if orphaned)."""
    return [p for p in psutil.process_iter() if _session(p) in session_ids and _alive(p)]


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
                preexec_fn=set_parent_death_signal if die_with_parent else None,
            )
        except OSError as err:
            self._out.close()
            self._err.close()
            raise FlowerError(f"cannot start {name} ({self.argv[0]}): {err}") from err
        self.pid = self._popen.pid
        self.tree: dict[int, psutil.Process] = {}
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
            self.tree.update((child.pid, child) for child in found)
            self.sessions.update(child.pid for child in found if _session(child) == child.pid)

    def logs(self, *, since_start: bool = True) -> str:
        """stdout + stderr of this process (only what this start wrote, by default)."""
        out_from, err_from = self.log_offsets if since_start else (0, 0)
        parts = []
        for path, offset in ((self.stdout_path, out_from), (self.stderr_path, err_from)):
            with open(path, "rb") as handle:
                handle.seek(offset)
                parts.append(handle.read().decode("utf-8", errors="replace"))
        return ANSI.sub("", "".join(parts))

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
            left = {p.pid: p for p in session_members(sessions)}
            left.update((pid, p) for pid, p in self.tree.items() if _alive(p))
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for process in left.values():  # psutil refuses to signal a PID that now names another
            with contextlib.suppress(psutil.Error):
                process.kill()
        # SIGKILL is delivered asynchronously: return only once the processes are really gone.
        deadline = time.monotonic() + 5.0
        while any(_alive(p) for p in left.values()) and time.monotonic() < deadline:
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
                f"log {process.stderr_path}: {tail(process.logs())}"
            )
        time.sleep(interval)
    raise FlowerError(f"{process.name} not {what} after {timeout:.0f} s; log {process.stderr_path}")


# ---------------------------------------------------------------- SuperLink and SuperNode


class _LocalFlowerProcess(ABC):
    """A Flower process this session starts: stop()/kill() end its process tree; as a context
    manager it is started on entry and stopped on exit, also after an exception."""

    process: ManagedProcess | None

    @abstractmethod
    def start(self) -> Self:
        """Start the process and wait until it is ready."""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; descendants end too (a SuperLink's ServerApp
        and Ray; a SuperNode's SuperExec and ClientApps)."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the process and its descendants (a crash)."""
        if self.process is not None:
            self.process.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LocalSuperLink(_LocalFlowerProcess):
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

    def start(self) -> Self:
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

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (or kill) and start again on the same port and database."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()


class LocalSuperNode(_LocalFlowerProcess):
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

    def start(self, *, wait: bool = True) -> Self:
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

    def restart(self, *, kill: bool = False, wait: bool = True) -> Self:
        """Stop (or kill) and start again with the same config; it gets a new node ID."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(wait=wait)


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
