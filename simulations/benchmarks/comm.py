"""Benchmark: bytes a site exchanges per round vs the head's parameter bytes and the frozen encoders' size."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.config import HOME_ENV
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import load_average, machine_info
from simulations.flower.federate import APP_DIR, SITE_ENV, site_node_config

TARGET_RATIO = 1.1
PACKAGED = {"image-encoder": "mobilenetv2", "text-encoder": "minilm", "encoder-image-size": 128}


def state_bytes(arrays: Mapping[str, Any]) -> int:
    """Sum of numel * 4 over a state dict (the float32 bytes of its values)."""
    return int(sum(int(a.size) * 4 for a in arrays.values()))


def encoder_bytes(spec: str, *, modality: str, image_size: int | None = None) -> dict[str, Any]:
    """Parameter count and float32 bytes of a frozen encoder: what a full fine-tune would send."""
    from common.encoders import load_encoder

    encoder = load_encoder(spec, modality=modality, image_size=image_size)
    model = encoder.model  # type: ignore[attr-defined]
    parameters = int(sum(p.numel() for p in model.parameters()))
    return {
        "encoder": spec,
        "modality": modality,
        "dim": int(encoder.dim),
        "parameters": parameters,
        "bytes": parameters * 4,
    }


def head_reference(
    preset: str, *, dims: Mapping[str, int], loss: str, layout: str, num_classes: int
) -> dict[str, Any]:
    """The federated state of ``preset`` built from its HeadConfig: head + the loss's own parameters."""
    from common.artifacts import state_arrays
    from common.heads import HEAD_PRESETS
    from common.training import build_head_model

    model = build_head_model(
        dims=dict(dims),
        head_config=HEAD_PRESETS[preset],
        layout=layout,
        loss=loss,
        num_classes=num_classes,
    )
    arrays = state_arrays(model)
    head_only = {k: v for k, v in arrays.items() if k.startswith("head.")}
    return {
        "arrays": len(arrays),
        "parameters": int(sum(a.size for a in arrays.values())),
        "state_bytes": state_bytes(arrays),
        "head_only_bytes": state_bytes(head_only),
    }


def _audit_train_bytes(home: Path, run_id: int) -> list[int]:
    """Raw array bytes of every train reply the sites' own egress audit logs recorded for ``run_id``."""
    sizes = []
    for log in sorted((home / "sites").glob("*/audit.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["run_id"] == run_id and entry["message_type"] == "train":
                sizes.append(int(entry["total_bytes"]))
    return sizes


def _ratios(values: Sequence[int], reference: int) -> dict[str, Any]:
    return {
        "count": len(values),
        "median_bytes": statistics.median(values),
        "min_bytes": min(values),
        "max_bytes": max(values),
        "median_ratio": round(statistics.median(values) / reference, 4),
        "max_ratio": round(max(values) / reference, 4),
    }


def measure_simulation(
    preset: str, *, home: Path, sites: int, rounds: int, run_config: Mapping[str, Any]
) -> dict[str, Any]:
    """One Flower simulation run with ``preset``; bytes per site and round from the server's history."""
    from common.artifacts import load_head, state_arrays
    from simulations.flower.federate import simulate

    config = {**run_config, "head": preset, "num-server-rounds": rounds}
    started = time.perf_counter()
    fed = simulate(out_dir=home, sites=sites, run_config=config, echo=False)
    if not fed.ok:
        raise RuntimeError(
            f"simulation with head '{preset}' ended {fed.result.status}: log {fed.result.log_path}"
        )
    received = [b for e in fed.history for b in e["bytes_received"].values()]
    sent = [b for e in fed.history for b in e["bytes_sent"].values()]
    if len(received) != sites * rounds or len(sent) != sites * rounds:
        raise RuntimeError(
            f"head '{preset}': history has {len(received)} replies and {len(sent)} sends, "
            f"expected {sites * rounds} of each"
        )
    model, _ = load_head(fed.final_head)
    final_bytes = state_bytes(state_arrays(model))
    audit = _audit_train_bytes(home, fed.result.run_id)
    return {
        "flower_run_id": fed.result.run_id,
        "run_seconds": round(time.perf_counter() - started, 1),
        "final_head_state_bytes": final_bytes,
        "history_bytes_received": _ratios(received, final_bytes),
        "history_bytes_sent": _ratios(sent, final_bytes),
        "site_audit_train_bytes": _ratios(audit, final_bytes) if audit else None,
    }


def flwr_traffic(connection: Any, run_id: int) -> dict[str, int]:
    """Flower's own count of the run's Fleet API bytes (``flwr ls --run-id ID --format json``)."""
    from simulations.flower.flwr_cli import flwr_cli

    args = ["ls", connection.name, "--run-id", str(run_id), "--format", "json"]
    text = flwr_cli(args, connection).stdout
    data = json.loads(text[text.find("{") : text.rfind("}") + 1])
    row = next(r for r in data["runs"] if int(r["run-id"]) == run_id)
    traffic = row["network-traffic"]
    return {k.replace("-", "_"): int(traffic[k]) for k in ("inbound-bytes", "outbound-bytes")}


def measure_deployment(
    preset: str, *, home: Path, sites: int, rounds: int, run_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Real SuperLink + SuperNodes: Flower's network-traffic counter for the whole run.

    Flower records the counter in its Fleet API handlers only (SuperNode <-> SuperLink), which the
    simulation engine's virtual nodes do not use. The run sends the head down in ``rounds`` train messages plus one final evaluate
    message per site, and receives it back in ``rounds`` train replies (evaluate replies carry
    scalar metrics only).
    """
    from common.artifacts import load_head, state_arrays
    from simulations.flower.flwr_cli import run_app
    from simulations.flower.local import local_federation

    os.environ[HOME_ENV] = str(home)  # caches and site state of the processes started here
    run_dir = home / "run"
    config = {
        **run_config,
        "head": preset,
        "num-server-rounds": rounds,
        "min-sites": sites,
        "run-dir": str(run_dir),
    }
    node_configs = [site_node_config(home, i, sites) for i in range(sites)]
    with local_federation(home / "flower-deploy", node_configs, extra_env=SITE_ENV) as (link, _):
        result = run_app(
            APP_DIR,
            link.connection,
            run_config=config,
            log_dir=home / "logs",
        )
        if not result.ok:
            raise RuntimeError(f"deployment run ended {result.status}: log {result.log_path}")
        traffic = flwr_traffic(link.connection, result.run_id)
    model, _ = load_head(run_dir / "final")
    head = state_bytes(state_arrays(model))
    down_messages, up_messages = sites * (rounds + 1), sites * rounds
    return {
        "flower_run_id": result.run_id,
        "head": preset,
        "sites": sites,
        "rounds": rounds,
        **traffic,
        "head_state_bytes": head,
        "inbound_per_site_round_bytes": round(traffic["inbound_bytes"] / up_messages),
        "outbound_per_head_message_bytes": round(traffic["outbound_bytes"] / down_messages),
        "inbound_ratio": round(traffic["inbound_bytes"] / (up_messages * head), 4),
        "outbound_ratio": round(traffic["outbound_bytes"] / (down_messages * head), 4),
    }


def run_benchmark(
    *,
    out_dir: Path,
    work_dir: Path,
    presets: Sequence[str],
    sites: int,
    rounds: int,
    run_config: Mapping[str, Any],
    deployment_preset: str | None = None,
    name: str = "bench_comm",
) -> dict[str, Any]:
    """Measure every preset on the simulation engine (and one on real processes); write JSON + md."""
    started = time.perf_counter()
    home = work_dir.resolve()
    config = {"eval-every": 0, "local-epochs": 1, **PACKAGED, **run_config}
    image_size = int(config["encoder-image-size"]) or None
    encoders = [
        encoder_bytes(str(config["image-encoder"]), modality="image", image_size=image_size),
        encoder_bytes(str(config["text-encoder"]), modality="text"),
    ]
    frozen = sum(e["bytes"] for e in encoders)
    dims = {e["modality"]: e["dim"] for e in encoders}
    loss, layout = str(config.get("loss", "infonce")), str(config.get("layout", "two-tower"))
    before = machine_info()
    rows = []
    for preset in presets:
        reference = head_reference(preset, dims=dims, loss=loss, layout=layout, num_classes=5)
        measured = measure_simulation(
            preset, home=home, sites=sites, rounds=rounds, run_config=config
        )
        if measured["final_head_state_bytes"] != reference["state_bytes"]:
            raise RuntimeError(
                f"head '{preset}': the run's final head has {measured['final_head_state_bytes']} B, "
                f"the preset built here {reference['state_bytes']} B"
            )
        up = measured["history_bytes_received"]
        rows.append(
            {
                "head": preset,
                "reference": reference,
                **measured,
                "bytes_per_site_round": up["median_bytes"],
                "ratio_to_head": up["max_ratio"],
                "meets_target": up["max_ratio"] <= TARGET_RATIO,
                "full_finetune_ratio": round(frozen / up["median_bytes"], 1),
            }
        )
    deployment = None
    if deployment_preset is not None:
        deployment = measure_deployment(
            deployment_preset, home=home, sites=sites, rounds=rounds, run_config=config
        )
    result = {
        "benchmark": "communication per site per round",
        "machine": before,
        "load_average_after": load_average(),
        "sites": sites,
        "rounds": rounds,
        "run_config": config,
        "target_ratio": TARGET_RATIO,
        "frozen_encoders": encoders,
        "frozen_encoder_bytes": frozen,
        "presets": rows,
        "deployment_wire_traffic": deployment,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_results(out_dir, name, result, render_markdown(result))
    return result


def render_markdown(result: Mapping[str, Any]) -> str:
    """The result as a Markdown page."""
    frozen = result["frozen_encoder_bytes"]
    lines = [
        f"# Communication per site per round ({result['sites']} simulated sites, {result['rounds']} rounds)",
        "",
        "Bytes are what the server's history.jsonl records for each site and round (serialized arrays "
        "with their npy headers, as Flower counts an ArrayRecord); the reference is the head's "
        "federated state, sum(numel * 4).",
        "",
        "| head | parameters | head state B | median B per site per round (up) | max ratio up | "
        "max ratio down | site audit ratio | meets <= 1.1x | full fine-tune would send |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in result["presets"]:
        audit = row["site_audit_train_bytes"]
        lines.append(
            f"| {row['head']} | {row['reference']['parameters']:,} | {row['reference']['state_bytes']:,} | "
            f"{row['bytes_per_site_round']:,.0f} | {row['ratio_to_head']:.4f}x | "
            f"{row['history_bytes_sent']['max_ratio']:.4f}x | "
            f"{'-' if audit is None else format(audit['max_ratio'], '.4f') + 'x'} | "
            f"{'yes' if row['meets_target'] else 'NO'} | {row['full_finetune_ratio']:,.0f}x more |"
        )
    lines += ["", "Frozen encoders (what a full fine-tune would have to send each round):", ""]
    lines += [
        f"- {e['encoder']} ({e['modality']}, {e['dim']}-d): {e['parameters']:,} parameters, "
        f"{e['bytes'] / 2**20:.1f} MiB"
        for e in result["frozen_encoders"]
    ]
    lines.append(f"- together: {frozen / 2**20:.1f} MiB")
    deployment = result.get("deployment_wire_traffic")
    if deployment:
        lines += [
            "",
            f"Wire bytes on real SuperLink + {deployment['sites']} SuperNodes (Flower's `flwr ls` "
            f"network-traffic, protobuf messages of the Fleet API; head '{deployment['head']}', "
            f"{deployment['head_state_bytes']:,} B):",
            "",
            f"- inbound (sites -> SuperLink) {deployment['inbound_bytes']:,} B over "
            f"{deployment['sites'] * deployment['rounds']} train replies: "
            f"{deployment['inbound_per_site_round_bytes']:,} B per site per round = "
            f"**{deployment['inbound_ratio']:.4f}x** the head (evaluate replies included)",
            f"- outbound (SuperLink -> sites) {deployment['outbound_bytes']:,} B over "
            f"{deployment['sites'] * (deployment['rounds'] + 1)} messages carrying the head (train + the "
            f"final evaluate): {deployment['outbound_per_head_message_bytes']:,} B each = "
            f"**{deployment['outbound_ratio']:.4f}x** the head",
        ]
    lines += [
        "",
        "- bytes are deterministic: medians and maxima are over every (site, round) of the run; "
        "up = site -> server (train replies), down = server -> site (train messages)",
        "- site audit ratio: raw array bytes each site's own egress audit log recorded for its train "
        "replies, over the head state bytes (an independent, site-side count)",
        "- Flower 1.41 records network-traffic only in its Fleet API handlers (SuperNode <-> SuperLink, "
        "read in its source), which the simulation engine's virtual nodes do not use: it is measured "
        "on real processes instead",
        f"- machine: {result['machine']}; load average after: {result['load_average_after']}",
        f"- total benchmark time: {result['total_seconds']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-comm"))
    parser.add_argument("--presets", default="default,paper,small")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=150)
    parser.add_argument("--deployment-preset", default="default", help="'' to skip")
    args = parser.parse_args(argv)
    result = run_benchmark(
        out_dir=args.out,
        work_dir=args.work,
        presets=[p for p in args.presets.split(",") if p],
        sites=args.sites,
        rounds=args.rounds,
        run_config={"dataset-n": args.n},
        deployment_preset=args.deployment_preset or None,
    )
    print(render_markdown(result))


if __name__ == "__main__":
    main()
