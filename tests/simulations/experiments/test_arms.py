"""The comparison's arms: the frozen row, stopping points chosen on validation, the kept checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from common.config import RunSettings
from common.errors import ConfigError
from common.training import build_run_model
from simulations.experiments.arms import (
    CommonTest,
    Selection,
    metric_row,
    round_rows,
    select_best,
    select_round,
    selection_metrics,
    split_holdout,
    train_selected,
)


def test_frozen_row_of_text_only_data_has_the_probe_and_no_retrieval() -> None:
    import numpy as np

    from common.embedding import EmbeddedDataset

    rng = np.random.default_rng(0)

    def part(n: int) -> EmbeddedDataset:
        labels = np.arange(n) % 2
        text = rng.normal(size=(n, 8)).astype(np.float32) + 3.0 * labels[:, None]
        return EmbeddedDataset(
            ids=[str(i) for i in range(n)], text=text, labels=labels, class_names=["a", "b"]
        )

    row = metric_row("frozen", None, part(60), part(30))
    assert row["probe_f1_macro"] > 0.9  # separable classes: the frozen probe finds them
    assert not any(k.startswith("mean_R@") for k in row)  # no image side: no retrieval


def _paired(n: int, seed: int) -> Any:
    """Paired image/text embeddings of 3 classes (text = a noisy linear map of image), with prompts."""
    import numpy as np

    from common.embedding import EmbeddedDataset

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.random.default_rng(99).normal(size=(3, 12))
    image = centres[labels] + rng.normal(size=(n, 12))
    text = image @ np.random.default_rng(98).normal(size=(12, 10)) + rng.normal(size=(n, 10))
    prompts = centres @ np.random.default_rng(98).normal(size=(12, 10))
    return EmbeddedDataset(
        ids=[f"{seed}-{i}" for i in range(n)],
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        labels=labels,
        class_names=["a", "b", "c"],
        prompts=prompts.astype(np.float32),
    )


def _small_run(**extra: Any) -> RunSettings:
    return RunSettings.from_run_config(
        {"head": "small", "local-epochs": 1, "batch-size": 16, "lr": 0.01, **extra}
    )


def test_select_best_is_the_earliest_validation_argmax() -> None:
    assert select_best([0.1, 0.3, 0.3, math.nan, 0.2]) == 2
    assert select_best([math.nan, 0.0]) == 2
    with pytest.raises(ConfigError, match="no validation scores"):
        select_best([])
    with pytest.raises(ConfigError, match="NaN"):
        select_best([math.nan, math.nan])


def test_train_selected_keeps_the_head_of_its_best_validation_step() -> None:
    train, val = _paired(96, 0), _paired(30, 1)
    model, selection = train_selected(_small_run(), train, val, steps=6)
    assert len(selection.scores) == 6 and selection.unit == "epoch"
    assert selection.chosen == select_best(selection.scores)
    # The returned head is the chosen step's, not the last one's: it reproduces that score.
    assert selection_metrics(model, [(train, val)])["score"] == pytest.approx(
        selection.scores[selection.chosen - 1]
    )
    assert selection.to_dict()["chosen"] == selection.chosen  # 1 local epoch per step
    # auto on labelled pairs with prompts: one run per objective, the better best step kept
    tried = selection.tried
    assert list(tried) == ["infonce+prompts", "infonce+supcon+prompts"]
    assert selection.objective == model.objective == max(tried, key=lambda name: tried[name])
    assert selection.scores[selection.chosen - 1] == max(tried.values())
    assert selection.to_dict()["objectives_tried"] == tried


def test_a_closed_form_start_is_a_candidate_like_every_trained_step() -> None:
    """The best validation score wins, the start (step 1) included; the record says how sure each
    step's difference from the start is (the share of paired bootstrap replicates it beats)."""
    import numpy as np

    from common.head_start import ValidationScores, beats_start

    rng = np.random.default_rng(0)
    base = rng.normal(0.50, 0.03, 200)

    def scores(r5: float, score: float, replicates: np.ndarray) -> ValidationScores:
        # one part's replicates are the score's (combined_score of a single part)
        return ValidationScores({"R@5": r5, "score": score}, metric_replicates={"R@5": replicates})

    start = scores(0.30, 0.50, base)
    worse = scores(0.29, 0.48, base - 0.02)
    better = scores(0.29, 0.53, base + rng.normal(0.03, 0.02, 200))
    assert beats_start(start, start) == 0.0 and beats_start(worse, start) == 0.0
    only_worse = Selection("round", [0.50, 0.48], metrics=[start, worse], closed_form_start=True)
    assert only_worse.chosen == 1 and only_worse.label == "round 1/2 (closed-form start)"
    metrics = [start, worse, better]
    selection = Selection(
        "epoch", [m["score"] for m in metrics], per_step=2, metrics=metrics, closed_form_start=True
    )
    assert selection.chosen == 3  # a lower R@5 does not bar the best score
    assert selection.label == "epoch 4/4"  # step 1 trained nothing
    record = selection.to_dict()
    assert record["closed_form_start"] and record["chosen"] == 4
    assert record["beats_start"] == [0.0, 0.0, beats_start(better, start)]
    assert 0.5 < record["beats_start"][2] < 1.0
    assert "closed_form_start" not in Selection("round", [0.1, 0.2]).to_dict()


def test_validation_scores_carry_paired_replicates_of_the_score() -> None:
    import numpy as np

    from common.head_start import SELECTION_REPLICATES, validation_scores

    train, val = _paired(120, 0), _paired(45, 1)
    model = build_run_model(_small_run(), dims=train.dims, num_classes=train.num_classes)
    assert validation_scores(model, train, val).replicates is None  # training draws none
    first, again = (
        validation_scores(model, train, val, replicates=SELECTION_REPLICATES) for _ in range(2)
    )
    assert set(first.metric_replicates) == set(first) - {"score"}
    assert first.replicates is not None and first.replicates.shape == (SELECTION_REPLICATES,)
    assert np.array_equal(first.replicates, again.replicates)  # the same resamples every time
    assert abs(float(np.mean(first.replicates)) - first["score"]) < 0.05
    assert float(np.std(first.replicates)) > 0


def test_an_aligned_arm_starts_at_the_closed_form_map_and_ends_no_worse_on_validation() -> None:
    """Step 1 of a head with a linear path is the untrained lstsq start (frozen + the map, to
    float precision); whatever step is kept scores no lower than it on validation."""
    import numpy as np

    from common.evaluation import aligned_metrics
    from common.head_start import closed_form_alignment

    train, val = _paired(120, 0), _paired(45, 1)
    run = RunSettings.from_run_config(
        {"head": "aligned", "local-epochs": 2, "batch-size": 32, "lr": 0.05}
    )
    model, selection = train_selected(run, train, val, steps=4)
    assert selection.closed_form_start and len(selection.metrics) == 4
    start = selection.metrics[0]
    frozen = aligned_metrics(closed_form_alignment(train, "lstsq"), val, ks=(5,))
    assert start["R@5"] == pytest.approx(frozen["mean_R@5"], abs=1e-6)
    assert (selection.budget, selection.to_dict()["budget"]) == (6, 6)  # step 1 trained nothing
    assert selection.label.startswith(f"epoch {2 * (selection.chosen - 1)}/6")
    kept = selection.metrics[selection.chosen - 1]
    assert kept["score"] >= start["score"]
    assert selection_metrics(model, [(train, val)]) == pytest.approx(kept)
    assert np.isfinite(selection.scores).all()


def test_select_round_loads_the_checkpoint_best_on_the_sites_validation(tmp_path: Path) -> None:
    import numpy as np

    from common.artifacts import state_arrays
    from server.checkpoints import RunStore

    run, train = _small_run(), _paired(96, 0)
    vals = [_paired(20, 2), _paired(40, 3)]
    store = RunStore(tmp_path)
    model = build_run_model(run, dims=train.dims, num_classes=train.num_classes)
    store.save_checkpoint(0, state_arrays(model), {})  # the initial head is never a candidate
    saved, expected = {}, []
    for server_round in range(1, 5):
        trained, _ = train_selected(_small_run(seed=server_round), train, vals[1], steps=1)
        saved[server_round] = state_arrays(trained)
        store.save_checkpoint(server_round, saved[server_round], {})
        expected.append(selection_metrics(trained, [(train, v) for v in vals])["score"])
    loaded, selection = select_round(
        tmp_path,
        build_run_model(run, dims=train.dims, num_classes=train.num_classes),
        [(train, v) for v in vals],
    )
    assert selection.scores == pytest.approx(expected)
    assert selection.chosen == int(np.argmax(expected)) + 1
    for key, value in state_arrays(loaded).items():
        np.testing.assert_array_equal(value, saved[selection.chosen][key])


def test_round_rows_score_every_trained_round_on_the_test_set_like_the_table(
    tmp_path: Path,
) -> None:
    from common.artifacts import state_arrays
    from server.checkpoints import RunStore

    run, train, test = _small_run(), _paired(96, 0), _paired(30, 4)
    store = RunStore(tmp_path)
    model = build_run_model(run, dims=train.dims, num_classes=train.num_classes)
    store.save_checkpoint(0, state_arrays(model), {})  # the initial head: not a round's result
    rows = []
    for server_round in (1, 2):
        trained, _ = train_selected(_small_run(seed=server_round), train, test, steps=1)
        store.save_checkpoint(server_round, state_arrays(trained), {})
        rows.append(metric_row("", trained, train, test))
    series = round_rows(tmp_path, model, train, test)
    assert series["round"] == [1.0, 2.0]
    for key in ("mean_R@5", "zs_auroc", "probe_f1_macro"):
        assert series[key] == pytest.approx([r[key] for r in rows]), key


def _site(train: Any, held_out: Any) -> Any:
    from common.embedding import EmbedReport
    from common.pipeline import SiteData

    return SiteData(train, held_out, EmbedReport(), {})


def test_split_holdout_with_a_common_test_set_keeps_the_held_out_split_for_validation() -> None:
    site = _site(_paired(40, 0), _paired(12, 1))
    halves = split_holdout(site)  # no common test set: halved, as the committed results were
    assert sorted(halves.val.ids + halves.test.ids) == sorted(site.test.ids)
    assert len(halves.val) == len(halves.test) == 6
    own = _paired(5, 2)
    splits = split_holdout(site, own_test=own)
    assert splits.train is site.train and splits.val.ids == site.test.ids and splits.test is own


def test_common_test_set_refuses_sites_that_keep_the_marked_rows_or_other_classes() -> None:
    sites = [_site(_paired(40, 0), _paired(12, 1)), _site(_paired(40, 3), _paired(12, 4))]
    common = CommonTest(_paired(6, 2))
    with pytest.raises(ConfigError, match='test-rows = "exclude"'):
        common.site_tests(_small_run(), sites)  # holdout: the sites keep the marked rows
    run = _small_run(**{"test-rows": "exclude"})
    assert [len(t) for t in common.site_tests(run, sites)] == [0, 0]
    per_site = [_paired(2, 5), _paired(4, 6)]
    assert CommonTest(_paired(6, 2), per_site).site_tests(run, sites) == per_site
    with pytest.raises(ConfigError, match="rows for 1 sites, not 2"):
        CommonTest(_paired(6, 2), per_site[:1]).site_tests(run, sites)
    other = _paired(6, 2)
    other.class_names = ["x", "y", "z"]
    with pytest.raises(ConfigError, match=r"classes \['x', 'y', 'z'\]"):
        CommonTest(other).site_tests(run, sites)
    text_only = _paired(6, 2)
    text_only.image = None
    with pytest.raises(ConfigError, match="inputs"):
        CommonTest(text_only).site_tests(run, sites)


def test_a_site_alone_that_holds_one_class_trains_under_a_fedntd_run_config() -> None:
    """ntd-beta is inert without a global head, but it must not stop the baselines: a site
    holding one class trains the class-prompt objective there, as it would in the federation."""
    import numpy as np

    train, val = _paired(90, 0), _paired(45, 1)
    one_class = train.subset(np.flatnonzero(train.labels == 1))
    _, plain = train_selected(_small_run(), one_class, val, steps=2)
    _, distilling = train_selected(_small_run(**{"ntd-beta": 1.0}), one_class, val, steps=2)
    assert (plain.objective, distilling.objective) == ("infonce", "infonce+prompts")


def test_a_site_whose_halves_support_no_metric_does_not_vote_in_the_selection() -> None:
    """Label skew on text-only data: a site with one class has no probe (and no zero-shot without
    images), so its validation score is NaN; the other sites still select (they did not before:
    the weighted mean was NaN at every round and the Dirichlet comparison stopped)."""
    import numpy as np

    from common.embedding import EmbeddedDataset

    rng = np.random.default_rng(0)

    def reports(n: int, classes: int) -> EmbeddedDataset:
        labels = np.arange(n) % classes
        text = rng.normal(size=(n, 10)).astype(np.float32) + 3.0 * labels[:, None]
        return EmbeddedDataset(
            ids=[f"{classes}-{i}" for i in range(n)],
            text=text,
            labels=labels,
            class_names=["a", "b"],
        )

    two = (reports(40, 2), reports(20, 2))
    model = build_run_model(_small_run(), dims=two[0].dims, num_classes=2)
    one = (reports(40, 1), reports(30, 1))
    alone = selection_metrics(model, [two])
    assert math.isfinite(alone["score"])
    assert selection_metrics(model, [two, one]) == pytest.approx(alone)
    with pytest.raises(ConfigError, match="no metric to select on"):
        selection_metrics(model, [one])
