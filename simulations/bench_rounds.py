"""Benchmark: deployment round latency vs the compute inside the round (real SuperLink + SuperNodes)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json, atomic_write_text
from simulations.federate import deploy_local

FLOWER_POLL_SECONDS = (
    3.0  # Flower 1.41: SuperNode idle loop and ServerApp reply wait (read in its source)
)


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


def run_benchmark(
    *, out_dir: Path, work_dir: Path, sites: int, rounds: int, run_config: dict[str, Any]
) -> dict[str, Any]:
    started = time.perf_counter()
    config = {"num-server-rounds": rounds, "eval-every": 0, **run_config}
    fed = deploy_local(out_dir=work_dir, sites=sites, run_config=config, echo=False)
    if not fed.ok:
        raise RuntimeError(f"benchmark run failed: {fed.result.status}; log {fed.result.log_path}")
    rows = round_breakdown(fed.history)
    overheads = [r["overhead_seconds"] for r in rows]
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "sites": sites,
        "rounds": rounds,
        "run_config": config,
        "rounds_measured": rows,
        "median_round_wall_seconds": statistics.median(r["wall_seconds"] for r in rows),
        "median_overhead_seconds": statistics.median(overheads),
        "median_site_train_seconds": statistics.median(r["max_site_train_seconds"] for r in rows),
        "first_round_wall_seconds": fed.history[0]["wall_seconds"],
        "flower_poll_floor_seconds": FLOWER_POLL_SECONDS,
        "per_message_process_import_seconds": {
            "flwr.clientapp": import_seconds("flwr.clientapp"),
            "client.app": import_seconds("client.app"),
            "torch": import_seconds("torch"),
        },
        "total_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out_dir / "bench_rounds.json", result)
    atomic_write_text(out_dir / "bench_rounds.md", _markdown(result))
    return result


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Deployment round latency ({result['sites']} local sites, real SuperLink + SuperNodes)",
        "",
        "| round | wall s | slowest site's training s | overhead s |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['round']} | {r['wall_seconds']:.2f} | {r['max_site_train_seconds']:.2f} | {r['overhead_seconds']:.2f} |"
        for r in result["rounds_measured"]
    ]
    imports = result["per_message_process_import_seconds"]
    lines += [
        "",
        f"- median round wall time: {result['median_round_wall_seconds']:.2f} s; median training inside it: "
        f"{result['median_site_train_seconds']:.2f} s; **median overhead: {result['median_overhead_seconds']:.2f} s**",
        f"- first round (embedding through the cache, writing the site bundle): {result['first_round_wall_seconds']:.1f} s (excluded)",
        f"- Flower 1.41's polling floor: it sleeps {result['flower_poll_floor_seconds']:.0f} s between polls in the SuperNode "
        "and in the ServerApp's wait for replies, once per message exchange",
        f"- a fresh per-message ClientApp process imports: flwr.clientapp {imports['flwr.clientapp']:.2f} s, "
        f"client.app {imports['client.app']:.2f} s (no torch), torch {imports['torch']:.2f} s (needed to train)",
        f"- machine: {result['machine']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="simulations/results")
    parser.add_argument("--work", default="runs/bench-rounds")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--n", type=int, default=600)
    args = parser.parse_args(argv)
    result = run_benchmark(
        out_dir=Path(args.out),
        work_dir=Path(args.work),
        sites=args.sites,
        rounds=args.rounds,
        run_config={"dataset-n": args.n, "local-epochs": 2},
    )
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "rounds_measured"}, indent=2, default=str
        )
    )


if __name__ == "__main__":
    main()
