"""The closed-form start diagnostic's federated ridge (server/closed_form.py's solver on the sums the
sites' queries return): per-site sums only, the pooled ridge map at the end."""

from __future__ import annotations

import numpy as np
import pytest

from common.embedding import EmbeddedDataset
from common.metrics import linear_alignment
from simulations.experiments.closed_form_start import federated_ridge, map_scores


def _site(rng: np.random.Generator, n: int, shift: float) -> EmbeddedDataset:
    image = rng.normal(size=(n, 12)) + shift  # each site its own offset (a scanner)
    text = image @ np.random.default_rng(7).normal(size=(12, 6)) + 0.3 * rng.normal(size=(n, 6))
    return EmbeddedDataset(
        ids=[f"{shift}-{i}" for i in range(n)],
        image=image.astype(np.float32),
        text=text.astype(np.float32),
    )


@pytest.mark.parametrize("ridge", [0.3, 1.0])
def test_federated_ridge_reaches_the_pooled_ridge_map_from_per_site_sums(ridge: float) -> None:
    """The sites' unequal sizes and offsets do not matter: the CG iterate equals the map fitted on
    the pooled rows (common.metrics.linear_alignment, same relative ridge), with its means."""
    rng = np.random.default_rng(1)
    sites = [_site(rng, n, shift) for n, shift in ((30, 0.0), (55, 2.0), (20, -1.5))]
    iterates, mean_x, mean_y = federated_ridge(sites, ridge=ridge, rounds=14)
    image = np.concatenate([s.image for s in sites])
    text = np.concatenate([s.text for s in sites])
    pooled = linear_alignment(image, text, method="lstsq", ridge=ridge)
    np.testing.assert_allclose(mean_x, pooled.mean_a, atol=1e-5)
    np.testing.assert_allclose(mean_y, pooled.mean_b, atol=1e-5)
    np.testing.assert_allclose(iterates[-1], pooled.proj_a, rtol=1e-4, atol=1e-6)
    # and it scores as the pooled map does (the same projections)
    pooled_rows = EmbeddedDataset(ids=[str(i) for i in range(len(image))], image=image, text=text)
    ours = map_scores(iterates[-1], -mean_x @ iterates[-1], -mean_y, pooled_rows)
    theirs = map_scores(pooled.proj_a, -pooled.mean_a @ pooled.proj_a, -pooled.mean_b, pooled_rows)
    assert ours == pytest.approx(theirs)
