"""A long-lived per-site worker that keeps torch and the site's embeddings loaded between Flower messages.

Flower 1.41 runs every message in a fresh ClientApp process, which would pay for ``import torch``
and reading the site's data on every round. The ClientApp (which imports only flwr and numpy) hands
the round to this worker over a local Unix socket instead, starting it on first use. The worker
computes exactly what the ClientApp would compute in-process (the same functions in
client/training.py); it listens on a Linux abstract socket named after the site's state directory
and the app's code, authenticates every connection with a key kept in the state directory (0600),
and exits when it has been idle for a while or when the SuperNode process tree it serves is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CODE_DIR = Path(__file__).resolve().parent.parent  # the app's root (Flower's FAB copy, or the repo)
KEY_FILE = "worker.key"
LOG_FILE = "worker.log"
DEFAULT_IDLE_SECONDS = 900.0
START_TIMEOUT_SECONDS = 120.0


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached or started; the caller computes in-process instead."""


class WorkerFailed(RuntimeError):
    """The worker ran the request and it raised; carries the original error's type and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def worker_address(state_dir: Path) -> str:
    """Abstract Unix socket name for this site and this version of the app's code."""
    digest = hashlib.sha256(f"{state_dir.resolve()}|{CODE_DIR}".encode()).hexdigest()[:24]
    return f"\0fedembed-site-{digest}"


def _auth_key(state_dir: Path, *, create: bool) -> bytes:
    path = state_dir / KEY_FILE
    if not path.exists():
        if not create:
            raise WorkerUnavailable(f"no worker key in {state_dir}")
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def call_worker(
    state_dir: Path, request: dict[str, Any], *, parent_pid: int, spawn: bool = True
) -> dict[str, Any]:
    """Send ``request`` to the site's worker (starting it if needed) and return its reply."""
    address = worker_address(state_dir)
    key = _auth_key(state_dir, create=spawn)
    connection = _connect(address, key)
    if connection is None:
        if not spawn:
            raise WorkerUnavailable("site worker is not running")
        _spawn(state_dir, parent_pid=parent_pid)
        connection = _wait_for(address, key)
    try:
        with connection:
            connection.send(request)
            reply: dict[str, Any] = connection.recv()
    except (EOFError, OSError) as exc:
        raise WorkerUnavailable(f"site worker connection failed: {exc}") from exc
    if not reply.get("ok"):
        raise WorkerFailed(str(reply.get("kind")), str(reply.get("message")))
    return reply


def _connect(address: str, key: bytes) -> Connection | None:
    try:
        return Client(address, family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError, OSError):
        return None


def _wait_for(address: str, key: bytes) -> Connection:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        connection = _connect(address, key)
        if connection is not None:
            return connection
        time.sleep(0.1)
    raise WorkerUnavailable(f"site worker did not start within {START_TIMEOUT_SECONDS:.0f} s")


def _spawn(state_dir: Path, *, parent_pid: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(CODE_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    argv = [
        sys.executable,
        "-m",
        "client.worker",
        "--state-dir",
        str(state_dir),
        "--parent-pid",
        str(parent_pid),
    ]
    with open(state_dir / LOG_FILE, "ab") as log_file:
        subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=str(state_dir),
        )


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request exactly as the ClientApp would in-process; errors come back as data."""
    from client.training import execute

    try:
        return {"ok": True, "worker_pid": os.getpid(), **execute(request)}
    except Exception as exc:  # reported to the ClientApp, which raises it there
        log.exception("request failed")
        return {"ok": False, "kind": type(exc).__name__, "message": str(exc)}


def serve(state_dir: Path, *, parent_pid: int, idle_seconds: float = DEFAULT_IDLE_SECONDS) -> None:
    """Answer requests until idle for ``idle_seconds`` or until ``parent_pid`` is gone."""
    import torch  # the point of the worker: paid once

    torch.set_num_threads(1)
    key = _auth_key(state_dir, create=True)
    listener = Listener(worker_address(state_dir), family="AF_UNIX", authkey=key)
    last_active = [time.monotonic()]
    _start_watchdog(parent_pid, idle_seconds, last_active)
    log.info("site worker for %s listening (pid %d)", state_dir, os.getpid())
    while True:
        try:
            connection = listener.accept()
        except (OSError, EOFError) as exc:  # a client that failed authentication
            log.warning("rejected a connection: %s", exc)
            continue
        with connection:
            try:
                request = connection.recv()
            except (EOFError, OSError):
                continue
            connection.send(handle(request))
        last_active[0] = time.monotonic()


def _start_watchdog(parent_pid: int, idle_seconds: float, last_active: list[float]) -> None:
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if not _alive(parent_pid):
                log.info("the SuperNode's process tree is gone; exiting")
                os._exit(0)
            if time.monotonic() - last_active[0] > idle_seconds:
                log.info("idle for %.0f s; exiting", idle_seconds)
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedembed site worker (started by the ClientApp)")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(Path(args.state_dir), parent_pid=args.parent_pid, idle_seconds=args.idle_seconds)


if __name__ == "__main__":
    main()
