"""The scale benchmark: its process-tree memory sampler on known allocations, and a tiny real simulation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.config import DataSpec
from common.pipeline import load_pooled_dataset, load_site_dataset
from simulations.benchmarks.scale import TreeSampler, run_benchmark
from tests.tiny_config import tiny_run_config

MIB = 2**20


def test_sampler_counts_a_shared_mapping_once_in_pss(tmp_path: Path) -> None:
    """Parent and child both map and touch the same 64 MiB file and each allocate 32 MiB privately."""
    shared = tmp_path / "shared.bin"
    shared.write_bytes(b"\1" * (64 * MIB))
    script = tmp_path / "memprobe.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import mmap, os, sys, time
            if len(sys.argv) == 1:  # the child first: a fork after the allocations would share
                # them until its exec, and a sampler catching that moment counts them twice
                os.spawnv(os.P_NOWAIT, sys.executable, [sys.executable, __file__, "child"])
            with open({str(shared)!r}, "rb") as handle:
                view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            total = sum(view[i] for i in range(0, len(view), 4096))  # touch every page
            private = bytearray(b"x" * (32 * 2**20))
            open({str(tmp_path)!r} + f"/ready-{{os.getpid()}}", "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists({str(tmp_path / "stop")!r}) and time.monotonic() < deadline:
                time.sleep(0.1)
            """
        )
    )
    probe = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60  # both processes allocated, however loaded the machine
        while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        sampler = TreeSampler("memprobe.py", interval=0.2).start()
        time.sleep(1.5)
        sampler.stop()
    finally:
        (tmp_path / "stop").touch()
        probe.wait(timeout=30)
    peak = sampler.peak()
    assert peak["max_processes"] == 2
    rss, pss = peak["peak_rss_gib"] * 1024, peak["peak_pss_gib"] * 1024  # MiB
    # RSS counts the shared file in both processes (2 x 64 + 2 x 32 MiB + interpreters),
    # PSS once (64 + 2 x 32 MiB + interpreters): the difference is one copy of the file.
    assert rss >= 192
    assert 48 <= rss - pss <= 80
    assert set(peak["pss_mib_by_process_at_peak"]) == {"memprobe.py"}


def test_virtual_sites_of_one_process_share_one_pool() -> None:
    """Sites simulated in one process partition one pooled dataset, generated once, not per site."""
    specs = [DataSpec(n=60, partition="iid", num_partitions=4, partition_id=k) for k in range(4)]
    pool = load_pooled_dataset(specs[0])
    assert all(load_pooled_dataset(spec) is pool for spec in specs)
    ids = [load_site_dataset(spec).ids for spec in specs]
    assert sorted(i for part in ids for i in part) == sorted(pool.ids)  # disjoint, complete
    # another federation (here: 5 sites) gets its own pool, of 5 site profiles
    other = load_pooled_dataset(DataSpec(n=60, partition="iid", num_partitions=5, partition_id=0))
    assert other is not pool and len(set(other.sites or [])) == 5
    assert load_pooled_dataset(DataSpec(n=60)) is not load_pooled_dataset(DataSpec(n=60))


@pytest.mark.slow
def test_bench_scale_tiny_simulation(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    out = tmp_path / "results"
    result = run_benchmark(
        out_dir=out,
        work_dir=tmp_path / "work",
        site_counts=[3],
        rounds=2,
        run_config=tiny_run_config(tiny_model_dirs, **{"dataset-n": 45, "local-epochs": 1}),
        timeout=300,
    )
    written = json.loads((out / "bench_scale.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert {"cpus", "load_average_1_5_15_min", "python"} <= set(written["machine"])
    (point,) = written["points"]
    assert point["sites"] == 3 and len(point["round_wall_seconds"]) == 2
    assert all(s > 0 for s in point["round_wall_seconds"])
    assert point["train_examples_per_site_min"] >= 10
    embedding = point["embedding_pass"]
    assert embedding["examples"] == 45 and embedding["inputs_encoded"] > 45
    # every site found its embeddings in the shared cache: the run added no shard
    assert point["cache_shards_after_run"] == embedding["cache_shards"] > 0
    memory = point["memory"]
    assert memory["samples"] >= 5
    assert 0 < memory["peak_pss_gib"] <= memory["peak_rss_gib"] < 8
    labels = set(memory["pss_mib_by_process_at_peak"])
    assert {"flower-superlink", "flwr-simulation"} <= labels, labels
    assert any(label.startswith("ray::") for label in labels), labels
    assert written["largest_under_target"] is True and written["growth"] is None
    assert "| 3 |" in (out / "bench_scale.md").read_text()
