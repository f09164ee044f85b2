"""deploy/ files: their command lines use only flags the real CLIs' --help lists, and valid keys
(the files read and the help parsed by tests/deploy/deploy_commands.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from flwr.common.config import parse_config_args

from tests.deploy.deploy_commands import (
    BIN,
    CHECKED_PROGRAMS,
    DEPLOY,
    DOCKERFILES,
    HELP_ENV,
    K8S,
    ROOT,
    RUNBOOK,
    SITES,
    SYSTEMD,
    Help,
    Invocation,
    Option,
    all_invocations,
    check_invocation,
    check_node_config,
    check_run_config,
    command_key,
    compose_file,
    compose_invocations,
    entrypoint,
    flwr_help,
    help_argv,
    k8s_containers,
    k8s_invocations,
    parse_help,
    pyproject,
    read_env_file,
    runbook_invocations,
    systemd_invocations,
    tool_available,
    typer_positionals,
    unit_directives,
    yaml_docs,
)


@pytest.fixture(scope="session")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Help]:
    """--help of every (sub)command the deploy files use (external programs run in parallel)."""
    env = {**os.environ, **HELP_ENV, "FLWR_HOME": str(tmp_path_factory.mktemp("flwr-home"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    keys = sorted(
        {
            command_key(inv.program, inv.args)
            for inv in all_invocations()
            if inv.program in CHECKED_PROGRAMS and tool_available(inv.program)
        }
    )
    argvs = sorted({tuple(a) for key in keys if key[0] != "flwr" for a in help_argv(key)})

    def run(argv: tuple[str, ...]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr[-500:]}"
        return done.stdout + done.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = dict(zip(argvs, pool.map(run, argvs), strict=True))
    out = {}
    for key in keys:
        if key[0] == "flwr":
            texts = [flwr_help(key[1:], {**HELP_ENV, "FLWR_HOME": env["FLWR_HOME"]})]
        else:
            texts = [outputs[tuple(argv)] for argv in help_argv(key)]
        options: dict[str, Option] = {}
        for text in texts:
            options.update(parse_help(text))
        positionals = typer_positionals(texts[0]) if key[0] == "flwr" else None
        out[key] = Help(texts[0], options, positionals)
    return out


# ---------------------------------------------------------------- tests: flags


def test_the_files_contain_the_expected_command_lines() -> None:
    programs = [inv.program for inv in all_invocations()]
    for program in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "pki.sh"):
        assert program in programs
    compose = {inv.where.split(":")[1]: inv.program for inv in compose_invocations()}
    assert compose["superlink"] == "flower-superlink"
    assert compose["superexec-serverapp"] == "flower-superexec"
    for site in SITES:
        assert compose[f"supernode-{site}"] == "flower-supernode"
        assert compose[f"superexec-{site}"] == "flower-superexec"
    assert sorted(inv.program for inv in systemd_invocations()) == [
        "flower-superexec",
        "flower-superlink",
        "flower-supernode",
    ]
    runbook = {(inv.program, inv.args[0] if inv.args else "") for inv in runbook_invocations()}
    for step in [("flwr", "run"), ("flwr", "ls"), ("flwr", "log"), ("flwr", "supernode")]:
        assert step in runbook, step
    assert ("fedembed", "evaluate") in runbook


def test_every_flag_appears_in_the_real_help(helps: dict[tuple[str, ...], Help]) -> None:
    problems = []
    checked = 0
    for inv in all_invocations():
        if inv.program not in CHECKED_PROGRAMS or not tool_available(inv.program):
            continue
        problems += check_invocation(inv, helps[command_key(inv.program, inv.args)])
        checked += 1
    assert checked >= 40
    assert not problems, "\n".join(problems)


def test_help_parsing_finds_real_flags_and_rejects_invented_ones(
    helps: dict[tuple[str, ...], Help],
) -> None:
    link = helps[("flower-superlink",)]
    assert not link.options["--enable-supernode-auth"].takes_value
    assert link.options["--database"].takes_value
    assert link.options["--fleet-api-address"].deprecated
    node = helps[("flower-supernode",)]
    assert node.options["--auth-supernode-public-key"].deprecated
    run = helps[("flwr", "run")]
    assert run.options["--run-config"].takes_value and run.positionals == (0, 2)
    assert helps[("flwr", "supernode", "register")].positionals == (1, 2)
    bad = Invocation("made-up", "flower-superlink", ("--fleet-api-address", "x", "--tls", "1"))
    problems = "\n".join(check_invocation(bad, link))
    assert "--fleet-api-address is deprecated" in problems and "no option --tls" in problems
    too_many = Invocation("made-up", "flwr", ("log", "1", "fedembed", "extra"))
    assert check_invocation(too_many, helps[("flwr", "log")])


def test_pki_script_usage_matches_the_agreed_interface(helps: dict[tuple[str, ...], Help]) -> None:
    usage = helps[("pki.sh",)].text
    assert "OUT_DIR [--server-name NAME]... [--server-ip IP]..." in usage
    for inv in runbook_invocations():
        if inv.program == "pki.sh":
            flags = [a for a in inv.args if a.startswith("-")]
            assert set(flags) <= {"--server-name", "--server-ip"}, inv
            positionals = len(inv.args) - 2 * len(flags)  # each flag takes one value
            assert positionals >= 2, f"OUT_DIR and at least one site: {inv}"


# ---------------------------------------------------------------- tests: node-config / run-config


def supernode_invocations() -> list[Invocation]:
    return [inv for inv in all_invocations() if inv.program == "flower-supernode"]


def test_node_configs_are_valid_site_settings() -> None:
    invocations = supernode_invocations()
    assert len(invocations) >= 3 + 1 + 1 + 2  # compose, k8s, systemd, runbook
    for inv in invocations:
        text = inv.value("--node-config")
        assert text is not None, f"{inv.where}: no --node-config"
        check_node_config(text, inv.where)


def test_invalid_node_and_run_configs_are_caught() -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError):
        check_node_config(
            "data='/d' site-name='a' state-dir='/s' cache-dir='/c' cache-path='/x'", "t"
        )
    with pytest.raises(ConfigError):
        check_node_config(
            "data='/d' site-name='a' state-dir='/s' cache-dir='/c' dp-budget=1.0", "t"
        )
    with pytest.raises(AssertionError):
        check_run_config(["num-rounds=3"], "t")
    with pytest.raises(AssertionError):
        check_run_config(["num-server-rounds='3'"], "t")


def test_run_configs_use_pyproject_keys() -> None:
    runs = [inv for inv in all_invocations() if inv.program == "flwr" and inv.args[:1] == ("run",)]
    assert len(runs) >= 3
    for inv in runs:
        texts = [inv.args[i + 1] for i, a in enumerate(inv.args) if a in ("--run-config", "-c")]
        assert texts, f"{inv.where}: flwr run without --run-config"
        values = check_run_config(texts, inv.where)
        assert "run-dir" in values, f"{inv.where}: name the run directory"


def test_runbook_resumes_the_same_run_dir() -> None:
    runs = [inv for inv in runbook_invocations() if inv.program == "flwr" and inv.args[0] == "run"]
    configs = [parse_config_args([inv.value("--run-config") or ""]) for inv in runs]
    resumed = [c for c in configs if c.get("resume") is True]
    assert resumed, "the runbook shows resume=true"
    fresh_dirs = {c["run-dir"] for c in configs if not c.get("resume")}
    assert all(c["run-dir"] in fresh_dirs for c in resumed)


def test_flwr_commands_name_a_defined_connection() -> None:
    text = RUNBOOK.read_text()
    defined = set(re.findall(r"\[superlink\.([\w-]+)\]", text))
    assert defined
    for inv in runbook_invocations():
        if inv.program == "flwr" and inv.args[0] in ("run", "ls", "log", "stop", "supernode"):
            words = [a for a in inv.args if not a.startswith("-")]
            values = {inv.value(f) for f in ("--run-config", "--format", "--run-id")}
            words = [w for w in words if w not in values]
            assert words[-1] in defined, f"{inv}: connection not defined in the runbook"


# ---------------------------------------------------------------- tests: compose


def _flwr_pin() -> str:
    match = re.search(r"^flwr==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert match
    return match.group(1)


def test_images_are_pinned_to_our_flower_version() -> None:
    pin = _flwr_pin()
    images = [str(s["image"]) for s in compose_file()["services"].values()]
    images += [str(c["image"]) for _, c, _, _ in k8s_containers()]
    flower = [i for i in images if i.startswith("flwr/")]
    assert flower and all(i.split(":")[1] == pin for i in flower), flower
    for path in DOCKERFILES.values():
        arg = re.search(r"^ARG FLWR_IMAGE=(\S+)$", path.read_text(), re.M)
        assert arg and arg.group(1).startswith(f"flwr/superexec:{pin}-"), path


def _makefile_no_deps_packages() -> set[str]:
    text = re.sub(r"\\\n", " ", (ROOT / "Makefile").read_text())
    line = next(
        line
        for line in text.splitlines()
        if "--no-deps" in line and not line.lstrip().startswith("#")
    )
    return set(line.split("--no-deps", 1)[1].split())


def test_dockerfiles_bake_in_the_pinned_stack() -> None:
    packages = _makefile_no_deps_packages()
    setuptools_include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for name, path in DOCKERFILES.items():
        text = re.sub(r"\\\n", " ", path.read_text())
        assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text, name
        assert re.search(r"-c constraints\.txt --index-url \S+ torch==2\.13\.0", text), name
        no_deps = re.search(r"-c constraints\.txt --no-deps ([a-z0-9 .-]+?)\s+&&", text)
        assert no_deps and set(no_deps.group(1).split()) == packages, name
        copied = set(re.findall(r"^COPY --chown=app:app (.+) \S+$", text, re.M)[0].split())
        for line in re.findall(r"^COPY --chown=app:app (.+) \S+$", text, re.M):
            copied |= set(line.split())
        for pattern in setuptools_include:
            assert pattern.rstrip("*") in copied, f"{name}: package {pattern} not copied"
        for source in copied:
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
        assert entrypoint(path) == "flower-superexec"


def _site_of(name: str) -> str:
    return next(site for site in SITES if name.endswith(site))


def test_compose_coordinator_has_tls_node_auth_and_a_persistent_database() -> None:
    compose = compose_file()
    services = compose["services"]
    assert set(services) == {
        "superlink",
        "superexec-serverapp",
        *(f"{kind}-{site}" for kind in ("supernode", "superexec") for site in SITES),
    }
    link = Invocation(
        "superlink", "flower-superlink", tuple(map(str, services["superlink"]["command"]))
    )
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert link.value(flag), flag
    assert "--enable-supernode-auth" in link.args and "--insecure" not in link.args
    assert link.value("--isolation") == "process" and link.value("--superexec-auth-secret-file")
    database = PurePosixPath(link.value("--database") or "")
    mounts = {str(v).split(":")[1] for v in services["superlink"]["volumes"]}
    assert any(database.is_relative_to(m) for m in mounts), "state.db must be on a volume"
    assert [n for n, s in services.items() if s.get("ports")] == ["superlink"]
    serverapp = Invocation(
        "x", "flower-superexec", tuple(map(str, services["superexec-serverapp"]["command"]))
    )
    assert serverapp.value("--runtime-api-address") == "superlink:9092"
    assert serverapp.value("--root-certificates") and "--insecure" not in serverapp.args
    sources = {  # the SuperLink and the ServerApp's SuperExec read the same secret file
        name: {s["target"]: s["source"] for s in services[name]["secrets"]}
        for name in ("superlink", "superexec-serverapp")
    }
    secret = PurePosixPath(serverapp.value("--superexec-auth-secret-file") or "").name
    assert secret == PurePosixPath(link.value("--superexec-auth-secret-file") or "").name
    assert sources["superlink"][secret] == sources["superexec-serverapp"][secret]


def test_compose_services_use_declared_secrets_volumes_and_networks() -> None:
    compose = compose_file()
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        assert env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", name
        targets = {s["target"] for s in svc.get("secrets", [])}
        for s in svc.get("secrets", []):
            assert s["source"] in compose["secrets"], (name, s)
        for arg in map(str, svc["command"]):
            if arg.startswith("/run/secrets/"):
                assert arg.removeprefix("/run/secrets/") in targets, (name, arg)
        for volume in svc.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/", "$")):
                assert volume.split(":")[0] in compose["volumes"], (name, volume)
        if "--insecure" in map(str, svc["command"]):  # only on a site's internal network
            assert name.startswith("superexec-hospital-"), name
            assert all(compose["networks"][n].get("internal") for n in svc["networks"]), name


def test_compose_sites_pair_a_supernode_with_a_clientapp_superexec() -> None:
    compose = compose_file()
    services = compose["services"]
    site_volumes: list[str] = []
    for site in SITES:
        node = services[f"supernode-{site}"]
        execu = services[f"superexec-{site}"]
        node_inv = Invocation(site, "flower-supernode", tuple(map(str, node["command"])))
        exec_inv = Invocation(site, "flower-superexec", tuple(map(str, execu["command"])))
        assert node_inv.value("--isolation") == "process"
        assert node_inv.value("--superlink") == "superlink:9092"
        assert node_inv.value("--auth-supernode-private-key") == "/run/secrets/site.key"
        key_secret = next(s["source"] for s in node["secrets"] if s["target"] == "site.key")
        assert compose["secrets"][key_secret]["file"].endswith(f"/sites/{site}/site.key")
        assert (
            exec_inv.value("--runtime-api-address")
            == f"supernode-{site}:{node_inv.value('--port')}"
        )
        assert set(node["networks"]) & set(execu["networks"]) == {site}
        assert "secrets" not in execu, "the ClientApp container never sees the key"
        config = check_node_config(node_inv.value("--node-config") or "", site)
        assert config["site-name"] == site
        read_only: dict[str, bool] = {}  # mount target -> read-only
        for volume in execu["volumes"]:
            if isinstance(volume, dict):
                read_only[volume["target"]] = bool(volume.get("read_only", False))
            else:
                source, target = str(volume).split(":")[:2]
                read_only[target] = False
                site_volumes.append(source)
        assert read_only[config["state-dir"]] is False and read_only[config["cache-dir"]] is False
        data_mount = str(PurePosixPath(config["data"]).parent)
        assert read_only[data_mount] is True, "site data is mounted read-only"
    assert len(site_volumes) == len(set(site_volumes)) == 2 * len(SITES), "one state+cache per site"


def test_compose_healthcheck_and_dependencies() -> None:
    services = compose_file()["services"]
    test = services["superlink"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "healthcheck", "exec")
    assert "https://localhost:9092/health" in test[3] and "/run/secrets/ca.crt" in test[3]
    for name, svc in services.items():
        if name != "superlink" and not name.startswith("superexec-hospital-"):
            assert svc["depends_on"]["superlink"]["condition"] == "service_healthy", name


def test_runbook_names_existing_compose_services() -> None:
    services = set(compose_file()["services"])
    named = 0
    for inv in runbook_invocations():
        if inv.program != "docker compose":
            continue
        for arg in inv.args:
            name = arg.split(":", 1)[0]
            if re.fullmatch(r"(superlink|superexec-[\w-]+|supernode-[\w-]+)", name):
                assert name in services, f"{inv}: no compose service {name}"
                named += 1
    assert named >= 5


# ---------------------------------------------------------------- tests: Kubernetes


def _runbook_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from `kubectl ... create secret generic NAME --from-file=KEY=PATH`."""
    secrets: dict[str, set[str]] = {}
    for inv in runbook_invocations():
        words = [a for a in inv.args if not a.startswith("-")]
        if inv.program == "kubectl" and "generic" in words:
            name = words[words.index("generic") + 1]
            keys = {a.split("=")[1] for a in inv.args if a.startswith("--from-file=")}
            secrets[name] = keys
    return secrets


def test_k8s_workloads_are_consistent() -> None:
    secrets = _runbook_secrets()
    claims = {
        doc["metadata"]["name"]
        for path in K8S
        for doc in yaml_docs(path)
        if doc["kind"] == "PersistentVolumeClaim"
    }
    services = [doc for path in K8S for doc in yaml_docs(path) if doc["kind"] == "Service"]
    workloads = [doc for path in K8S for doc in yaml_docs(path) if doc["kind"] != "Namespace"]
    assert {doc["metadata"].get("namespace") for doc in workloads} == {"fedembed"}
    seen_secrets = set()
    for where, container, spec, workload in k8s_containers():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
        assert (
            spec["securityContext"]["runAsNonRoot"]
            and spec["securityContext"]["runAsUser"] == 49999
        )
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", where
        volumes = {v["name"]: v for v in spec["volumes"]}
        templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        mounts: dict[str, dict[str, Any]] = {}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in templates, (where, mount)
            mounts[mount["mountPath"]] = volumes.get(mount["name"], {})
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, (where, volume)
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                seen_secrets.add(name)
                assert name in secrets, f"{where}: the runbook never creates Secret {name}"
                items = {i["key"] for i in volume["secret"].get("items", [])}
                assert items <= secrets[name], (where, name, items)
        for arg in map(str, container.get("args", [])):  # files the command reads are mounted
            if arg.startswith("/") and not arg.startswith("/data/"):
                path = PurePosixPath(arg)
                mount = next((m for m in mounts if path.is_relative_to(m)), None)
                assert mount is not None, f"{where}: {arg} is on no volume"
                secret = mounts[mount].get("secret")
                if secret:
                    keys = {i["path"] for i in secret.get("items", [])} or secrets[
                        secret["secretName"]
                    ]
                    assert path.name in keys, (
                        f"{where}: {arg} is not a key of {secret['secretName']}"
                    )
        for port in container.get("ports", []):
            for service in services:
                if service["spec"]["selector"].items() <= labels.items():
                    assert port["name"] in {p["targetPort"] for p in service["spec"]["ports"]}
    assert seen_secrets == set(secrets), "runbook and manifests name the same Secrets"


def test_k8s_pods_pair_supernode_and_superexec_over_loopback() -> None:
    pods: dict[str, dict[str, Invocation]] = {}
    for inv, (where, _, _, workload) in zip(k8s_invocations(), k8s_containers(), strict=True):
        pods.setdefault(workload["metadata"]["name"], {})[where.split(":")[1]] = inv
    link = pods["fedembed-coordinator"]["superlink"]
    assert link.value("--isolation") == "process" and "--enable-supernode-auth" in link.args
    serverapp = pods["fedembed-coordinator"]["superexec"]
    assert serverapp.value("--runtime-api-address") == f"localhost:{link.value('--port')}"
    assert serverapp.value("--superexec-auth-secret-file") == link.value(
        "--superexec-auth-secret-file"
    )
    site = pods["fedembed-hospital-a"]
    node, execu = site["supernode"], site["superexec"]
    assert node.value("--isolation") == "process" and node.value("--host") == "127.0.0.1"
    assert execu.value("--runtime-api-address") == f"127.0.0.1:{node.value('--port')}"
    config = check_node_config(node.value("--node-config") or "", "k8s site")
    mounts = {
        m["mountPath"]: m.get("readOnly", False)
        for where, c, _, _ in k8s_containers()
        if where.endswith(":superexec") and "hospital-a" in where
        for m in c["volumeMounts"]
    }
    assert mounts[config["state-dir"]] is False and mounts[config["cache-dir"]] is False
    assert mounts[str(PurePosixPath(config["data"]).parent)] is True


# ---------------------------------------------------------------- tests: systemd


def test_systemd_units_restart_log_to_journald_and_use_credentials() -> None:
    units = {p.name: dict(unit_directives(p)) for p in SYSTEMD.glob("*.service")}
    assert set(units) == {
        "fedembed-supernode@.service",
        "fedembed-superlink.service",
        "fedembed-superexec.service",
    }
    for name, unit in units.items():
        assert unit["Restart"] == "on-failure", name
        assert unit["StandardOutput"] == unit["StandardError"] == "journal", name
        assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in (SYSTEMD / name).read_text()
    site = units["fedembed-supernode@.service"]
    assert site["EnvironmentFile"] == "/etc/fedembed/%i.env"
    env = read_env_file(SYSTEMD / "site.env.example")
    assert set(env) == {"SUPERLINK", "RUNTIME_PORT", "NODE_CONFIG"}
    config = check_node_config(env["NODE_CONFIG"], "site.env.example")
    # The only writable paths of the unit are its StateDirectory/CacheDirectory.
    state_root = PurePosixPath("/var/lib") / site["StateDirectory"].replace("%i", "hospital-a")
    cache_root = PurePosixPath("/var/cache") / site["CacheDirectory"].replace("%i", "hospital-a")
    assert PurePosixPath(config["state-dir"]).is_relative_to(state_root)
    assert PurePosixPath(config["cache-dir"]).is_relative_to(cache_root)
    assert config["site-name"] == "hospital-a"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    paths = []
    for unit in SYSTEMD.glob("*.service"):
        text = unit.read_text().replace("/opt/fedembed/.venv/bin", str(BIN))
        name = unit.name.replace("@.service", "@hospital-a.service")
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(paths)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


# ---------------------------------------------------------------- tests: runbook coverage


def test_runbook_covers_every_deploy_file_and_operation() -> None:
    text = RUNBOOK.read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path != RUNBOOK and "__pycache__" not in path.parts:
            assert path.name in text, (
                f"deploy/README.md does not mention {path.relative_to(DEPLOY)}"
            )
    commands = {" ".join((inv.program, *inv.args[:2])) for inv in runbook_invocations()}
    for needed in (
        "flwr supernode register",
        "flwr supernode unregister",
        "flwr supernode list",
        "flwr log",
        "flwr stop",
        "fedembed evaluate --head",
    ):
        assert any(c.startswith(needed) for c in commands), needed
    assert "final/" in text and "head.safetensors" in text and "head.json" in text
