"""Mutation testing of the modules that carry the guarantees (mutmut 3, on a copy of the tree).

For each module the tree is copied twice into a scratch directory and mutmut is run in each copy with
only that module's tests: once without the ``*_mutants.py`` test files (the baseline) and once with
them (the final run). Every mutant that the baseline's tests leave alive is listed with its diff and a
disposition: killed by a new test (the tests of the ``*_mutants.py`` files that fail under it, found by
running them against that mutant), or a reason from ``mutation_survivors.py`` (equivalent mutant,
logging only). A survivor of the final run that no reason covers is reported as UNEXPLAINED and the
command exits 1. Writes ``docs/results/mutation.md`` and ``.json``; modules not named keep their
earlier entry. mutmut mutates function bodies only (module-level constants are not mutated).

    python -m simulations.benchmarks.mutation --module server/checkpoints.py --module server/strategy/contract.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.benchmarks.mutation_survivors import JUSTIFIED, Justified
from simulations.benchmarks.results import RESULTS_DIR, write_results

ROOT = Path(__file__).resolve().parents[2]
NAME = "mutation"
PACKAGES = ("client", "common", "server", "simulations")
COPIED = (*PACKAGES, "tests", "pyproject.toml")
IGNORED = shutil.ignore_patterns(
    "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache", ".ruff_cache", "mutants"
)
PYTEST_ARGS = ("-p", "no:cacheprovider", "-m", "not slow")
NEW_TESTS_SUFFIX = "_mutants.py"
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "skipped")

# Each module and the tests that are about it, as files or pytest node ids (the *_mutants.py files
# are the ones written to kill this tool's survivors; the baseline run leaves them out). Missing
# files are skipped, and named.
TARGETS: dict[str, tuple[str, ...]] = {
    "server/checkpoints.py": (
        "tests/server/test_checkpoints.py",
        "tests/server/test_checkpoints_mutants.py",
    ),
    "server/strategy/contract.py": (
        "tests/server/test_strategy.py",
        "tests/server/test_contract_mutants.py",
    ),
    # The tests that call into dp_sgd.py and check what it does (the step, the objective, the
    # result, refusals); not the accounting tests that run whole rounds only to check the ledger's
    # and the budget's epsilon (budget.py's and ledger.py's runs mutate that code): 5-13 s each
    # per mutant, 45 s of the 56 s that every dp_sgd mutant would cost with them.
    "client/privacy/dp_sgd.py": (
        "tests/client/test_dp_sgd_step.py",
        "tests/client/test_privacy.py::test_opacus_per_example_gradients_equal_autograd",
        "tests/client/test_privacy.py::"
        "test_ghost_clipping_sums_clipped_gradients_and_one_example_moves_at_most_c",
        "tests/client/test_privacy.py::test_in_batch_losses_break_the_sensitivity_bound_and_are_refused",
        "tests/client/test_privacy.py::test_site_over_budget_declines_without_training_or_spending",
        "tests/client/test_privacy.py::test_fedprox_pull_is_added_after_the_noise",
        "tests/client/test_privacy.py::test_empty_poisson_batches_still_take_noisy_steps",
        "tests/client/test_privacy.py::"
        "test_budget_without_mechanism_and_corrupt_ledger_refuse_to_train",
        "tests/client/test_dp_sgd_mutants.py",
    ),
    "client/privacy/ledger.py": (
        "tests/client/test_privacy.py",
        "tests/client/test_dp_accounting.py",
        "tests/client/test_privacy_mutants.py",
        "tests/client/test_privacy_accountant.py",
    ),
    "client/privacy/budget.py": (
        "tests/client/test_privacy.py",
        "tests/client/test_dp_accounting.py",
        "tests/client/test_privacy_mutants.py",
        "tests/client/test_privacy_accountant.py",
    ),
    "client/audit.py": (
        "tests/client/test_audit.py",
        "tests/server/test_history_receipts.py",  # the receipts cross-check (_cross_check)
        "tests/simulations/cli/test_audit.py",
        "tests/client/test_audit_mutants.py",
    ),
}

# Tests left out of a module's mutation runs (a pytest -k expression): the run-directory tests that
# resume a federation (a ServerApp process, or run_federation against a stand-in Grid that waits on
# round timeouts). Under a mutant that breaks resuming they wait for mutmut's CPU limit (80-90 s per
# mutant on 2 shared cores); what they check of RunStore the direct tests check too.
DESELECTED: dict[str, str] = {"server/checkpoints.py": "not resum"}

# Runs in a copy after `mutmut run`: each named mutant's diff (mutmut show's, one process for all).
_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
print("DIFFS-JSON " + json.dumps({n: get_diff_for_mutant(n) for n in json.loads(sys.argv[1])}))
"""

# Runs inside the final copy's mutants/ dir: for each mutant, the new tests that fail under it.
# mutmut's trampolines read MUTANT_UNDER_TEST at every call, so one process serves every mutant.
_KILLERS = """
import json, os, sys
import pytest

class Failures:
    def __init__(self):
        self.failed = []
    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)

mutants, tests, extra = json.loads(sys.argv[1])
found = {}
for name in mutants:
    os.environ["MUTANT_UNDER_TEST"] = name
    plugin = Failures()
    pytest.main(["-q", "--no-header", "-p", "no:randomly", *extra, *tests], plugins=[plugin])
    found[name] = plugin.failed
os.environ["MUTANT_UNDER_TEST"] = ""
clean = Failures()
pytest.main(["-q", "--no-header", *extra, *tests], plugins=[clean])
print("KILLERS-JSON " + json.dumps({"killers": found, "clean_failures": clean.failed}))
"""


@dataclass
class Mutant:
    """One mutant of a module: mutmut's name, the function it is in, its diff and its outcome."""

    name: str
    function: str
    removed: str
    added: str
    status: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "function": self.function,
            "removed": self.removed,
            "added": self.added,
            "status": self.status,
        }


def function_of(mutant: str, module: str) -> str:
    """``Class.method`` or ``function`` from a mutmut name like ``pkg.mod.xǁClsǁmeth__mutmut_3``."""
    prefix = module.removesuffix(".py").replace("/", ".") + "."
    local = mutant.removeprefix(prefix).rsplit("__mutmut_", 1)[0]
    if local.startswith("xǁ"):
        return ".".join(part for part in local.removeprefix("xǁ").split("ǁ") if part)
    return local.removeprefix("x_")


def diff_lines(show_output: str) -> tuple[str, str]:
    """The removed and the added source lines of ``mutmut show``'s diff, each joined by ' / '."""
    removed, added = [], []
    for line in show_output.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            removed.append(line[1:].strip())
        elif line.startswith("+"):
            added.append(line[1:].strip())
    return " / ".join(removed), " / ".join(added)


def justification(module: str, mutant: Mutant) -> Justified | None:
    """The recorded reason this surviving mutant may stay, if there is one."""
    for entry in JUSTIFIED:
        if (entry.module, entry.function, entry.removed, entry.added) == (
            module,
            mutant.function,
            mutant.removed,
            mutant.added,
        ):
            return entry
    return None


def copy_tree(dest: Path, *, with_new_tests: bool) -> None:
    """The project's code and tests in ``dest`` (no venv, caches or git); maybe without *_mutants.py."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        elif src.exists():
            shutil.copy2(src, dest / name)
    if not with_new_tests:
        for path in (dest / "tests").rglob(f"*{NEW_TESTS_SUFFIX}"):
            path.unlink()


def pytest_args(module: str) -> list[str]:
    """The pytest options of every run of ``module``'s tests (no slow tests, no deselected ones)."""
    return [*PYTEST_ARGS, *(["-k", DESELECTED[module]] if module in DESELECTED else [])]


def mutmut_config(module: str, tests: Sequence[str]) -> str:
    """setup.cfg's [mutmut] section: mutate ``module`` only, run only ``tests`` (no slow ones)."""
    package = module.split("/", 1)[0]
    others = [p for p in PACKAGES if p != package]

    def listing(values: Sequence[str]) -> str:
        return "".join(f"\n    {v}" for v in values)

    return (
        "[mutmut]\n"
        f"source_paths={package}/\n"
        f"only_mutate={module}\n"
        f"also_copy={listing([f'{p}/' for p in others])}\n"
        f"pytest_add_cli_args_test_selection={listing(tests)}\n"
        f"pytest_add_cli_args={listing(pytest_args(module))}\n"
        "timeout_multiplier=5.0\n"
    )


def _mutmut(args: Sequence[str], cwd: Path, log: Path | None = None) -> str:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if log is not None:
        log.write_text(proc.stdout.replace("\r", "\n") + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"mutmut {args[0]} failed in {cwd} (exit {proc.returncode}): {tail[0]}")
    return proc.stdout


def run_mutmut(workdir: Path, module: str, tests: Sequence[str]) -> list[Mutant]:
    """Run mutmut (one worker) in ``workdir`` on ``module`` with ``tests``; every mutant's outcome."""
    (workdir / "setup.cfg").write_text(mutmut_config(module, tests), encoding="utf-8")
    _mutmut(["run", "--max-children", "1"], workdir, log=workdir / "mutmut-run.log")
    mutants = []
    for line in _mutmut(["results", "--all", "true"], workdir).splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        mutants.append(Mutant(name, function_of(name, module), "", "", status))
    diffs = _python(_DIFFS, [m.name for m in mutants if alive(m)], workdir, "DIFFS-JSON")
    for mutant in mutants:
        if mutant.name in diffs:
            mutant.removed, mutant.added = diff_lines(diffs[mutant.name])
    return mutants


def _python(code: str, argument: Any, cwd: Path, marker: str) -> dict[str, Any]:
    """Run ``code`` with the JSON ``argument`` in ``cwd``; the JSON it prints after ``marker``."""
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argument)],
        cwd=cwd,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    found = [line for line in proc.stdout.splitlines() if line.startswith(marker + " ")]
    if not found:
        raise RuntimeError(f"{marker} step failed in {cwd}: {proc.stderr.strip()[-300:]}")
    result: dict[str, Any] = json.loads(found[-1].removeprefix(marker + " "))
    return result


def find_killers(
    workdir: Path, module: str, mutants: Sequence[str], new_tests: Sequence[str]
) -> dict[str, list[str]]:
    """For each mutant, the new tests that fail under it (run in ``workdir``/mutants)."""
    if not mutants or not new_tests:
        return {name: [] for name in mutants}
    argument = [list(mutants), list(new_tests), pytest_args(module)]
    found = _python(_KILLERS, argument, workdir / "mutants", "KILLERS-JSON")
    if found["clean_failures"]:
        raise RuntimeError(f"the new tests fail without any mutant: {found['clean_failures']}")
    killers: dict[str, list[str]] = found["killers"]
    return killers


def counts(mutants: Sequence[Mutant]) -> dict[str, int]:
    result = {status: 0 for status in STATUSES}
    for mutant in mutants:
        result[mutant.status] = result.get(mutant.status, 0) + 1
    result["total"] = len(mutants)
    return {k: v for k, v in result.items() if v or k in ("killed", "survived", "timeout", "total")}


def alive(mutant: Mutant) -> bool:
    """Not killed by any test: survived, or in a function no selected test calls."""
    return mutant.status in ("survived", "no tests")


def evaluate_module(module: str, scratch: Path, *, final_only: bool = False) -> dict[str, Any]:
    """Baseline and final mutmut runs of ``module``, and every baseline survivor's disposition.

    ``final_only``: one run with every test (new ones included); its survivors are then listed
    with their recorded reasons, and no mutant is attributed to a new test.
    """
    tests = [t for t in TARGETS[module] if (ROOT / t.split("::")[0]).exists()]  # file or node id
    missing = [t for t in TARGETS[module] if t not in tests]
    old_tests = [t for t in tests if not t.endswith(NEW_TESTS_SUFFIX)]
    new_tests = [t for t in tests if t.endswith(NEW_TESTS_SUFFIX)]
    started = time.monotonic()
    runs: dict[str, list[Mutant]] = {}
    phases = [("baseline", old_tests, False), ("final", tests, True)] if new_tests else []
    if final_only:
        phases = [("baseline", tests, True)]
    for phase, selection, with_new in phases or [("baseline", old_tests, False)]:
        workdir = scratch / module.replace("/", "_").removesuffix(".py") / phase
        copy_tree(workdir, with_new_tests=with_new)
        runs[phase] = run_mutmut(workdir, module, selection)
        print(f"[mutation] {module} {phase}: {counts(runs[phase])}", flush=True)
    runs.setdefault("final", runs["baseline"])  # no new tests: the final run is the baseline
    final_by_name = {m.name: m for m in runs["final"]}
    survivors = [m for m in runs["baseline"] if alive(m)]
    killed_now = [m.name for m in survivors if not alive(final_by_name.get(m.name, m))]
    killers = find_killers(
        scratch / module.replace("/", "_").removesuffix(".py") / "final",
        module,
        killed_now,
        new_tests,
    )
    listed = []
    for mutant in survivors:
        final = final_by_name.get(mutant.name, mutant)
        entry = {**mutant.to_dict(), "final_status": final.status}
        if not alive(final):
            names = killers.get(mutant.name, [])
            entry["disposition"] = "killed-by-new-test"
            entry["reason"] = ", ".join(n.rsplit("::", 1)[-1] for n in names) or (
                "killed in the final run (by the module's tests together; no single new test)"
            )
        elif (why := justification(module, mutant)) is not None:
            entry["disposition"], entry["reason"] = why.kind, why.reason
        else:
            entry["disposition"], entry["reason"] = "UNEXPLAINED", ""
        listed.append(entry)
    # A mutant alive only in the final run (tests changed between the copies) must be explained too.
    baseline_names = {m.name for m in survivors}
    for mutant in runs["final"]:
        if alive(mutant) and mutant.name not in baseline_names:
            why = justification(module, mutant)
            listed.append(
                {
                    **mutant.to_dict(),
                    "final_status": mutant.status,
                    "disposition": why.kind if why else "UNEXPLAINED",
                    "reason": why.reason if why else "alive in the final run only",
                }
            )
    return {
        "module": module,
        "tests": tests,
        "new_tests": new_tests,
        "missing_tests": missing,
        "deselected": DESELECTED.get(module, ""),
        "baseline": counts(runs["baseline"]),
        "final": counts(runs["final"]),
        "survivors": listed,
        "seconds": round(time.monotonic() - started, 1),
        "baseline_run": not final_only,
    }


def render_markdown(document: Mapping[str, Any]) -> str:
    lines = [
        "# Mutation testing",
        "",
        "Modules that carry the guarantees, mutated by mutmut "
        f"{document.get('mutmut', '?')} (function bodies only), each run with only its own tests "
        "(`-m 'not slow'`, one worker). *Baseline*: the tests as they were; *final*: with the "
        "`*_mutants.py` tests written to kill the baseline's survivors. `no tests`: a mutant in a "
        "function none of the selected tests calls (counted as alive).",
        "",
        "Regenerate: `python -m simulations.benchmarks.mutation "
        + " ".join(f"--module {m}" for m in document["modules"])
        + "`",
        "",
        "| module | mutants | baseline killed | baseline alive | final killed | final alive | timeout |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for module, entry in document["modules"].items():
        b, f = entry["baseline"], entry["final"]

        def alive_count(c: Mapping[str, int]) -> int:
            return c.get("survived", 0) + c.get("no tests", 0)

        lines.append(
            f"| `{module}` | {f['total']} | {b['killed']} | {alive_count(b)} | {f['killed']} "
            f"| {alive_count(f)} | {f['timeout']} |"
        )
    not_run = [m for m in sorted(TARGETS) if m not in document["modules"]]
    if not_run:
        lines += ["", "Not run yet: " + ", ".join(f"`{m}`" for m in not_run) + "."]
    for module, entry in document["modules"].items():
        lines += ["", f"## `{module}`", ""]
        lines.append("Tests: " + ", ".join(f"`{t}`" for t in entry["tests"]) + ".")
        if entry["missing_tests"]:
            lines.append(
                "Not present when run: " + ", ".join(f"`{t}`" for t in entry["missing_tests"]) + "."
            )
        if entry.get("deselected"):
            lines.append(
                f"Selected with `-k '{entry['deselected']}'`: the tests that resume a federation "
                "wait on round timeouts under a mutant that breaks resuming (80-90 s each)."
            )
        if entry.get("baseline_run", True):
            lines.append(f"Ran in {entry['seconds']} s (baseline and final).")
        else:
            lines.append(
                f"Ran in {entry['seconds']} s: one run with every test, new ones included (no "
                "baseline run, so the baseline columns repeat the final run)."
            )
        lines.append("")
        if not entry["survivors"]:
            lines.append("No mutant survived the baseline.")
            continue
        lines += [
            "| mutant | function | diff (− original / + mutant) | baseline → final | disposition |",
            "| --- | --- | --- | --- | --- |",
        ]
        for s in entry["survivors"]:
            diff = f"− `{_cell(s['removed'])}`<br>+ `{_cell(s['added'])}`"
            outcome = f"{s['status']} → {s['final_status']}"
            disposition = s["disposition"] + (f": {_cell(s['reason'])}" if s["reason"] else "")
            number = s["name"].rsplit("__mutmut_", 1)[-1]
            lines.append(f"| {number} | `{s['function']}` | {diff} | {outcome} | {disposition} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def rewrite_reasons(out_dir: Path) -> int:
    """Apply the current reasons to the recorded survivors that no new test killed; rewrite."""
    json_path = out_dir / f"{NAME}.json"
    if not json_path.exists():
        raise SystemExit(f"{json_path}: no recorded mutation results to update")
    document = json.loads(json_path.read_text(encoding="utf-8"))
    unexplained = 0
    for module, entry in document["modules"].items():
        for s in entry["survivors"]:
            if s["disposition"] == "killed-by-new-test":
                continue
            mutant = Mutant(s["name"], s["function"], s["removed"], s["added"], s["status"])
            why = justification(module, mutant)
            s["disposition"] = why.kind if why else "UNEXPLAINED"
            s["reason"] = why.reason if why else ""
            unexplained += why is None
    write_results(out_dir, NAME, document, render_markdown(document))
    return 1 if unexplained else 0


def mutmut_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mutmut")
    except PackageNotFoundError:
        raise SystemExit("mutmut is not installed: pip install 'mutmut>=3.8'") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        choices=sorted(TARGETS),
        help="a module to mutate (repeatable; default: all of them)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the results")
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where the copies go (default: a temp dir)"
    )
    parser.add_argument(
        "--final-only",
        action="store_true",
        help="one run per module with every test (no baseline run without the *_mutants.py tests)",
    )
    parser.add_argument(
        "--reasons-only",
        action="store_true",
        help="re-read mutation_survivors.py for the recorded survivors and rewrite the report "
        "(no mutmut run: the mutants' outcomes stay as recorded)",
    )
    args = parser.parse_args(argv)
    if args.reasons_only:
        return rewrite_reasons(args.out)
    modules = args.module or sorted(TARGETS)
    version = mutmut_version()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="fedembed-mutation-"))
    if args.scratch is not None and scratch.exists() and any(scratch.iterdir()):
        raise SystemExit(f"--scratch {scratch} is not empty")
    try:
        results = {
            module: evaluate_module(module, scratch, final_only=args.final_only)
            for module in modules
        }
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    previous: dict[str, Any] = {}
    json_path = args.out / f"{NAME}.json"
    if json_path.exists():  # read now: another module's entry may have changed meanwhile
        previous = json.loads(json_path.read_text(encoding="utf-8")).get("modules", {})
    merged: dict[str, Any] = {**previous, **results}
    document = {"mutmut": version, "modules": dict(sorted(merged.items()))}
    write_results(args.out, NAME, document, render_markdown(document))
    unexplained = [
        f"{module}: {s['name']}"
        for module, entry in results.items()
        for s in entry["survivors"]
        if s["disposition"] == "UNEXPLAINED"
    ]
    for line in unexplained:
        print(f"[mutation] UNEXPLAINED survivor {line}", flush=True)
    return 1 if unexplained else 0


if __name__ == "__main__":
    raise SystemExit(main())
