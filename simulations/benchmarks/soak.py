"""Soak benchmark: a long deployment run with local sites, one of them killed (SIGKILL) and restarted every few rounds."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import HOME_ENV
from common.tensorfile import read_tensorfile
from server.checkpoints import RunStore
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import load_average, machine_info
from simulations.flower.federate import APP_DIR, SITE_ENV, STARTUP_TIMEOUT, site_node_config
from simulations.flower.flwr_cli import run_app, submit_run, wait_for_run
from simulations.flower.local import LocalSuperLink, LocalSuperNode
from simulations.flower.processes import descendants_running
from simulations.flower.run_config import ConfigValue

FINAL_KEY = "fedembed"  # common/artifacts.py's metadata key in final/head.safetensors
CHECKPOINT_KEY = "meta"  # server/checkpoints.py's metadata key in checkpoints


def kill_rounds(rounds: int, *, every: int, first: int) -> list[int]:
    """The rounds during which a site is killed: ``first``, ``first + every``, ... up to ``rounds``."""
    return list(range(first, rounds + 1, every)) if every > 0 else []


def _history(run_dir: Path) -> list[dict[str, Any]]:
    return RunStore(run_dir).read_history()


def _wait_for_rounds(run_dir: Path, rounds: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(_history(run_dir)) < rounds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"round {rounds} of the soak run not done after {timeout:.0f} s")
        time.sleep(0.2)


def _kill_mid_round(node: LocalSuperNode, *, timeout: float) -> dict[str, Any]:
    """SIGKILL ``node`` once its ClientApp for the current round runs; start it again at once."""
    assert node.process is not None
    known = set(descendants_running(node.process.pid, "flwr-clientapp"))
    deadline = time.monotonic() + timeout
    clientapp = None
    while clientapp is None and time.monotonic() < deadline:
        fresh = set(descendants_running(node.process.pid, "flwr-clientapp")) - known
        clientapp = min(fresh) if fresh else None
        time.sleep(0.05)
    old_id = node.node_id
    os.kill(node.process.pid, signal.SIGKILL)
    node.kill()  # reap it and end its SuperExec and ClientApp
    killed = time.monotonic()
    node.start()
    return {
        "site": node.name,
        "old_node_id": old_id,
        "new_node_id": node.node_id,
        "killed_during_clientapp": clientapp is not None,
        "restart_seconds": round(time.monotonic() - killed, 2),
    }


def _rounds_table(
    history: Sequence[dict[str, Any]], names: dict[int, str], kills: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    for entry in history:
        rnd = int(entry["round"])
        row: dict[str, Any] = {
            "round": rnd,
            "wall_seconds": entry["wall_seconds"],
            "aggregated": sorted(names.get(int(n), f"node {n}") for n in entry["sites"]),
        }
        for kind in ("rejected", "failed", "declined", "dropped", "skipped"):
            row[kind] = sorted(names.get(int(n), f"node {n}") for n in entry.get(kind, {}))
        if rnd in kills:
            row["killed"] = kills[rnd]["site"]
        rows.append(row)
    return rows


def verify(
    run_dir: Path,
    *,
    rounds: int,
    names: dict[int, str],
    kills: dict[int, dict[str, Any]],
    min_sites: int,
) -> dict[str, Any]:
    """What must hold after the soak: every round once, sites consistent, checkpoints replayable."""
    history = _history(run_dir)
    store = RunStore(run_dir)
    problems = []
    if [int(e["round"]) for e in history] != list(range(1, rounds + 1)):
        problems.append(f"history rounds {[e['round'] for e in history]}, want 1..{rounds}")
    shapes = None
    for rnd in range(rounds + 1):
        path = store.checkpoints / f"round-{rnd:04d}.safetensors"
        arrays = store.load_checkpoint(path, rnd).arrays  # raises if unreadable
        current = {k: v.shape for k, v in arrays.items()}
        if shapes is not None and current != shapes:
            problems.append(f"checkpoint {rnd} has other shapes")
        shapes = current
    for entry in history:
        rnd, sites = int(entry["round"]), [int(n) for n in entry["sites"]]
        unknown = [n for n in sites if n not in names]
        if unknown:
            problems.append(f"round {rnd}: aggregated unknown node ids {unknown}")
        if len(sites) < min_sites:
            problems.append(f"round {rnd}: {len(sites)} sites aggregated, fewer than {min_sites}")
        kill = kills.get(rnd)
        if kill is not None and str(kill["old_node_id"]) not in entry.get("dropped", {}):
            problems.append(f"round {rnd}: killed {kill['site']} is not recorded as dropped")
    final, _ = read_tensorfile(run_dir / "final" / "head.safetensors", key=FINAL_KEY)
    last, _ = read_tensorfile(
        store.checkpoints / f"round-{rounds:04d}.safetensors", key=CHECKPOINT_KEY
    )
    final_equals_last = final.keys() == last.keys() and all(
        np.array_equal(final[k], last[k]) for k in final
    )
    if not final_equals_last:
        problems.append("final head differs from the last checkpoint")
    return {
        "problems": problems,
        "checkpoints_loadable": rounds + 1,
        "final_equals_last_checkpoint": final_equals_last,
        "final_arrays": final,
    }


def run_soak(
    *,
    out_dir: Path,
    work_dir: Path,
    sites: int,
    rounds: int,
    kill_every: int,
    first_kill: int,
    min_sites: int,
    round_timeout: float,
    run_config: dict[str, ConfigValue],
) -> dict[str, Any]:
    """Run the soak once and write ``out_dir``/bench_soak.json and .md."""
    home = (work_dir / time.strftime("%Y%m%d-%H%M%S")).resolve()
    home.mkdir(parents=True)
    os.environ[HOME_ENV] = str(home)
    run_dir = home / "run"
    config: dict[str, ConfigValue] = {
        **run_config,
        "num-server-rounds": rounds,
        "min-sites": min_sites,
        "round-timeout": round_timeout,
        "run-dir": str(run_dir),
    }
    schedule = kill_rounds(rounds, every=kill_every, first=first_kill)
    started = time.monotonic()
    flower = home / "flower"
    kills: dict[int, dict[str, Any]] = {}
    with LocalSuperLink(
        flower, database=flower / "state.db", startup_timeout=STARTUP_TIMEOUT
    ) as link:
        nodes = [
            LocalSuperNode(
                link.address,
                flower,
                name=f"site-{i}",
                home=link.home,
                node_config=site_node_config(home, i, sites),
                startup_timeout=STARTUP_TIMEOUT,
                extra_env=SITE_ENV,
            )
            for i in range(sites)
        ]
        try:
            for node in nodes:
                node.start(wait=False)
            for node in nodes:
                node.wait_connected()
            names = {int(n.node_id or 0): n.name for n in nodes}
            run_id = submit_run(APP_DIR, link.connection, run_config=config)
            for number, rnd in enumerate(schedule):
                _wait_for_rounds(run_dir, rnd - 1, timeout=4 * round_timeout * rnd)
                victim = nodes[1 + number % (sites - 1)]  # site-0 is never killed
                kills[rnd] = _kill_mid_round(victim, timeout=round_timeout)
                names[int(victim.node_id or 0)] = victim.name
            status = wait_for_run(link.connection, run_id, timeout=4 * round_timeout * rounds)
            soak_seconds = time.monotonic() - started
            checked = verify(run_dir, rounds=rounds, names=names, kills=kills, min_sites=min_sites)
            original = checked.pop("final_arrays")
            # Replay: a coordinator resumed from the checkpoints with nothing left to train
            # re-exports the final head; it must be the same head, bit for bit.
            replay = run_app(
                APP_DIR,
                link.connection,
                run_config={**config, "resume": True},
                timeout=10 * round_timeout,
            )
            replayed, _ = read_tensorfile(run_dir / "final" / "head.safetensors", key=FINAL_KEY)
        finally:
            for node in nodes:
                node.stop()
    replay_equal = original.keys() == replayed.keys() and all(
        np.array_equal(original[k], replayed[k]) for k in original
    )
    history = _history(run_dir)
    rows = _rounds_table(history, names, kills)
    result = {
        "machine": {**machine_info(), "load_average_at_end": load_average()},
        "sites": sites,
        "rounds_planned": rounds,
        "rounds_completed": len(history),
        "status": status.status,
        "min_sites": min_sites,
        "round_timeout_seconds": round_timeout,
        "run_config": config,
        "kills": [{"round": r, **k} for r, k in sorted(kills.items())],
        "rounds": rows,
        "updates_rejected": sum(len(r["rejected"]) for r in rows),
        "updates_failed": sum(len(r["failed"]) for r in rows),
        "sites_dropped": sum(len(r["dropped"]) for r in rows),
        "soak_wall_seconds": round(soak_seconds, 1),
        "median_round_seconds": float(np.median([r["wall_seconds"] for r in rows])),
        "verification": {
            **checked,
            "replay_status": replay.status,
            "replay_equals_final": replay_equal,
            "replay_resumed_from": rounds
            if f"resuming run from round {rounds}" in replay.log_text
            else None,
        },
    }
    write_results(out_dir, "bench_soak", result, _markdown(result))
    return result


def _markdown(result: dict[str, Any]) -> str:
    check = result["verification"]
    lines = [
        f"# Soak: {result['rounds_planned']} deployment rounds, {result['sites']} local sites, "
        "one site SIGKILLed mid-round and restarted every few rounds",
        "",
        f"Real `flower-superlink` (with `--database`) + {result['sites']} `flower-supernode` "
        f"processes on 127.0.0.1, min-sites {result['min_sites']}, round-timeout "
        f"{result['round_timeout_seconds']:.0f} s. Produced by `python -m simulations.benchmarks.soak`.",
        "",
        f"- status: **{result['status']}**, rounds completed: **{result['rounds_completed']}"
        f"/{result['rounds_planned']}**, wall time {result['soak_wall_seconds']:.0f} s "
        f"(median round {result['median_round_seconds']:.1f} s)",
        f"- kills: {len(result['kills'])}; site drops recorded: {result['sites_dropped']}; "
        f"updates rejected: {result['updates_rejected']}; updates failed: {result['updates_failed']}",
        f"- every checkpoint loadable ({check['checkpoints_loadable']} files, rounds 0.."
        f"{result['rounds_planned']}); final export equals the last checkpoint: "
        f"**{check['final_equals_last_checkpoint']}**; a coordinator resumed from the checkpoints "
        f"(resume=true, from round {check['replay_resumed_from']}) re-exported the same head: "
        f"**{check['replay_equals_final']}** ({check['replay_status']})",
        f"- verification problems: {check['problems'] or 'none'}",
        "",
        "| kill round | site | old node | new node | killed while its ClientApp ran | restart s |",
        "| ---: | --- | ---: | ---: | --- | ---: |",
    ]
    lines += [
        f"| {k['round']} | {k['site']} | {k['old_node_id']} | {k['new_node_id']} | "
        f"{k['killed_during_clientapp']} | {k['restart_seconds']:.1f} |"
        for k in result["kills"]
    ]
    lines += [
        "",
        "| round | wall s | aggregated | rejected | failed | dropped | skipped | killed |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for row in result["rounds"]:
        lines.append(
            f"| {row['round']} | {row['wall_seconds']:.1f} | {len(row['aggregated'])} | "
            f"{len(row['rejected'])} | {len(row['failed'])} | {', '.join(row['dropped'])} | "
            f"{', '.join(row['skipped'])} | {row.get('killed', '')} |"
        )
    lines += [
        "",
        "A killed round lasts until the round timeout or until Flower reports the node unavailable",
        "(2 missed 30 s heartbeats), whichever is first; the killed node's old id is then quarantined",
        "(not sampled while the SuperLink still lists it without a new heartbeat), so the next round",
        "does not wait for it again, and the restarted site joins under its new node id.",
        f"- machine: {result['machine']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", default="runs/bench-soak")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kill-every", type=int, default=4)
    parser.add_argument("--first-kill", type=int, default=3)
    parser.add_argument("--min-sites", type=int, default=3)
    parser.add_argument("--round-timeout", type=float, default=180.0)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args(argv)
    result = run_soak(
        out_dir=Path(args.out),
        work_dir=Path(args.work),
        sites=args.sites,
        rounds=args.rounds,
        kill_every=args.kill_every,
        first_kill=args.first_kill,
        min_sites=args.min_sites,
        round_timeout=args.round_timeout,
        run_config={"dataset-n": args.n, "local-epochs": 1, "batch-size": 32, "head": "small"},
    )
    print(_markdown(result))
    print(json.dumps({k: result[k] for k in ("status", "rounds_completed", "soak_wall_seconds")}))


if __name__ == "__main__":
    main()
