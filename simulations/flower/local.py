"""Flower's SuperLink and SuperNodes run as local processes (tests, deploy-local, benchmarks)."""

from __future__ import annotations

import contextlib
import re
import ssl
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from simulations.flower.flwr_cli import (
    DEFAULT_CONNECTION,
    Connection,
    FlowerError,
    TlsFiles,
    flower_command,
    flower_env,
    write_connection,
)
from simulations.flower.processes import ManagedProcess, free_port, wait_for
from simulations.flower.run_config import ConfigValue, format_config

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


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
            wait_for(
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

        self.node_id = wait_for(
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
