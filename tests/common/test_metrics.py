"""Tests for common.metrics: retrieval, chance, zero-shot, probes, classifiers, alignment, tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

import common.metrics.retrieval as retrieval
from common.errors import DataError
from common.metrics import (
    CLASSIFIERS,
    MetricInputError,
    chance_recall_at_k,
    classifier_suite,
    cross_modal_retrieval,
    format_table,
    linear_alignment,
    linear_probe,
    recall_at_k,
    select_ridge,
    zero_shot,
)
from common.metrics.zeroshot import auroc


def _blobs(
    rng: np.random.Generator, n: int, d: int, n_classes: int, *, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.normal(size=(n_classes, d)) * spread
    labels = np.arange(n) % n_classes
    return centers[labels] + rng.normal(size=(n, d)), labels


def _brute_recall(query: np.ndarray, gallery: np.ndarray, k: int) -> float:
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q @ g.T
    rank = (scores > np.diag(scores)[:, None]).sum(axis=1)
    return float(np.mean(rank < k))


# ----------------------------------------------------------------------------- recall@k


def test_recall_identity_gallery_is_perfect() -> None:
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert recall_at_k(x, x.copy()) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_recall_swapped_pairs_hand_example() -> None:
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    gallery = np.array([[0.0, 2.0], [3.0, 0.0]])  # scale must not matter (cosine)
    assert recall_at_k(query, gallery, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_recall_matches_brute_force_ranks_without_ties() -> None:
    rng = np.random.default_rng(1)
    query = rng.normal(size=(200, 16))
    gallery = query + rng.normal(size=(200, 16)) * 1.5
    result = recall_at_k(query, gallery, ks=(1, 3, 10))
    for k in (1, 3, 10):
        assert result[f"R@{k}"] == pytest.approx(_brute_recall(query, gallery, k))
    assert 0.0 < result["R@1"] < result["R@3"] < result["R@10"] < 1.0


def test_recall_ties_are_broken_at_random_in_expectation() -> None:
    # Cyclic shift of one-hot vectors: every query's correct item scores 0, one wrong item scores
    # 1 and the other 3 wrong items tie with the correct one at 0: R@k = (k - 1) / 4.
    eye = np.eye(5)
    gallery = eye[np.roll(np.arange(5), 1)]
    result = recall_at_k(eye, gallery, ks=(1, 2, 3, 5))
    assert result == pytest.approx({"R@1": 0.0, "R@2": 0.25, "R@3": 0.5, "R@5": 1.0})


def test_recall_groups_count_duplicates_as_correct() -> None:
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(6, 4))
    gallery[1] = gallery[0]  # items 0 and 1 are identical texts
    query = gallery + 1e-9  # near-identical scores still tie (TIE_TOLERANCE)
    plain = recall_at_k(query, gallery, ks=(1, 2))
    assert plain["R@1"] == pytest.approx(5 / 6)  # queries 0 and 1 each hit with p = 1/2
    assert plain["R@2"] == 1.0
    grouped = recall_at_k(query, gallery, ks=(1,), groups=np.array([7, 7, 1, 2, 3, 4]))
    assert grouped == {"R@1": 1.0}


def test_collapsed_embeddings_score_chance_not_perfect() -> None:
    groups = np.array([0, 0, 1, 1, 1, 2, 3, 4, 5, 5])
    same = np.ones((10, 3))
    for grouping in (None, groups):
        result = recall_at_k(same, same, ks=(1, 4), groups=grouping)
        assert result == pytest.approx(chance_recall_at_k(10, ks=(1, 4), groups=grouping))
    assert recall_at_k(same, same, ks=(1,))["R@1"] == pytest.approx(0.1)


def test_recall_large_n_uses_chunks_consistently(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    query = rng.normal(size=(700, 4))
    gallery = query + rng.normal(size=(700, 4))
    full = recall_at_k(query, gallery)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 700 * 64)  # 64-row chunks, last one partial
    assert recall_at_k(query, gallery) == pytest.approx(full)


# ----------------------------------------------------------------------------- chance


def test_chance_without_groups_is_k_over_n() -> None:
    assert chance_recall_at_k(20, ks=(1, 5, 30)) == pytest.approx(
        {"R@1": 0.05, "R@5": 0.25, "R@30": 1.0}
    )


def test_chance_with_groups_matches_monte_carlo() -> None:
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])
    n, ks, trials = groups.size, (1, 3, 5), 4000
    rng = np.random.default_rng(4)
    order = np.argsort(rng.random((trials, n, n)), axis=2)  # a random ranking per query
    same = groups[order] == groups[None, :, None]  # [trial, query, position]
    exact = chance_recall_at_k(n, ks=ks, groups=groups)
    for k in ks:
        simulated = same[:, :, :k].any(axis=2).mean()
        assert exact[f"R@{k}"] == pytest.approx(simulated, abs=0.015)
    # hand value for k=1: mean group fraction = sum(size^2) / n^2
    assert exact["R@1"] == pytest.approx((9 + 4 + 1 + 16 + 1 + 1) / 144)


# ----------------------------------------------------------------------------- cross-modal


def test_cross_modal_keys_and_groups_apply_both_ways() -> None:
    rng = np.random.default_rng(5)
    image = rng.normal(size=(8, 5))
    image[3] = image[2] + rng.normal(size=5) * 0.01  # two similar images ...
    text = image + rng.normal(size=(8, 5)) * 0.01
    text[3] = text[2]  # ... with the same report
    result = cross_modal_retrieval(image, text, ks=(1,))
    assert set(result) == {"i2t_R@1", "t2i_R@1", "mean_R@1"}
    assert result["i2t_R@1"] == pytest.approx(7 / 8)  # images 2, 3 hit the twin texts with p = 1/2
    assert result["t2i_R@1"] == pytest.approx(7 / 8)  # texts 2, 3 retrieve the same image
    grouped = cross_modal_retrieval(
        image, text, ks=(1,), groups_text=np.array([0, 1, 2, 2, 3, 4, 5, 6])
    )
    assert grouped["i2t_R@1"] == 1.0
    assert grouped["t2i_R@1"] == 1.0
    assert grouped["mean_R@1"] == 1.0


def test_cross_modal_mean_is_average_of_directions() -> None:
    rng = np.random.default_rng(6)
    image, text = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    result = cross_modal_retrieval(image, text)
    for k in (1, 5, 10):
        assert result[f"mean_R@{k}"] == pytest.approx(
            (result[f"i2t_R@{k}"] + result[f"t2i_R@{k}"]) / 2
        )
    assert result["i2t_R@5"] == pytest.approx(_brute_recall(image, text, 5))
    assert result["t2i_R@5"] == pytest.approx(_brute_recall(text, image, 5))


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_separable_is_perfect() -> None:
    rng = np.random.default_rng(7)
    prompts = np.eye(4, 16) * 5.0
    labels = rng.integers(0, 4, size=200)
    images = prompts[labels] + rng.normal(size=(200, 16)) * 0.1
    assert zero_shot(images, prompts, labels) == {"zs_acc": 1.0, "zs_auroc": 1.0}


def test_zero_shot_random_is_near_chance() -> None:
    rng = np.random.default_rng(8)
    result = zero_shot(
        rng.normal(size=(3000, 32)), rng.normal(size=(4, 32)), rng.integers(0, 4, size=3000)
    )
    assert result["zs_acc"] == pytest.approx(0.25, abs=0.04)
    assert result["zs_auroc"] == pytest.approx(0.5, abs=0.04)


def test_zero_shot_skips_absent_classes_and_single_class_is_nan() -> None:
    prompts = np.eye(3)
    images = np.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.9, 0.0, 0.5]])
    result = zero_shot(images, prompts, np.array([0, 1, 0]))  # class 2 absent
    assert result == {"zs_acc": 1.0, "zs_auroc": 1.0}
    single = zero_shot(images, prompts, np.array([0, 0, 0]))
    assert single["zs_acc"] == pytest.approx(2 / 3)
    assert math.isnan(single["zs_auroc"])


@pytest.mark.parametrize("tied", [False, True])
def test_auroc_is_scikit_learns_roc_auc_with_ties_counted_half(tied: bool) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11 + tied)
    for _ in range(200):
        n = int(rng.integers(2, 80))
        positive = rng.random(n) < rng.uniform(0.1, 0.9)
        if positive.all() or not positive.any():
            continue
        scores = rng.integers(0, 4, n).astype(float) if tied else rng.normal(size=n)
        assert auroc(positive, scores) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert auroc(np.array([True, False, True]), np.array([0.5, 0.5, 0.5])) == 0.5
    with pytest.raises(MetricInputError, match="both positive and negative"):
        auroc(np.array([True, True]), np.array([0.1, 0.2]))


def test_zero_shot_rejects_bad_labels() -> None:
    with pytest.raises(MetricInputError, match="labels: contains class 3"):
        zero_shot(np.ones((2, 3)), np.eye(3), np.array([0, 3]))
    with pytest.raises(MetricInputError, match="labels: contains negative label -1"):
        zero_shot(np.ones((2, 3)), np.eye(3), np.array([0, -1]))
    with pytest.raises(MetricInputError, match=r"labels: expected shape \(2,\)"):
        zero_shot(np.ones((2, 3)), np.eye(3), np.array([0, 1, 2]))
    with pytest.raises(MetricInputError, match="prompt_z: has 4 columns"):
        zero_shot(np.ones((2, 3)), np.eye(4), np.array([0, 1]))


# ----------------------------------------------------------------------------- probes


def test_linear_probe_separable_vs_random() -> None:
    rng = np.random.default_rng(9)
    x, y = _blobs(rng, 600, 24, 3, spread=4.0)
    good = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert good["probe_f1_macro"] > 0.97 and good["probe_acc"] > 0.97
    noise = rng.normal(size=(600, 24))
    bad = linear_probe(noise[:400], y[:400], noise[400:], y[400:])
    assert bad["probe_f1_macro"] < 0.5
    assert good["probe_C"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def test_linear_probe_deterministic_and_handles_a_singleton_class() -> None:
    rng = np.random.default_rng(10)
    x, y = _blobs(rng, 60, 8, 2, spread=3.0)
    y = y.copy()
    y[0] = 2  # a class with one training example: no CV possible, C stays 1.0
    first = linear_probe(x[:40], y[:40], x[40:], y[40:], seed=3)
    assert first == linear_probe(x[:40], y[:40], x[40:], y[40:], seed=3)
    assert first["probe_C"] == 1.0


def test_classifier_suite_separable_vs_random_and_deterministic() -> None:
    rng = np.random.default_rng(11)
    x, y = _blobs(rng, 450, 20, 3, spread=3.0)
    good = classifier_suite(x[:300], y[:300], x[300:], y[300:], seed=1)
    assert list(good) == list(CLASSIFIERS)
    for name, score in good.items():
        assert score > 0.9, name
    assert good == classifier_suite(x[:300], y[:300], x[300:], y[300:], seed=1)
    noise = rng.normal(size=(450, 20))
    bad = classifier_suite(noise[:300], y[:300], noise[300:], y[300:], seed=1)
    for name, score in bad.items():
        assert score < 0.55, name


def test_classifier_suite_subset_binary_and_tiny_data() -> None:
    rng = np.random.default_rng(12)
    x, y = _blobs(rng, 14, 6, 2, spread=6.0)
    result = classifier_suite(x[:8], y[:8], x[8:], y[8:], classifiers=["mlp", "knn"])
    assert list(result) == ["mlp", "knn"]
    assert all(0.0 <= value <= 1.0 for value in result.values())
    with pytest.raises(MetricInputError, match="classifiers: unknown"):
        classifier_suite(x[:8], y[:8], x[8:], y[8:], classifiers=["svm"])
    with pytest.raises(MetricInputError, match="train_y: needs at least 2 classes"):
        classifier_suite(x[:8], np.zeros(8, dtype=int), x[8:], y[8:])


# ----------------------------------------------------------------------------- alignment


def test_lstsq_alignment_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(13)
    a = rng.normal(size=(500, 20))
    b = a @ rng.normal(size=(20, 16)) + 3.0
    fit = linear_alignment(a[:400], b[:400])
    assert fit.method == "lstsq" and fit.dim == 16 and fit.correlations is None
    mapped_a, mapped_b = fit.transform_a(a[400:]), fit.transform_b(b[400:])
    assert np.abs(mapped_a - mapped_b).max() < 0.05 * np.abs(mapped_b).max()
    assert cross_modal_retrieval(mapped_a, mapped_b, ks=(1,))["mean_R@1"] == 1.0
    assert recall_at_k(a[400:, :16], b[400:], ks=(1,))["R@1"] < 0.2  # unaligned


def test_the_ridge_is_relative_to_the_mean_variance_as_documented() -> None:
    rng = np.random.default_rng(16)
    a = rng.normal(size=(30, 50)) * 3.0  # fewer rows than columns: singular without the ridge
    b = rng.normal(size=(30, 4))
    a_c, b_c = a - a.mean(axis=0), b - b.mean(axis=0)
    cov = a_c.T @ a_c / 29
    for ridge in (1e-3, 1.0):
        penalised = cov + ridge * np.trace(cov) / 50 * np.eye(50)
        expected = np.linalg.solve(penalised, a_c.T @ b_c / 29)
        assert linear_alignment(a, b, ridge=ridge).proj_a == pytest.approx(expected, abs=1e-8)


def test_cca_finds_the_correlated_directions() -> None:
    rng = np.random.default_rng(14)
    n = 2000
    shared = rng.normal(size=(n, 2))
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    a = np.hstack([shared, rng.normal(size=(n, 6))]) @ rotation
    b = np.hstack([shared + 0.05 * rng.normal(size=(n, 2)), rng.normal(size=(n, 4))])
    b = b @ rng.normal(size=(6, 10))  # rank 6 in 10-d: b's covariance is singular
    fit = linear_alignment(a, b, method="cca", dim=3)
    assert fit.dim == 3 and fit.correlations is not None
    assert np.all(fit.correlations[:2] > 0.99)
    assert fit.correlations[2] < 0.15
    za, zb = fit.transform_a(a), fit.transform_b(b)
    for component in range(2):
        assert np.corrcoef(za[:, component], zb[:, component])[0, 1] > 0.99
    assert np.cov(za.T) == pytest.approx(np.eye(3), abs=0.02)  # whitened


def test_cca_retrieval_on_noiseless_pairs_is_perfect() -> None:
    rng = np.random.default_rng(15)
    a = rng.normal(size=(300, 12))
    b = a @ rng.normal(size=(12, 12)) - 1.0
    fit = linear_alignment(a[:200], b[:200], method="cca")
    assert fit.dim == 12
    result = cross_modal_retrieval(fit.transform_a(a[200:]), fit.transform_b(b[200:]), ks=(1,))
    assert result["mean_R@1"] == 1.0


def test_select_ridge_regularises_a_noisy_wide_map_and_not_a_clean_one() -> None:
    rng = np.random.default_rng(17)
    # Few noisy pairs in many dimensions: least squares overfits unless it is regularised.
    n, d = 400, 120
    latent = rng.normal(size=(n, 8))
    a = latent @ rng.normal(size=(8, d)) + 4.0 * rng.normal(size=(n, d))
    b = latent @ rng.normal(size=(8, 16)) + 1.0 * rng.normal(size=(n, 16))
    train, test = slice(0, 160), slice(160, n)
    chosen = select_ridge(a[train], b[train])
    assert chosen >= 0.3

    def test_recall(ridge: float) -> float:
        fit = linear_alignment(a[train], b[train], ridge=ridge)
        mapped = (fit.transform_a(a[test]), fit.transform_b(b[test]))
        return cross_modal_retrieval(*mapped, ks=(5,))["mean_R@5"]

    assert test_recall(chosen) > test_recall(1e-3) + 0.2  # held-out folds, then unseen pairs
    # Clean pairs, many more rows than dimensions: the least regularisation wins.
    clean_a = rng.normal(size=(300, 10))
    clean_b = clean_a @ rng.normal(size=(10, 10))
    assert select_ridge(clean_a, clean_b) == 1e-3
    with pytest.raises(MetricInputError, match="folds >= 2"):
        select_ridge(clean_a, clean_b, folds=1)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(MetricInputError, match="ridge: expected a finite number > 0"):
            select_ridge(clean_a, clean_b, ridges=(1.0, bad))


def test_alignment_rejects_bad_options() -> None:
    a = np.random.default_rng(16).normal(size=(10, 3))
    with pytest.raises(MetricInputError, match="dim: only used with method='cca'"):
        linear_alignment(a, a, dim=2)
    with pytest.raises(MetricInputError, match=r"dim: expected an int in \[1, 3\]"):
        linear_alignment(a, a, method="cca", dim=4)
    with pytest.raises(MetricInputError, match="method: expected 'lstsq' or 'cca'"):
        linear_alignment(a, a, method="pca")
    with pytest.raises(MetricInputError, match="train_b: has 9 rows but train_a has 10"):
        linear_alignment(a, a[:9])
    with pytest.raises(MetricInputError, match="train_a: has zero variance"):
        linear_alignment(np.ones((10, 3)), a)
    with pytest.raises(MetricInputError, match="x: has 2 columns, the alignment expects 3"):
        linear_alignment(a, a).transform_a(a[:, :2])


# ----------------------------------------------------------------------------- invalid inputs


def test_nan_and_inf_inputs_name_the_argument() -> None:
    x = np.random.default_rng(17).normal(size=(6, 3))
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(
        MetricInputError, match=r"query: contains 1 NaN/inf value\(s\) \(first in row 4\)"
    ):
        recall_at_k(bad, x)
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="gallery: contains 1 NaN/inf"):
        recall_at_k(x, bad)
    with pytest.raises(DataError, match="text_z: contains"):
        cross_modal_retrieval(x, bad)
    with pytest.raises(MetricInputError, match="train_x: contains"):
        linear_probe(bad, np.arange(6) % 2, x, np.arange(6) % 2)
    with pytest.raises(MetricInputError, match="test_x: contains"):
        classifier_suite(x, np.arange(6) % 2, bad, np.arange(6) % 2, classifiers=["knn"])
    with pytest.raises(MetricInputError, match="train_a: contains"):
        linear_alignment(bad, x)


def test_shape_and_option_errors() -> None:
    x = np.ones((4, 3))
    with pytest.raises(MetricInputError, match="gallery: has 3 rows but query has 4"):
        recall_at_k(x, x[:3])
    with pytest.raises(MetricInputError, match=r"query: expected a 2-D array"):
        recall_at_k(x[0], x)
    with pytest.raises(MetricInputError, match="ks: every k must be >= 1"):
        recall_at_k(x, x, ks=(0, 1))
    with pytest.raises(MetricInputError, match=r"groups: expected shape \(4,\)"):
        recall_at_k(x, x, groups=np.zeros(3, dtype=int))
    with pytest.raises(MetricInputError, match="groups: expected integer ids"):
        recall_at_k(x, x, groups=np.array([0.5, 1, 2, 3]))
    with pytest.raises(MetricInputError, match="n: expected a positive int"):
        chance_recall_at_k(0)


# ----------------------------------------------------------------------------- tables


def test_format_table_markdown() -> None:
    rows = [{"model": "frozen", "R@1": 0.5, "n": 10}, {"model": "a|b", "R@1": float("nan")}]
    expected = "\n".join(
        [
            "| model  |    R@1 |   n |",
            "| ------ | -----: | --: |",
            "| frozen | 0.5000 |  10 |",
            "| a\\|b   |    nan |     |",
        ]
    )
    assert format_table(rows, ["model", "R@1", "n"]) == expected
    assert (
        format_table([{"x": np.float32(0.25)}], ["x"], digits=2) == "|    x |\n| ---: |\n| 0.25 |"
    )
    with pytest.raises(MetricInputError, match="columns: expected at least one"):
        format_table(rows, [])


@pytest.mark.parametrize("seed", range(6))
def test_bootstrap_metrics_equal_the_plain_metrics_on_the_rows_a_replicate_resamples(
    seed: int,
) -> None:
    """At unit weights the weighted metrics are scikit-learn's macro-F1 and ``auroc``; under a
    replicate's multinomial counts they equal the same metric on the rows repeated that often."""
    from sklearn.metrics import f1_score

    from common.metrics.bootstrap import (
        bootstrap_weights,
        weighted_auroc,
        weighted_macro_f1,
        weighted_mean,
    )

    rng = np.random.default_rng(seed)
    n = 40
    y, predicted = rng.integers(0, 4, n), rng.integers(0, 4, n)
    scores = np.round(rng.normal(size=n), 1)  # ties
    weights = np.vstack([np.ones(n), bootstrap_weights(n, 25, seed=seed)])
    assert weights[1:].sum(axis=1) == pytest.approx(np.full(25, n))
    f1 = weighted_macro_f1(y, predicted, weights)
    positive = y == 1
    auc = weighted_auroc(positive, scores, weights)
    mean = weighted_mean(scores, weights)
    assert f1[0] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    assert auc[0] == pytest.approx(auroc(positive, scores))
    for b in range(1, weights.shape[0]):
        rows = np.repeat(np.arange(n), weights[b].astype(int))
        expected = f1_score(y[rows], predicted[rows], average="macro", zero_division=0)
        assert f1[b] == pytest.approx(expected)
        assert auc[b] == pytest.approx(auroc(positive[rows], scores[rows]))
        assert mean[b] == pytest.approx(scores[rows].mean())


def test_bootstrap_auroc_is_nan_for_a_replicate_without_both_labels() -> None:
    from common.metrics.bootstrap import weighted_auroc

    weights = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    auc = weighted_auroc(np.array([True, False, False]), np.array([0.9, 0.1, 0.5]), weights)
    assert auc[0] == 1.0 and math.isnan(auc[1])


def test_cross_modal_hits_average_to_the_retrieval_recall() -> None:
    from common.metrics.retrieval import cross_modal_hits

    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    groups = np.arange(30) // 2  # duplicate reports
    i2t, t2i = cross_modal_hits(image, text, k=5, groups_text=groups)
    result = cross_modal_retrieval(image, text, groups_text=groups, ks=(5,))
    assert i2t.shape == t2i.shape == (30,)
    assert i2t.mean() == pytest.approx(result["i2t_R@5"])
    assert t2i.mean() == pytest.approx(result["t2i_R@5"])
