"""Local processes whose whole process trees are ended (psutil): start, stop, kill, find descendants."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from simulations.flower.flwr_cli import (
    ANSI,
    FlowerError,
    set_parent_death_signal,
    tail,
)


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


def wait_for(
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
