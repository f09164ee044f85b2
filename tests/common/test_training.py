"""Local head training, FedProx term, saving/loading heads and the embedded-data pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.artifacts import load_head, load_state_arrays, save_head, state_arrays
from common.data.partition import split_indices
from common.embedding import EmbeddedDataset, embed_dataset
from common.errors import ConfigError, DataError
from common.evaluation import evaluate_head, quick_metrics
from common.heads import HEAD_PRESETS, HeadConfig
from common.metrics import zero_shot
from common.pipeline import DataSpec, prepare_site_data
from common.registries import LOSSES
from common.training import TrainConfig, build_head_model, train_head


def _paired(n: int = 240, *, seed: int = 0, classes: int = 4) -> EmbeddedDataset:
    """Image/text embeddings that share a latent class-and-instance signal through random maps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    latent = np.eye(classes)[labels] * 3 + rng.normal(size=(n, classes))
    latent = np.concatenate([latent, rng.normal(size=(n, 6))], axis=1)
    to_image, to_text = (
        rng.normal(size=(latent.shape[1], 20)),
        rng.normal(size=(latent.shape[1], 12)),
    )
    image = latent @ to_image + 0.1 * rng.normal(size=(n, 20))
    text = latent @ to_text + 0.1 * rng.normal(size=(n, 12))
    prompts = (np.eye(classes, latent.shape[1]) * 3) @ to_text
    return EmbeddedDataset(
        ids=[str(i) for i in range(n)],
        image=image.astype(np.float32),
        text=text.astype(np.float32),
        labels=labels,
        class_names=[f"c{i}" for i in range(classes)],
        prompts=prompts.astype(np.float32),
        text_groups=np.arange(n),
    )


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"auto"}))
def test_training_lowers_each_loss(loss: str) -> None:
    data = _paired()
    model = build_head_model(
        dims=data.dims, head_config=HeadConfig(out_dim=16, hidden_dim=32), loss=loss, num_classes=4
    )
    before = train_head(model, data, TrainConfig(loss=loss, epochs=1, batch_size=64, lr=1e-9)).loss
    after = train_head(model, data, TrainConfig(loss=loss, epochs=15, batch_size=64)).loss
    assert after < before * 0.9


def test_training_is_deterministic_for_a_seed() -> None:
    data = _paired()
    states = []
    for _ in range(2):
        model = build_head_model(dims=data.dims, head_config=HEAD_PRESETS["small"], seed=3)
        train_head(model, data, TrainConfig(epochs=2, seed=5))
        states.append(state_arrays(model))
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])


def test_trained_head_beats_chance_on_retrieval_and_zero_shot() -> None:
    data = _paired(600, seed=1)
    train, test = data.subset(np.arange(400)), data.subset(np.arange(400, 600))
    model = build_head_model(dims=train.dims, head_config=HeadConfig(out_dim=16, hidden_dim=64))
    train_head(model, train, TrainConfig(epochs=30, batch_size=64))
    report = evaluate_head(model, train, test)
    projected, chance = report.row("projected"), report.row("chance")
    assert projected["mean_R@5"] > 3 * chance["mean_R@5"]
    assert projected["zs_auroc"] > 0.8
    assert {"frozen+lstsq", "frozen+cca", "frozen"} <= {r["embeddings"] for r in report.rows}


def test_reports_alone_are_scored_zero_shot_frozen_and_projected() -> None:
    """Text-only data with class prompts (reports): the frozen row scores each labelled report
    against the prompts in the text encoder's own space; the projected row does the same after the
    head. Unlabelled reports are left out of zero-shot, not the whole metric."""
    data = _paired(600, seed=1)
    data.image = None
    assert data.labels is not None
    data.labels[400:420] = -1
    train, test = data.subset(np.arange(400)), data.subset(np.arange(400, 600))
    model = build_head_model(
        dims=train.dims,
        head_config=HeadConfig(out_dim=16, hidden_dim=32),
        loss="prompts",
        num_classes=4,
    )
    train_head(model, train, TrainConfig(loss="prompts", epochs=10, batch_size=64))
    report = evaluate_head(model, train, test)
    frozen, projected = report.row("frozen"), report.row("projected")
    assert test.text is not None and test.prompts is not None and test.labels is not None
    rows = test.labels >= 0
    expected = zero_shot(test.text[rows], test.prompts, test.labels[rows])
    assert frozen["zs_auroc"] == expected["zs_auroc"] and rows.sum() == 180
    assert projected["zs_auroc"] > 0.9 and "probe_f1_macro" in projected
    assert "mean_R@5" not in projected and "chance" not in {r["embeddings"] for r in report.rows}


def test_proximal_term_keeps_the_head_closer_to_the_global_one() -> None:
    data = _paired()
    distances = []
    for mu in (0.0, 10.0):
        model = build_head_model(dims=data.dims, head_config=HEAD_PRESETS["small"], seed=0)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        train_head(model, data, TrainConfig(epochs=5, proximal_mu=mu), reference=reference)
        distances.append(
            sum(float(((model.state_dict()[k] - reference[k]) ** 2).sum()) for k in reference)
        )
    assert distances[1] < 0.5 * distances[0]


def test_label_losses_need_labels_and_infonce_needs_pairs() -> None:
    data = _paired()
    with pytest.raises(ConfigError, match="needs class labels"):
        build_head_model(dims=data.dims, head_config=HeadConfig(), loss="supcon", num_classes=None)
    with pytest.raises(ConfigError, match="paired images and texts"):
        build_head_model(dims={"text": 12}, head_config=HeadConfig(), loss="infonce")
    model = build_head_model(dims=data.dims, head_config=HeadConfig(), loss="proxy", num_classes=4)
    data.labels = None
    with pytest.raises(DataError, match="needs labels"):
        train_head(model, data, TrainConfig(loss="proxy", epochs=1))


def test_prompt_loss_trains_through_the_text_tower_and_needs_the_prompts() -> None:
    data = _paired()
    loss = "infonce+supcon+prompts"
    model = build_head_model(
        dims=data.dims, head_config=HeadConfig(out_dim=16, hidden_dim=32), loss=loss, num_classes=4
    )
    # A site that holds one class: the prompt term still has the other classes as negatives and
    # moves its projected images towards their own class's prompt.
    site = data.subset(np.flatnonzero(data.labels == 2))
    before = model.project(site)
    train_head(model, site, TrainConfig(loss=loss, epochs=10, batch_size=32))
    after = model.project(site)
    share = {
        name: float(np.mean((z["image"] @ z["prompts"].T).argmax(axis=1) == 2))
        for name, z in (("before", before), ("after", after))
    }
    assert share["after"] > max(share["before"], 0.9), share
    data.prompts = None
    with pytest.raises(
        DataError, match=r"'infonce\+supcon\+prompts' needs the task's class prompts"
    ):
        train_head(model, data, TrainConfig(loss=loss, epochs=1))


def test_nan_embeddings_are_a_clear_error() -> None:
    data = _paired()
    assert data.image is not None
    data.image[3, 2] = np.nan
    model = build_head_model(dims=data.dims, head_config=HeadConfig())
    with pytest.raises(DataError, match="image embeddings contain NaN"):
        train_head(model, data, TrainConfig(epochs=1))


def test_saved_head_round_trips_with_config(tmp_path: Path) -> None:
    data = _paired()
    model = build_head_model(
        dims=data.dims, head_config=HeadConfig.paper(), loss="proxy", num_classes=4
    )
    train_head(model, data, TrainConfig(loss="proxy", epochs=1))
    save_head(tmp_path / "head", model, metadata={"note": "x"})
    loaded, config = load_head(tmp_path / "head")
    assert config["note"] == "x" and (tmp_path / "head" / "head.json").exists()
    a, b = model.project(data), loaded.project(data)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not list((tmp_path / "head").glob("*.tmp"))


def test_loading_wrong_arrays_names_the_key(tmp_path: Path) -> None:
    data = _paired()
    model = build_head_model(dims=data.dims, head_config=HeadConfig())
    arrays = state_arrays(model)
    key = next(iter(arrays))
    arrays[key] = arrays[key][:1]
    with pytest.raises(ConfigError, match=key):
        load_state_arrays(model, arrays)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a valid fedembed head"):
        load_head(tmp_path / "bad")


def test_split_is_deterministic_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 30])
    train, test = split_indices(60, labels, test_fraction=0.2, seed=0)
    again = split_indices(60, labels, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(train, again[0])
    assert not set(train) & set(test) and len(train) + len(test) == 60
    assert [int((labels[test] == c).sum()) for c in range(3)] == [2, 4, 6]


def test_pipeline_embeds_synthetic_data_through_the_cache(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    spec = DataSpec(
        dataset="synthetic-radiology",
        n=60,
        image_encoder=str(tiny_model_dirs["image"]),
        text_encoder=str(tiny_model_dirs["text"]),
    )
    first = prepare_site_data(spec, cache_dir=tmp_path)
    assert first.report.encoded > 0
    second = prepare_site_data(spec, cache_dir=tmp_path)
    assert second.report.encoded == 0
    assert len(first.train) + len(first.test) == 60
    assert first.train.dims == {"image": 24, "text": 32}
    assert first.train.prompts is not None and first.train.prompts.shape == (5, 32)
    np.testing.assert_array_equal(first.test.image, second.test.image)


def test_embed_dataset_refuses_when_nothing_can_be_embedded(tmp_path: Path) -> None:
    from common.data.registry import load_dataset

    dataset = load_dataset("digits", n=20)
    with pytest.raises(DataError, match="nothing to embed"):
        embed_dataset(dataset, cache_dir=tmp_path)


def test_partitioned_sites_hold_disjoint_shares_of_the_pool() -> None:
    from common.pipeline import load_site_dataset

    shares = [
        load_site_dataset(
            DataSpec(
                dataset="digits",
                n=400,
                partition="dirichlet",
                alpha=0.3,
                num_partitions=4,
                partition_id=i,
            )
        )
        for i in range(4)
    ]
    ids = [set(s.ids) for s in shares]
    assert sum(len(i) for i in ids) == 400 and len(set().union(*ids)) == 400
    assert all(a.isdisjoint(b) for k, a in enumerate(ids) for b in ids[k + 1 :])
    # label skew: the sites' class histograms differ markedly
    hist = np.stack(
        [np.bincount(s.labels, minlength=10) / len(s) for s in shares if s.labels is not None]
    )
    assert np.abs(hist - hist.mean(axis=0)).max() > 0.1


def test_synthetic_pool_mixes_site_profiles_and_natural_partition_is_one_profile() -> None:
    from common.pipeline import load_site_dataset

    natural = load_site_dataset(DataSpec(n=80, partition="site", num_partitions=4, partition_id=2))
    assert natural.sites is not None and set(natural.sites) == {"site-2"} and len(natural) == 20
    iid = load_site_dataset(DataSpec(n=80, partition="iid", num_partitions=4, partition_id=2))
    assert iid.sites is not None and len(set(iid.sites)) > 1


def test_quick_metrics_score_the_labelled_rows_when_some_are_unlabelled() -> None:
    data = _paired(120)
    model = build_head_model(dims=data.dims, head_config=HeadConfig(out_dim=8, hidden_dim=16))
    full = quick_metrics(model, data, prefix="")
    assert {"R@1", "R@5", "zs_acc", "zs_auroc"} <= set(full)
    assert data.labels is not None
    labels = data.labels.copy()
    labels[::10] = -1  # a few reports without a label
    partly = EmbeddedDataset(
        ids=data.ids,
        image=data.image,
        text=data.text,
        labels=labels,
        class_names=data.class_names,
        prompts=data.prompts,
        text_groups=data.text_groups,
    )
    scored = quick_metrics(model, partly, prefix="")
    assert {"zs_acc", "zs_auroc"} <= set(scored)  # before: none, as soon as one row lacked a label
    assert scored["R@5"] == full["R@5"] and scored["zs_acc"] != full["zs_acc"]


def test_centroid_accuracy_needs_two_classes() -> None:
    data = _paired(60)
    text_only = EmbeddedDataset(
        ids=data.ids, text=data.text, labels=np.zeros(60, dtype=np.int64), class_names=["c0"]
    )
    model = build_head_model(
        dims=text_only.dims,
        head_config=HeadConfig(out_dim=8, hidden_dim=16),
        loss="supcon",
        num_classes=1,
    )
    assert quick_metrics(model, text_only, prefix="") == {}  # one class: nothing to report
    two = EmbeddedDataset(
        ids=data.ids, text=data.text, labels=np.arange(60) % 2, class_names=["c0", "c1"]
    )
    assert set(quick_metrics(model, two, prefix="")) == {"centroid_acc"}


# ----------------------------------------------------- the default: closed-form start, kept by validation


def _aligned_model(data: EmbeddedDataset, *, loss: str = "auto"):  # type: ignore[no-untyped-def]
    return build_head_model(
        dims=data.dims,
        head_config=HEAD_PRESETS["aligned"],
        loss=loss,
        num_classes=data.num_classes,
    )


@pytest.mark.parametrize("method", ["lstsq", "cca"])
def test_aligned_head_starts_exactly_at_the_frozen_closed_form_baseline(method: str) -> None:
    """At init the head's projections are the tuned closed-form map's (normalised), so its
    retrieval and zero-shot scores are the frozen + map baseline's, computed the same way."""
    from common.evaluation import aligned_metrics, projected_metrics
    from common.head_start import closed_form_alignment, init_closed_form
    from common.metrics.inputs import _l2_normalize

    train, test = _paired(300, seed=0), _paired(120, seed=1)
    model = _aligned_model(train)
    assert init_closed_form(model, train, method) == method
    alignment = closed_form_alignment(train, method)
    projected = model.project(test)
    width = alignment.dim
    assert test.image is not None and test.text is not None and test.prompts is not None
    for key, expected in (
        ("image", alignment.transform_a(test.image)),
        ("text", alignment.transform_b(test.text)),
        ("prompts", alignment.transform_b(test.prompts)),
    ):
        np.testing.assert_allclose(projected[key][:, :width], _l2_normalize(expected), atol=1e-5)
        np.testing.assert_allclose(projected[key][:, width:], 0.0, atol=1e-6)  # CCA padding
    baseline = aligned_metrics(alignment, test)
    head = projected_metrics(model, None, test)
    for key, value in baseline.items():
        assert head[key] == pytest.approx(value, abs=1e-6), key


def test_default_training_keeps_a_head_no_worse_than_its_closed_form_start() -> None:
    """The default (aligned head, auto loss, closed-form start, validation hold-out): the kept
    head's validation score is >= the start's (the start is a candidate); a head that training
    could not improve is the closed-form map itself."""
    from common.head_start import validation_scores

    data = _paired(300, seed=2)
    model = _aligned_model(data)
    result = train_head(model, data, TrainConfig(epochs=6, batch_size=64, patience=3))
    # pairs, labels and class prompts: infonce+prompts, and with validation rows the
    # alternative with SupCon too; the objective whose best state scores higher is kept
    tried = result.objectives_tried
    assert list(tried) == ["infonce+prompts", "infonce+supcon+prompts"]
    assert result.objective == max(tried, key=lambda name: tried[name])
    assert result.validation["score"] == max(tried.values())
    assert model.loss_spec["objective"] == result.objective == model.loss.objective
    assert "kept " + result.objective in result.objective_reason
    assert result.init in ("lstsq", "cca") and result.best_epoch >= 0
    start, kept = result.validation_start, result.validation
    assert {"R@5", "zs_acc", "zs_auroc", "probe_f1", "score"} <= set(start)
    assert kept["score"] >= start["score"]
    if result.best_epoch > 0:  # the kept state is the one that was scored
        from common.head_start import validation_split

        rows = np.arange(len(data))
        assert data.labels is not None
        fit, val = validation_split(len(rows), data.labels, fraction=0.2, seed=0)
        rescored = validation_scores(model, data.subset(fit), data.subset(val))
        assert rescored["score"] == pytest.approx(kept["score"], abs=1e-6)


def test_auto_tries_its_alternatives_only_with_validation_rows_and_no_named_objective() -> None:
    """A federated round (no validation rows) trains the data's objective at every site; a named
    ``objective`` trains that one alone; an unknown name is refused."""
    data = _paired(200, seed=5)
    without_validation = train_head(
        _aligned_model(data), data, TrainConfig(epochs=1, batch_size=64, validation_fraction=0.0)
    )
    assert without_validation.objective == "infonce+prompts"
    assert not without_validation.objectives_tried
    named = train_head(
        _aligned_model(data),
        data,
        TrainConfig(epochs=1, batch_size=64, objective="infonce+supcon+prompts"),
    )
    assert named.objective == "infonce+supcon+prompts" and not named.objectives_tried
    assert named.objective_reason == "named by the training config"
    with pytest.raises(ConfigError, match="objective must be a registered loss"):
        TrainConfig(objective="clip")


def test_training_that_only_hurts_returns_the_frozen_baseline_fitted_on_all_rows() -> None:
    """A learning rate that wrecks the head in one epoch: the start is kept, and the returned head
    is the closed-form map refitted on every training row (what frozen + map is fitted on)."""
    from common.evaluation import aligned_metrics, projected_metrics
    from common.head_start import closed_form_alignment

    data, test = _paired(300, seed=3), _paired(120, seed=4)
    model = _aligned_model(data)
    result = train_head(model, data, TrainConfig(epochs=2, batch_size=64, lr=5.0, patience=0))
    assert result.best_epoch == 0
    baseline = aligned_metrics(closed_form_alignment(data, result.init), test)
    head = projected_metrics(model, None, test)
    for key, value in baseline.items():
        assert head[key] == pytest.approx(value, abs=1e-6), key


def test_auto_loss_chooses_from_the_data_and_is_saved_with_the_head(tmp_path: Path) -> None:
    from dataclasses import replace

    data = _paired(120)
    unlabelled = replace(data, labels=None, class_names=[], prompts=None)
    model = build_head_model(dims=data.dims, head_config=HeadConfig(out_dim=8), loss="auto")
    result = train_head(model, unlabelled, TrainConfig(epochs=1, batch_size=32))
    assert result.objective == "infonce" and "without labels" in result.objective_reason
    no_prompts = replace(data, prompts=None)
    model = _aligned_model(no_prompts)
    assert train_head(model, no_prompts, TrainConfig(epochs=1)).objective == "infonce+supcon"
    out = save_head(tmp_path / "head", model, metadata={})
    loaded, _ = load_head(out)
    assert loaded.objective == "infonce+supcon" and not loaded.uses_prompts
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_federated_round_one_starts_each_site_at_its_own_least_squares_map() -> None:
    """Run-config rounds hold nothing out; round 1 starts a linear path at the site's lstsq map
    (only head weights leave the site), later rounds keep the global head as it arrives."""
    from common.config import RunSettings
    from common.head_start import closed_form_alignment
    from common.metrics.inputs import _l2_normalize
    from common.training import build_run_model

    run = RunSettings(head="aligned", local_epochs=1)
    first, later = run.train_config(first_round=True), run.train_config()
    assert (first.init, first.validation_fraction) == ("lstsq", 0.0)
    assert (later.init, later.validation_fraction) == ("keep", 0.0)
    data = _paired(200)
    model = build_run_model(run, dims=data.dims, num_classes=data.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_head(model, data, later)
    assert result.init == "" and result.best_epoch == -1 and result.num_examples == len(data)
    model.load_state_dict(before)
    assert train_head(model, data, first).init == "lstsq"
    # a site that is not under DP-SGD returns round 1's map untrained: the mean of the maps is
    # round 1's global head, a checkpoint a trained round has to beat
    start = run.train_config(first_round=True, start_only=True)
    assert (start.epochs, start.init, first.epochs) == (0, "lstsq", 1)
    model.load_state_dict(before)
    started = train_head(model, data, start)
    assert (started.init, started.steps) == ("lstsq", 0)
    expected = closed_form_alignment(data, "lstsq").transform_a(data.image)
    np.testing.assert_allclose(
        model.project(data)["image"][:, : expected.shape[1]], _l2_normalize(expected), atol=1e-5
    )


def _ntd_model(data: EmbeddedDataset, seed: int = 0):  # type: ignore[no-untyped-def]
    return build_head_model(
        dims=data.dims,
        head_config=HeadConfig(out_dim=16, hidden_dim=32),
        loss="infonce+prompts",
        num_classes=len(data.class_names),
        seed=seed,
    )


def _ntd_config(**overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "loss": "infonce+prompts",
        "epochs": 4,
        "batch_size": 32,
        "seed": 3,
        "validation_fraction": 0.0,
        "init": "keep",
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def _site_ntd(model: Any, teacher: Any, data: EmbeddedDataset) -> float:
    """Mean not-true distillation of ``model`` from ``teacher`` over ``data``'s rows."""
    from common.distillation import NotTrueDistillation, class_logits

    def logits(m: Any) -> torch.Tensor:
        out = m.project(data)
        prompts = torch.from_numpy(out["prompts"])
        rows = torch.cat([torch.from_numpy(out["image"]), torch.from_numpy(out["text"])])
        return class_logits(rows, prompts, 0.1)

    labels = torch.from_numpy(data.labels).repeat(2)
    return float(NotTrueDistillation()(logits(model), logits(teacher), labels))


def test_ntd_off_or_without_a_global_head_is_todays_training() -> None:
    data = _paired(160, classes=5)
    states = []
    for beta, with_reference in [(0.0, False), (0.0, True), (1.0, False)]:
        model = _ntd_model(data)
        reference = (
            {k: v.clone() for k, v in model.state_dict().items()} if with_reference else None
        )
        train_head(model, data, _ntd_config(ntd_beta=beta), reference=reference)
        states.append(state_arrays(model))
    for state in states[1:]:
        for key in states[0]:
            np.testing.assert_array_equal(states[0][key], state[key])


def test_ntd_keeps_a_skewed_site_near_the_global_heads_not_true_ranking() -> None:
    import copy

    data = _paired(600, seed=4, classes=5)
    global_model = _ntd_model(data, seed=1)
    train_head(global_model, data, _ntd_config(epochs=10))
    reference = {k: v.clone() for k, v in global_model.state_dict().items()}
    frozen = {k: v.clone() for k, v in reference.items()}
    site = data.subset(np.flatnonzero(data.labels <= 1))  # a site that holds 2 of the 5 classes
    drift: dict[float, float] = {}
    for beta in (0.0, 5.0):
        model = copy.deepcopy(global_model)
        train_head(model, site, _ntd_config(epochs=8, ntd_beta=beta), reference=reference)
        assert any(not torch.equal(model.state_dict()[k], reference[k]) for k in reference)
        drift[beta] = _site_ntd(model, global_model, site)
    for key, value in frozen.items():  # the teacher is a copy: the received head is untouched
        assert torch.equal(reference[key], value)
    assert drift[0.0] > 0.05
    assert drift[5.0] < 0.5 * drift[0.0], drift


def test_ntd_adds_exactly_the_term_over_the_teachers_logits_of_the_same_rows() -> None:
    from common.distillation import NotTrueDistillation
    from common.training import _distillation

    data = _paired(120, classes=5)
    model, teacher = _ntd_model(data, seed=0), _ntd_model(data, seed=7)
    train_head(teacher, data, _ntd_config(epochs=2))  # a global head unlike the student
    distill = _distillation(
        model, teacher.state_dict(), data, _ntd_config(ntd_beta=2.0, ntd_tau=1.5)
    )
    assert distill is not None
    index = torch.tensor([5, 17, 3, 99, 42, 0, 64, 8])
    image, text = torch.from_numpy(data.image), torch.from_numpy(data.text)
    labels, prompts = torch.from_numpy(data.labels), torch.from_numpy(data.prompts)
    model.eval()
    args = (image[index], text[index], labels[index])
    added = model.compute_loss(*args, prompts=prompts, distill=distill, index=index)
    added = added - model.compute_loss(*args, prompts=prompts)

    def logits(head: Any) -> torch.Tensor:  # [image rows; text rows] of the batch, by hand
        out = head.project(data.subset(index.numpy()))
        rows = torch.cat([torch.from_numpy(out["image"]), torch.from_numpy(out["text"])])
        return rows @ torch.from_numpy(out["prompts"]).T / 0.1

    expected = NotTrueDistillation(beta=2.0, tau=1.5)(
        logits(model), logits(teacher), labels[index].repeat(2)
    )
    assert float(expected) > 0.01
    torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-6)


def test_a_site_that_holds_one_class_distils_through_the_prompt_objective() -> None:
    data = _paired(200, classes=5)
    site = data.subset(np.flatnonzero(data.labels == 2))
    objectives = {}
    for beta in (0.0, 1.0):
        model = build_head_model(
            dims=site.dims,
            head_config=HeadConfig(out_dim=16, hidden_dim=32),
            loss="auto",
            num_classes=5,
        )
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        config = _ntd_config(loss="auto", ntd_beta=beta, batch_size=16)
        objectives[beta] = train_head(model, site, config, reference=reference).objective
    assert objectives == {0.0: "infonce", 1.0: "infonce+prompts"}


def test_ntd_refuses_objectives_and_data_it_cannot_distil() -> None:
    data = _paired(120, classes=5)
    model = build_head_model(
        dims=data.dims, head_config=HeadConfig(out_dim=16, hidden_dim=32), loss="infonce"
    )
    # refused before training, with or without this round's teacher
    for reference in (None, {k: v.clone() for k, v in model.state_dict().items()}):
        with pytest.raises(ConfigError, match=r"ntd-beta.*class-prompt term"):
            train_head(model, data, _ntd_config(loss="infonce", ntd_beta=1.0), reference=reference)
    two = _paired(120, classes=2)
    model = _ntd_model(two)
    with pytest.raises(ConfigError, match=r"ntd-beta.*>= 3 classes"):
        train_head(model, two, _ntd_config(ntd_beta=1.0))
