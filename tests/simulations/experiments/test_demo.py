"""The demo's test set: new rows of each hospital's scanner, in no site's data, scoring every arm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import RunSettings
from simulations.experiments import demo
from simulations.experiments.arms import prepare_sites
from simulations.experiments.comparison import compare
from tests.tiny_config import tiny_run_config

SITES = 2


def test_the_demo_scores_every_arm_on_new_rows_of_each_hospitals_scanner(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "TEST_PER_SITE", 7)
    run = RunSettings.from_run_config(
        tiny_run_config(
            tiny_model_dirs,
            partition="site",
            **{"test-rows": "exclude", "min-sites": SITES, "num-server-rounds": 1},
        )
    )
    test = demo.scored_set(run, SITES, cache_dir=tmp_path / "cache")
    assert test.per_site is not None and [len(p) for p in test.per_site] == [7, 7]
    for k, rows in enumerate(test.per_site):  # hospital k's rows come from scanner k
        assert all(i.startswith(f"test-s{k}-") for i in rows.ids)
    sites = prepare_sites(run, SITES, cache_dir=tmp_path / "cache")
    assert test.data.image is not None
    for site in sites:  # another draw of the generator: no test row is a site's row
        for part in (site.train, site.test):
            assert part.image is not None
            same = np.isclose(test.data.image[:, None, :], part.image[None, :, :]).all(axis=2)
            assert not same.any()
    result = compare(
        run=run, sites=SITES, out_dir=tmp_path / "out", federated=False, common_test=test
    )
    assert result.sizes["scored"] == {"test": 2 * 7}
    for k, site in enumerate(sites):  # each site's whole held-out split picks the stopping point
        assert result.sizes[f"site {k}"]["validation"] == len(site.test)
