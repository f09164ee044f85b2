"""Partitions with flwr-datasets' partitioners, imported without its plotting helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common.config import DataSpec
from common.data.partition import partition_indices
from common.pipeline import load_pooled_dataset

REPO = Path(__file__).resolve().parents[2]
SCHEMES = ("iid", "dirichlet", "quantity")

_PROBE = """
import json, sys
from common.config import DataSpec
from common.data.partition import partition_indices
from common.pipeline import load_pooled_dataset
pool = load_pooled_dataset(DataSpec(n=60))
parts = {s: [partition_indices(pool, scheme=s, num_partitions=3, partition_id=k, seed=1).tolist()
             for k in range(3)] for s in %r}
plotting = sorted(m for m in ("seaborn", "matplotlib.pyplot", "scipy.stats") if m in sys.modules)
import flwr_datasets.visualization as v  # the real subpackage still loads afterwards
print(json.dumps({"parts": parts, "plotting": plotting, "real": hasattr(v, "plot_label_distributions")}))
"""


def test_a_fresh_site_process_partitions_without_loading_the_plotting_helpers() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE % (SCHEMES,)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["plotting"] == [] and probe["real"] is True
    # the same rows as flwr-datasets imported the usual way (this process imports all of it)
    import flwr_datasets.visualization  # noqa: F401

    pool = load_pooled_dataset(DataSpec(n=60))
    for scheme in SCHEMES:
        parts = [
            partition_indices(pool, scheme=scheme, num_partitions=3, partition_id=k, seed=1)
            for k in range(3)
        ]
        assert [p.tolist() for p in parts] == probe["parts"][scheme]
        assert sorted(i for p in parts for i in p.tolist()) == list(range(len(pool)))
