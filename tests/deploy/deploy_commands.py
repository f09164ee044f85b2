"""The deploy/ files' command lines and config strings, and the real CLIs' --help parsed: what
tests/deploy/test_deploy_files.py checks them with."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
import yaml
from flwr.common.config import parse_config_args

from client.privacy import PrivacySettings
from common.config import RunSettings, SiteSettings

# Command lines come from deploy/docker/docker-compose.yml (programs: the images' ENTRYPOINT),
# deploy/k8s/*.yaml, deploy/systemd/*.service (+ site.env.example) and deploy/README.md's bash
# blocks. Ground truth: --help of flower-superlink/-supernode/-superexec, flwr, fedembed and
# deploy/pki.sh (plus kubectl / docker compose when installed); node-config and run-config strings
# go through Flower's own parser and common.config. No Docker engine, cluster or network needed.
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker" / "docker-compose.yml"
DOCKERFILES = {
    "coordinator": DEPLOY / "docker" / "Dockerfile.coordinator",
    "site": DEPLOY / "docker" / "Dockerfile.site",
}
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
SYSTEMD = DEPLOY / "systemd"
RUNBOOK = DEPLOY / "README.md"
BIN = Path(sys.executable).parent
SITES = ("hospital-a", "hospital-b", "hospital-c")
FLOWER_IMAGES = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode"}
SITE_KEYS = {"data", "site-name", "state-dir", "cache-dir"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BOX = str.maketrans(dict.fromkeys("│╭╮╰╯─┃━┏┓┗┛", " "))
FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9-]*")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}
FLWR_GROUPS = {"supernode", "config", "federation", "app"}
KUBECTL_COMMANDS = (
    ("create", "secret", "generic"),
    ("rollout", "status"),
    ("rollout", "restart"),
    ("port-forward",),
    ("apply",),
    ("delete",),
    ("logs",),
    ("get",),
    ("cp",),
)


# ---------------------------------------------------------------- command lines in the files


@dataclass(frozen=True)
class Invocation:
    """One command line found in a deploy file (``program``: e.g. "flwr", "flower-supernode")."""

    where: str
    program: str
    args: tuple[str, ...]

    def value(self, flag: str) -> str | None:
        """The value of ``--flag VALUE`` / ``--flag=VALUE`` (the last one), else None."""
        found = None
        for i, arg in enumerate(self.args):
            if arg == flag and i + 1 < len(self.args):
                found = self.args[i + 1]
            elif arg.startswith(flag + "="):
                found = arg.split("=", 1)[1]
        return found


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose_file() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def entrypoint(dockerfile: Path) -> str:
    match = re.search(r"^ENTRYPOINT\s+\[\"([^\"]+)\"\]", dockerfile.read_text(), re.M)
    assert match, f"{dockerfile}: no ENTRYPOINT [...]"
    return match.group(1)


def _service_program(service: Mapping[str, Any]) -> str:
    if "build" in service:
        return entrypoint(
            COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
        )
    repository = str(service["image"]).rsplit(":", 1)[0]
    return FLOWER_IMAGES[repository]


def compose_invocations() -> list[Invocation]:
    return [
        Invocation(
            f"docker-compose.yml:{name}", _service_program(svc), tuple(map(str, svc["command"]))
        )
        for name, svc in compose_file()["services"].items()
    ]


def _pod_specs(doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif doc["kind"] == "Pod":
        yield doc["spec"]


def k8s_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(file:container, container, pod spec, workload) for every container of every workload."""
    for path in K8S:
        for doc in yaml_docs(path):
            for spec in _pod_specs(doc):
                for container in spec["containers"]:
                    yield f"{path.name}:{container['name']}", container, spec, doc


def k8s_invocations() -> list[Invocation]:
    out = []
    for where, container, _, _ in k8s_containers():
        assert container.get("command"), f"{where}: give `command` explicitly"
        command = [*map(str, container["command"]), *map(str, container.get("args", []))]
        out.append(Invocation(where, Path(command[0]).name, tuple(command[1:])))
    return out


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads an EnvironmentFile (quotes removed, no expansion)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, raw = line.partition("=")
            words = shlex.split(raw)
            assert len(words) == 1, f"{path}: {key} must be one (quoted) value"
            values[key.strip()] = words[0]
    return values


def unit_directives(path: Path) -> list[tuple[str, str]]:
    """(key, value) pairs of a unit file, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


SPECIFIERS = {"%i": "hospital-a", "%S": "/var/lib", "%C": "/var/cache", "%d": "/run/credentials/x"}


def systemd_invocations() -> list[Invocation]:
    env = read_env_file(SYSTEMD / "site.env.example")
    out = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        for key, value in unit_directives(unit):
            if key != "ExecStart":
                continue
            words = []
            for word in shlex.split(value):
                for spec, real in SPECIFIERS.items():
                    word = word.replace(spec, real)
                match = re.fullmatch(r"\$\{(\w+)\}", word)  # systemd: ${VAR} is one argument
                words.append(env[match.group(1)] if match else word)
            out.append(Invocation(unit.name, Path(words[0]).name, tuple(words[1:])))
    return out


def runbook_blocks(text: str) -> list[str]:
    return re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M)


def split_commands(block: str) -> Iterator[list[str]]:
    """Simple commands of a bash block: continuations joined, comments and redirections dropped."""
    for line in re.sub(r"\\\n", " ", block).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        skip_next = False
        for token in [*lexer, ";"]:
            if skip_next:
                skip_next = False
            elif token in REDIRECTS:
                skip_next = True
            elif token in SHELL_OPERATORS:
                if command:
                    yield command
                command = []
            else:
                command.append(token)


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    while words and (words[0] == "sudo" or re.fullmatch(r"[A-Z_]+=.*", words[0])):
        words = words[1:]
    if not words:
        return None
    head = Path(words[0]).name
    if head == "docker" and words[1:2] == ["compose"]:
        return "docker compose", words[2:]
    return ("pki.sh" if head == "pki.sh" else head), words[1:]


def runbook_invocations() -> list[Invocation]:
    out = []
    for block in runbook_blocks(RUNBOOK.read_text()):
        for words in split_commands(block):
            found = _program(words)
            if found:
                out.append(Invocation("deploy/README.md", found[0], tuple(found[1])))
    return out


def all_invocations() -> list[Invocation]:
    return compose_invocations() + k8s_invocations() + systemd_invocations() + runbook_invocations()


# ---------------------------------------------------------------- what the real CLIs accept


@dataclass(frozen=True)
class Option:
    takes_value: bool
    deprecated: bool


@dataclass(frozen=True)
class Help:
    """Options of one (sub)command parsed from its --help; positional bounds when known."""

    text: str
    options: dict[str, Option]
    positionals: tuple[int, int] | None


def _takes_value(rest: list[str], flag: str) -> bool:
    if "=" in flag:  # kubectl: --name='': / --flag=false:
        default = flag.split("=", 1)[1].rstrip(":")
        return default not in ("true", "false")
    if not rest:
        return False
    nxt = rest[0]
    if nxt.startswith(("[", "{", "<")) or re.fullmatch(r"[A-Z][A-Z0-9_]*", nxt):
        return True
    return nxt in {"string", "stringArray", "strings", "int", "uint", "list", "duration", "bytes"}


def parse_help(text: str) -> dict[str, Option]:
    """Option entries: a line indented <= 6 that starts with "-", plus its description lines."""
    entries: list[list[str]] = []
    for raw in ANSI.sub("", text).translate(BOX).expandtabs().splitlines():
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if stripped.startswith("-") and indent <= 6:
            entries.append([stripped])
        elif stripped and entries and indent > 6:
            entries[-1].append(stripped)
        elif not stripped and entries:
            entries.append([])
    options: dict[str, Option] = {}
    for entry in entries:
        if not entry:
            continue
        words = entry[0].replace(",", " ").split()
        names = []
        while words and FLAG.match(words[0]):
            names.append(words.pop(0))
        deprecated = "deprecated" in " ".join([" ".join(words), *entry[1:]]).lower()
        value = any(_takes_value(words, name) for name in names)
        for name in names:
            flag = FLAG.match(name)
            assert flag is not None
            options[flag.group(0)] = Option(value, deprecated)
    return options


def typer_positionals(text: str) -> tuple[int, int] | None:
    match = re.search(r"Usage: (.*)", ANSI.sub("", text))
    if not match:
        return None
    words = match.group(1).split()
    if "[OPTIONS]" not in words:
        return None
    after = [w for w in words[words.index("[OPTIONS]") + 1 :] if w != "..."]
    if any(w in ("COMMAND", "[ARGS]...") for w in after):
        return None
    required = [w for w in after if not w.startswith("[")]
    return len(required), len(after)


HELP_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "NO_COLOR": "1",
    "TERM": "dumb",
    "COLUMNS": "200",
}


def command_key(program: str, args: Sequence[str]) -> tuple[str, ...]:
    """The (sub)command whose --help documents ``args``."""
    words = [a for a in args if not a.startswith("-")]
    if program == "flwr":
        return ("flwr", *words[: 2 if words and words[0] in FLWR_GROUPS else 1])
    if program == "fedembed":
        return ("fedembed", *words[:1])
    if program == "kubectl":
        for path in KUBECTL_COMMANDS:
            if tuple(words[: len(path)]) == path or tuple(words[1 : len(path) + 1]) == path:
                return ("kubectl", *path)
        raise AssertionError(f"kubectl command not covered by the test: {args}")
    if program == "docker compose":
        rest = list(args)
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in ("-f", "--file", "-p", "--project-name") else rest[1:]
        return ("docker compose", *rest[:1])
    return (program,)


def help_argv(key: tuple[str, ...]) -> list[list[str]]:
    """Commands printing the help of ``key`` (flwr's is rendered in-process: see flwr_help)."""
    program, *sub = key
    if program == "pki.sh":
        return [["bash", str(DEPLOY / "pki.sh"), "--help"]]
    if program == "kubectl":
        return [["kubectl", *sub, "--help"], ["kubectl", "options"]]
    if program == "docker compose":
        return [["docker", "compose", *sub, "--help"], ["docker", "compose", "--help"]]
    return [[str(BIN / program), *sub, "--help"]]


def tool_available(program: str) -> bool:
    if program == "kubectl":
        return shutil.which("kubectl") is not None
    if program == "docker compose":
        return docker_compose_works()
    return True


def docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return done.returncode == 0


CHECKED_PROGRAMS = {
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr",
    "fedembed",
    "pki.sh",
    "kubectl",
    "docker compose",
}


def flwr_help(sub: Sequence[str], env: Mapping[str, str]) -> str:
    """``flwr SUB --help`` from the app the ``flwr`` script runs (flwr.cli.app:app), in-process:
    the same text as the subprocess, without a 1-2 s interpreter start per subcommand."""
    from flwr.cli.app import app
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, [*sub, "--help"], env=dict(env), prog_name="flwr")
    assert done.exit_code == 0, f"flwr {' '.join(sub)} --help: {done.output[-500:]}"
    return done.output


def check_invocation(inv: Invocation, help_: Help) -> list[str]:
    """Problems of one command line against its --help (unknown/deprecated flags, arity)."""
    problems = []
    positionals: list[str] = []
    args = list(inv.args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            option = help_.options.get(name)
            if option is None:
                problems.append(f"{inv.where}: {inv.program} has no option {name}")
            elif option.deprecated:
                problems.append(f"{inv.where}: {inv.program} {name} is deprecated")
            elif option.takes_value and "=" not in arg:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    problems.append(f"{inv.where}: {inv.program} {name} needs a value")
                i += 1
        else:
            positionals.append(arg)
        i += 1
    if inv.program.startswith("flower-") and positionals:
        problems.append(f"{inv.where}: {inv.program} takes no positional arguments: {positionals}")
    if inv.program == "flwr" and help_.positionals is not None:
        low, high = help_.positionals
        given = len(positionals) - (len(command_key("flwr", inv.args)) - 1)
        if not low <= given <= high:
            problems.append(
                f"{inv.where}: flwr {' '.join(inv.args)}: {given} arguments, expected {low}..{high}"
            )
    return problems


# ---------------------------------------------------------------- config keys


def pyproject() -> dict[str, Any]:
    return tomli.loads((ROOT / "pyproject.toml").read_text())


def run_config_defaults() -> dict[str, Any]:
    return dict(pyproject()["tool"]["flwr"]["app"]["config"])


def check_node_config(text: str, where: str) -> dict[str, Any]:
    """Parse a --node-config string like the SuperNode does and validate it; return the values."""
    values = parse_config_args([text])
    assert set(values) >= SITE_KEYS, f"{where}: node-config lacks {sorted(SITE_KEYS - set(values))}"
    SiteSettings.from_node_config(values)  # unknown keys / bad types raise ConfigError
    dp_run = {k: v for k, v in run_config_defaults().items() if k.startswith("dp-")}
    PrivacySettings.merge(dp_run, values)  # dp-* keys
    for key in ("data", "site-name", "state-dir", "cache-dir"):
        assert isinstance(values[key], str) and values[key], f"{where}: {key} must be a string"
    return values


def check_run_config(texts: Sequence[str], where: str) -> dict[str, Any]:
    defaults = run_config_defaults()
    values: dict[str, Any] = {}
    for text in texts:
        values.update(parse_config_args([text]))
    unknown = sorted(set(values) - set(defaults))
    assert not unknown, f"{where}: run-config keys not in [tool.flwr.app.config]: {unknown}"
    for key, value in values.items():
        default = defaults[key]
        ok = type(value) is type(default) or (type(default) is float and type(value) is int)
        assert ok, f"{where}: run-config {key}={value!r} is not a {type(default).__name__}"
    merged = {**defaults, **values}
    RunSettings.from_run_config(merged)
    PrivacySettings.merge(merged, {})
    return values
