"""Benchmark: 10, 50 and 100 simulated sites on Flower's simulation engine: round wall time and peak memory."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.config import HOME_ENV, RunSettings, SiteSettings
from common.wire import NUM_EXAMPLES
from simulations.benchmarks.results import RESULTS_DIR, write_results
from simulations.experiments.machine import load_average, machine_info
from simulations.flower.processes import descendants

MEMORY_TARGET_GIB = 8.0
SAMPLE_SECONDS = 0.5
GIB = 2**30
PACKAGED = {"image-encoder": "mobilenetv2", "text-encoder": "minilm", "encoder-image-size": 128}


# ---------------------------------------------------------------- process-tree memory


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    return [root, *(child.pid for child in descendants(root))]


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in KiB (psutil reads /proc/<pid>/smaps_rollup); None if the process is gone.

    PSS divides every shared page among the processes mapping it, so memory-mapped embeddings and
    shared libraries count once over the tree instead of once per process (RSS counts them in each).
    """
    try:
        memory = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return memory.rss // 1024, memory.pss // 1024


def process_label(pid: int) -> str:
    """A short name for a process: the program, or Ray's ``ray::Actor`` title."""
    try:
        words = [word for word in psutil.Process(pid).cmdline() if word]
    except psutil.Error:
        return "?"
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return re.sub(r"\..*$", "", words[0].split()[0])
    program = Path(words[0]).name
    if program.startswith("python"):  # python [-u] .../flower-superlink, python -m module
        rest = iter(words[1:])
        for word in rest:
            if word == "-m":
                return next(rest, program)
            if not word.startswith("-"):
                return Path(word).name
    return program


@dataclass
class MemorySample:
    time: float
    processes: int
    rss_kib: int
    pss_kib: int
    by_label_pss_kib: dict[str, int]


@dataclass
class TreeSampler:
    """Samples RSS and PSS of a process tree every ``interval`` s in a thread until stopped.

    The tree's root is found by ``match`` among the descendants of this process (the SuperLink
    that simulate() starts), so the sampler can be started before the root exists.
    """

    match: str
    interval: float = SAMPLE_SECONDS
    samples: list[MemorySample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _root(self) -> int | None:
        for pid in tree(os.getpid())[1:]:
            if self.match in process_label(pid):
                return pid
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            sample = self.sample()
            if sample is not None:
                self.samples.append(sample)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def sample(self) -> MemorySample | None:
        root = self._root()
        if root is None:
            return None
        rss = pss = count = 0
        by_label: dict[str, int] = {}
        for pid in tree(root):
            memory = memory_kib(pid)
            if memory is None:
                continue
            count += 1
            rss += memory[0]
            pss += memory[1]
            label = process_label(pid)
            by_label[label] = by_label.get(label, 0) + memory[1]
        return MemorySample(time.time(), count, rss, pss, by_label)

    def peak(self) -> dict[str, Any]:
        """Peak PSS and peak RSS of the tree (separately), with the PSS breakdown at its peak."""
        if not self.samples:
            raise RuntimeError(f"no memory sample of a '{self.match}' process tree was taken")
        by_pss = max(self.samples, key=lambda s: s.pss_kib)
        by_rss = max(self.samples, key=lambda s: s.rss_kib)
        return {
            "samples": len(self.samples),
            "interval_seconds": self.interval,
            "peak_pss_gib": round(by_pss.pss_kib / 2**20, 3),
            "peak_rss_gib": round(by_rss.rss_kib / 2**20, 3),
            "max_processes": max(s.processes for s in self.samples),
            "pss_mib_by_process_at_peak": {
                label: round(kib / 1024, 1)
                for label, kib in sorted(by_pss.by_label_pss_kib.items(), key=lambda kv: -kv[1])
            },
        }


# ---------------------------------------------------------------- embedding pass


def embed_once(home: Path, *, sites: int, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Embed the run's whole pooled dataset into the sites' shared cache ($FEDEMBED_HOME/cache).

    Simulated sites take their partition of this pool and find every embedding in the cache,
    so the encoders' forward passes happen here, once, and not inside the measured rounds.
    """
    from common.embedding import embed_dataset
    from common.pipeline import get_encoder, load_pooled_dataset

    os.environ[HOME_ENV] = str(home)
    settings = SiteSettings(partition_id=0, num_partitions=sites)
    spec = settings.data_spec(RunSettings.from_run_config(run_config))
    started = time.perf_counter()
    pool = load_pooled_dataset(spec)
    image = get_encoder(spec.image_encoder, modality="image", image_size=spec.encoder_image_size)
    text = get_encoder(spec.text_encoder, modality="text", max_length=spec.max_length)
    loaded = time.perf_counter()
    _, report = embed_dataset(
        pool, cache_dir=settings.cache_path, image_encoder=image, text_encoder=text
    )
    done = time.perf_counter()
    cache_bytes = sum(p.stat().st_size for p in settings.cache_path.rglob("*.npy"))
    return {
        "cache_shards": _shards(settings.cache_path),
        "examples": len(pool),
        "inputs_encoded": report.encoded,
        "seconds": round(done - started, 1),
        "encode_seconds": round(done - loaded, 1),
        "cache_dir": str(settings.cache_path),
        "cache_npy_mib": round(cache_bytes / 2**20, 2),
    }


def _shards(cache_dir: Path) -> int:
    return sum(1 for _ in cache_dir.rglob("shards/*.npy"))


# ---------------------------------------------------------------- one scale point


def measure_sites(
    sites: int, *, work_dir: Path, rounds: int, run_config: Mapping[str, Any], timeout: float
) -> dict[str, Any]:
    """Embed once, then run ``rounds`` rounds with ``sites`` virtual sites while sampling memory."""
    from simulations.flower.federate import simulate

    home = (work_dir / f"sites-{sites}").resolve()
    config = {**run_config, "num-server-rounds": rounds}
    embedding = embed_once(home, sites=sites, run_config=config)
    sampler = TreeSampler("flower-superlink").start()
    started = time.perf_counter()
    try:
        fed = simulate(
            out_dir=home, sites=sites, run_config=config, cpus_per_site=1, timeout=timeout
        )
    finally:
        sampler.stop()
    if not fed.ok:
        raise RuntimeError(
            f"{sites} sites: run ended {fed.result.status} ({fed.result.details}); "
            f"log {fed.result.log_path}"
        )
    walls = [float(e["wall_seconds"]) for e in fed.history]
    aggregated = [len(e["sites"]) for e in fed.history]
    if len(walls) != rounds or any(n != sites for n in aggregated):
        raise RuntimeError(
            f"{sites} sites: rounds aggregated {aggregated}, expected {rounds} x {sites}"
        )
    examples = [int(m[NUM_EXAMPLES]) for e in fed.history for m in e["site_metrics"].values()]
    replies = [b for e in fed.history for b in e["bytes_received"].values()]
    return {
        "sites": sites,
        "rounds": rounds,
        "embedding_pass": embedding,
        "round_wall_seconds": walls,
        "first_round_seconds": walls[0],
        "median_round_seconds": statistics.median(walls),
        "median_later_round_seconds": statistics.median(walls[1:]) if rounds > 1 else None,
        "run_seconds": round(time.perf_counter() - started, 1),
        "train_examples_per_site_min": min(examples),
        "reply_mib_per_site": round(statistics.median(replies) / 2**20, 3),
        # The sites took every embedding from the shared cache: no shard was added during the run.
        "cache_shards_after_run": _shards(Path(embedding["cache_dir"])),
        "memory": sampler.peak(),
    }


def growth(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How peak memory grows from the smallest to the largest federation (PSS)."""
    low, high = points[0], points[-1]
    sites_ratio = high["sites"] / low["sites"]
    pss_ratio = high["memory"]["peak_pss_gib"] / low["memory"]["peak_pss_gib"]
    per_site = (high["memory"]["peak_pss_gib"] - low["memory"]["peak_pss_gib"]) * 1024
    per_site /= high["sites"] - low["sites"]
    return {
        "sites_ratio": round(sites_ratio, 2),
        "peak_pss_ratio": round(pss_ratio, 3),
        "peak_rss_ratio": round(high["memory"]["peak_rss_gib"] / low["memory"]["peak_rss_gib"], 3),
        "marginal_pss_mib_per_site": round(per_site, 2),
        "pss_mib_growth_by_process": {
            label: round(mib - low["memory"]["pss_mib_by_process_at_peak"].get(label, 0.0), 1)
            for label, mib in high["memory"]["pss_mib_by_process_at_peak"].items()
        },
        "sublinear": pss_ratio < sites_ratio,
    }


def run_benchmark(
    *,
    out_dir: Path,
    work_dir: Path,
    site_counts: Sequence[int],
    rounds: int,
    run_config: Mapping[str, Any],
    timeout: float = 3600.0,
    name: str = "bench_scale",
) -> dict[str, Any]:
    """Measure every site count in turn (smallest first); write JSON + markdown after each one."""
    config = {"eval-every": 0, **PACKAGED, **run_config}
    result: dict[str, Any] = {
        "benchmark": "simulated sites on Flower's simulation engine",
        "machine": {
            **machine_info(),
            "memory_total_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1
            ),
        },
        "rounds": rounds,
        "cpus_per_site": 1,
        "run_config": config,
        "memory_target_gib": MEMORY_TARGET_GIB,
        "points": [],
    }
    for sites in sorted(site_counts):
        point = measure_sites(
            sites, work_dir=work_dir, rounds=rounds, run_config=config, timeout=timeout
        )
        point["load_average_after"] = load_average()
        result["points"].append(point)
        points = result["points"]
        result["largest_under_target"] = all(
            p["memory"]["peak_pss_gib"] < MEMORY_TARGET_GIB for p in points
        )
        result["growth"] = growth(points) if len(points) > 1 else None
        write_results(out_dir, name, result, render_markdown(result))
    return result


def render_markdown(result: Mapping[str, Any]) -> str:
    """The result as a Markdown page."""
    lines = [
        f"# Scale: simulated sites on Flower's simulation engine ({result['rounds']} rounds, "
        f"{result['machine']['cpus']} cores, 1 CPU per virtual site)",
        "",
        "| sites | train examples per site (min) | embedding pass s (once, shared cache) | round 1 s | "
        "later rounds s (median) | whole run s | peak PSS GiB | peak RSS GiB | processes | load avg after |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in result["points"]:
        later = p["median_later_round_seconds"]
        lines.append(
            f"| {p['sites']} | {p['train_examples_per_site_min']} | {p['embedding_pass']['seconds']:.0f} "
            f"({p['embedding_pass']['inputs_encoded']} inputs) | {p['first_round_seconds']:.1f} | "
            f"{'-' if later is None else format(later, '.1f')} | {p['run_seconds']:.0f} | "
            f"{p['memory']['peak_pss_gib']:.2f} | {p['memory']['peak_rss_gib']:.2f} | "
            f"{p['memory']['max_processes']} | {p['load_average_after'][0]:.1f} |"
        )
    lines.append("")
    growth_row = result.get("growth")
    if growth_row:
        lines += [
            f"- memory growth from {result['points'][0]['sites']} to {result['points'][-1]['sites']} sites "
            f"({growth_row['sites_ratio']:.0f}x the sites): peak PSS x{growth_row['peak_pss_ratio']:.2f}, "
            f"peak RSS x{growth_row['peak_rss_ratio']:.2f}; "
            f"{growth_row['marginal_pss_mib_per_site']:.1f} MiB PSS per extra site: "
            f"**{'sublinear' if growth_row['sublinear'] else 'NOT sublinear'}**",
            "- where the extra memory is (PSS at the peak, largest minus smallest federation, MiB): "
            + ", ".join(
                f"{label} {mib:+,.0f}"
                for label, mib in sorted(
                    growth_row["pss_mib_growth_by_process"].items(), key=lambda kv: -abs(kv[1])
                )[:4]
            ),
        ]
        reply = result["points"][-1].get("reply_mib_per_site")
        if reply is not None:
            lines.append(
                f"- for scale: each site's train reply (the head) is {reply:.2f} MiB, and the "
                "ServerApp holds one per site until FedAvg aggregates the round"
            )
    largest = result["points"][-1]
    lines += [
        f"- peak memory under {result['memory_target_gib']:.0f} GiB at every size: "
        f"**{'yes' if result['largest_under_target'] else 'NO'}**",
        "",
        f"PSS by process at the peak ({largest['sites']} sites, MiB):",
        "",
        *[
            f"- {label}: {mib:,.0f}"
            for label, mib in sorted(
                largest["memory"]["pss_mib_by_process_at_peak"].items(), key=lambda kv: -kv[1]
            )
        ],
        "",
        "- memory: the SuperLink and all its descendants (SuperExec, flwr-simulation with the ServerApp "
        f"and Ray, Ray's actors running the ClientApps), sampled every {largest['memory']['interval_seconds']} s "
        "from /proc/<pid>/smaps_rollup; PSS counts shared pages (libraries, memory-mapped embeddings) once, "
        "RSS in every process that maps them",
        "- round 1 includes each site's first data load (its partition of the pooled dataset, found in the "
        "shared embedding cache, written to its site bundle); the last round includes the final "
        "federated evaluation; the embedding pass (encoders' forward passes) ran once before the run",
        "- the whole run includes Flower's FAB build, Ray's start and the final head export",
        f"- run-config: {result['run_config']}",
        f"- machine: {result['machine']} (shared with other sessions: see the load averages)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--sites", default="10,50,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=1500, help="examples in the pooled dataset")
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_benchmark(
        out_dir=args.out,
        work_dir=args.work,
        site_counts=[int(s) for s in args.sites.split(",")],
        rounds=args.rounds,
        run_config={"dataset-n": args.n, "local-epochs": args.local_epochs},
    )
    print(render_markdown(result))


if __name__ == "__main__":
    main()
