"""Benchmark: deployment round latency vs the compute inside the round (real SuperLink + SuperNodes)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import machine_info
from simulations.flower.federate import deploy_local

FLOWER_POLL_SECONDS = (
    3.0  # Flower 1.41: SuperNode idle loop and ServerApp reply wait (read in its source)
)
TARGET_OVERHEAD_SECONDS = 6.0  # issue 3: median per-round overhead on 3 local sites


def import_seconds(module: str, *, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing ``module`` (what a per-message process pays)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env={**os.environ})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def round_breakdown(
    history: Sequence[dict[str, Any]], *, skip_first: bool = True
) -> list[dict[str, float]]:
    """Per round: wall time, the slowest site's training time, and the rest (the overhead)."""
    rows = []
    for entry in history[1:] if skip_first else history:
        train = max(
            (m.get("train-seconds", 0.0) for m in entry.get("site_metrics", {}).values()),
            default=0.0,
        )
        rows.append(
            {
                "round": entry["round"],
                "wall_seconds": entry["wall_seconds"],
                "max_site_train_seconds": train,
                "overhead_seconds": entry["wall_seconds"] - train,
            }
        )
    return rows


PHASES = (
    (
        "delivery",
        "round start -> the slowest site's ClientApp process exists (SuperNode poll + spawn)",
    ),
    (
        "start-up",
        "process start -> our train handler runs (interpreter, Flower's runtime, FAB, app import)",
    ),
    ("handler", "train handler -> reply created (site worker IPC + training)"),
    (
        "return",
        "reply created -> ServerApp has it (SuperNode 0.5 s reply loop, upload, reply poll)",
    ),
    ("server", "last reply in -> round logged (aggregation, evaluation, checkpoint)"),
)


def audit_timings(home: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(site name, round) -> the site's local timing of its train message, from its audit log."""
    found: dict[tuple[str, int], dict[str, float]] = {}
    for path in sorted(home.glob("sites/*/audit.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("message_type") == "train" and "timing" in entry:
                found[(entry["site"], int(entry["round"]))] = {
                    **entry["timing"],
                    "replied": float(entry["time"]),
                }
    return found


def phase_breakdown(
    history: Sequence[dict[str, Any]],
    timings: dict[tuple[str, int], dict[str, float]],
    *,
    skip_first: bool = True,
) -> list[dict[str, float]]:
    """Per round, where the time went for the site whose reply arrived last (see ``PHASES``)."""
    rows = []
    for entry in history[1:] if skip_first else history:
        arrivals = {
            node: t["received"]
            for node, t in entry.get("site_timing", {}).items()
            if "received" in t
        }
        if not arrivals or "started" not in entry:
            continue
        node = max(arrivals, key=lambda n: arrivals[n])
        site = entry.get("site_names", {}).get(node)
        local = timings.get((site, int(entry["round"]))) if site else None
        if local is None or "process_started" not in local:
            continue
        start = float(entry["started"])
        received = arrivals[node]
        train = float(entry["site_metrics"].get(node, {}).get("train-seconds", 0.0))
        rows.append(
            {
                "round": entry["round"],
                "site": site,
                "delivery": local["process_started"] - start,
                "start-up": local["handler_started"] - local["process_started"],
                "handler": local["replied"] - local["handler_started"],
                "training": train,
                "return": start + received - local["replied"],
                "server": float(entry["wall_seconds"]) - received,
                "wall": float(entry["wall_seconds"]),
            }
        )
    return rows


def measure(
    *, work_dir: Path, sites: int, rounds: int, run_config: dict[str, Any], database: bool
) -> dict[str, Any]:
    """One deployment run; its per-round breakdown and medians."""
    config = {"num-server-rounds": rounds, "eval-every": 0, **run_config}
    fed = deploy_local(
        out_dir=work_dir, sites=sites, run_config=config, echo=False, database=database
    )
    if not fed.ok:
        raise RuntimeError(f"benchmark run failed: {fed.result.status}; log {fed.result.log_path}")
    rows = round_breakdown(fed.history)
    phases = phase_breakdown(fed.history, audit_timings(fed.home))
    return {
        "run_config": config,
        "superlink_state": "database" if database else "memory",
        "rounds_measured": rows,
        "phases": phases,
        "median_phase_seconds": {
            name: statistics.median(p[name] for p in phases)
            for name in (*(n for n, _ in PHASES), "training")
        }
        if phases
        else {},
        "median_round_wall_seconds": statistics.median(r["wall_seconds"] for r in rows),
        "median_overhead_seconds": statistics.median(r["overhead_seconds"] for r in rows),
        "median_site_train_seconds": statistics.median(r["max_site_train_seconds"] for r in rows),
        "first_round_wall_seconds": fed.history[0]["wall_seconds"],
    }


# (name, ServerApp reply poll seconds, SuperLink state in its --database): fedembed's deployment
# with Flower's default in-memory SuperLink, the same with a database, and Flower's own 3 s polling.
VARIANTS: tuple[tuple[str, float, bool], ...] = (
    ("poll 0.2 s, in-memory SuperLink", 0.2, False),
    ("poll 0.2 s, SuperLink --database", 0.2, True),
    (f"poll {FLOWER_POLL_SECONDS:g} s (Flower's), in-memory SuperLink", FLOWER_POLL_SECONDS, False),
)


def run_benchmark(
    *,
    out_dir: Path,
    work_dir: Path,
    sites: int,
    rounds: int,
    run_config: dict[str, Any],
    variants: Sequence[tuple[str, float, bool]] = VARIANTS,
) -> dict[str, Any]:
    """Measure round latency for each variant, in one process, back to back."""
    started = time.perf_counter()
    measured = {
        name: measure(
            work_dir=work_dir / f"variant-{i}",
            sites=sites,
            rounds=rounds,
            run_config={**run_config, "reply-poll-interval": interval},
            database=database,
        )
        for i, (name, interval, database) in enumerate(variants)
    }
    result = {
        "machine": machine_info(),
        "sites": sites,
        "rounds": rounds,
        "variants": measured,
        "target_overhead_seconds": TARGET_OVERHEAD_SECONDS,
        "flower_poll_floor_seconds": FLOWER_POLL_SECONDS,
        "per_message_process_import_seconds": {
            "flwr.clientapp": import_seconds("flwr.clientapp"),
            "client.app": import_seconds("client.app"),
            "torch": import_seconds("torch"),
        },
        "total_seconds": time.perf_counter() - started,
    }
    write_results(out_dir, "bench_rounds", result, _markdown(result))
    return result


def _markdown(result: dict[str, Any]) -> str:
    variants = result["variants"]
    lines = [
        f"# Deployment round latency ({result['sites']} local sites, real SuperLink + SuperNodes)",
        "",
        "Variants, run back to back: fedembed's ServerApp collects replies every 0.2 s "
        "(`server/grid.py`, run-config `reply-poll-interval`) or every 3 s (what Flower 1.41's own "
        "grid does); the SuperLink keeps its state in memory (Flower's default) or in its "
        "`--database` (SQLite: survives a SuperLink restart). Overhead = round wall time minus the "
        "slowest site's training.",
        "",
        "| variant | median wall s | median training s | median overhead s | rounds within "
        f"{result['target_overhead_seconds']:.0f} s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, v in variants.items():
        within = sum(
            r["overhead_seconds"] <= result["target_overhead_seconds"] for r in v["rounds_measured"]
        )
        lines.append(
            f"| {name} | {v['median_round_wall_seconds']:.2f} | {v['median_site_train_seconds']:.2f} "
            f"| **{v['median_overhead_seconds']:.2f}** | {within}/{len(v['rounds_measured'])} |"
        )
    first = next(iter(variants.values()))["median_overhead_seconds"]
    for name, v in list(variants.items())[1:]:
        lines.append(
            f"\n{name} / {next(iter(variants))}: {v['median_overhead_seconds'] / first:.2f}x"
        )
    lines += [
        "",
        "Where a round's time goes, for the site whose reply arrived last (medians over rounds; "
        "site timings from its audit log, server timings from history.jsonl):",
        "",
        "| variant | " + " | ".join(name for name, _ in PHASES) + " | of which training |",
        "| --- | " + " | ".join("---:" for _ in PHASES) + " | ---: |",
    ]
    for name, v in variants.items():
        median = v.get("median_phase_seconds") or {}
        if median:
            lines.append(
                f"| {name} | "
                + " | ".join(f"{median[p]:.2f}" for p, _ in PHASES)
                + f" | {median['training']:.2f} |"
            )
    lines += ["", *(f"- {name}: {meaning}" for name, meaning in PHASES)]
    imports = result["per_message_process_import_seconds"]
    lines += [
        "",
        "- first round (embedding through the cache, writing the site bundle) is excluded: "
        + ", ".join(f"{v['first_round_wall_seconds']:.1f} s" for v in variants.values()),
        f"- Flower 1.41's floor that fedembed cannot change without patching Flower: the SuperNode "
        f"sleeps {result['flower_poll_floor_seconds']:.0f} s whenever its poll finds no message (the "
        "slowest site polls right after its reply, before the next round exists, so it waits ~3 s "
        "minus the coordinator's work), checks for the ClientApp's reply every 0.5 s, and moves "
        "every array of a message as separate HTTP objects on every hop",
        f"- a fresh per-message ClientApp process imports: flwr.clientapp {imports['flwr.clientapp']:.2f} s, "
        f"client.app {imports['client.app']:.2f} s (no torch: training runs in the warm site worker), "
        f"torch {imports['torch']:.2f} s (what a torch-importing ClientApp would pay per message)",
        f"- machine: {result['machine']}",
        "",
        "Per round:",
        "",
        "| variant | round | wall s | slowest site's training s | overhead s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, v in variants.items():
        lines += [
            f"| {name} | {r['round']} | {r['wall_seconds']:.2f} | {r['max_site_train_seconds']:.2f} "
            f"| {r['overhead_seconds']:.2f} |"
            for r in v["rounds_measured"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", default="runs/bench-rounds")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=13)
    parser.add_argument("--n", type=int, default=600)
    args = parser.parse_args(argv)
    result = run_benchmark(
        out_dir=Path(args.out),
        work_dir=Path(args.work),
        sites=args.sites,
        rounds=args.rounds,
        run_config={"dataset-n": args.n, "local-epochs": 2},
    )
    print(_markdown(result))


if __name__ == "__main__":
    main()
