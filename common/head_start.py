"""The closed-form start of a head with a linear path, and the validation score that keeps a trained
head no worse than that start (``common.training.train_head`` uses both).

The start is the frozen baselines' own tuned fit (``common.metrics.alignment``: lstsq or CCA, ridge by
cross-validation on the training rows), so at step 0 the head scores exactly what frozen + that map
scores; the score covers retrieval, zero-shot and a linear probe, on validation rows only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.data.partition import split_indices
from common.embedding import EmbeddedDataset
from common.errors import ConfigError, DataError
from common.metrics import (
    LinearAlignment,
    linear_alignment,
    select_ridge,
)
from common.metrics.bootstrap import (
    bootstrap_weights,
    weighted_auroc,
    weighted_macro_f1,
    weighted_mean,
)
from common.metrics.inputs import _l2_normalize
from common.metrics.retrieval import cross_modal_hits

if TYPE_CHECKING:
    from common.training import HeadModel


SELECTION_REPLICATES = 200
"""Paired bootstrap replicates of the validation metrics the experiments' model selection draws
(the same row resamples for every state scored on the same validation rows)."""
_SELECTION_SEED = 0


def combined_score(parts: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The selection score from metric values of one shape: the mean of the retrieval ("R@5"),
    zero-shot (mean of "zs_acc" and "zs_auroc") and probe ("probe_f1") parts present; None when
    none is."""
    zero_shot = [parts[k] for k in ("zs_acc", "zs_auroc") if k in parts]
    terms = [parts[k] for k in ("R@5", "probe_f1") if k in parts]
    terms += [np.mean(zero_shot, axis=0)] if zero_shot else []
    return np.mean(np.vstack(terms), axis=0) if terms else None


@dataclass(frozen=True)
class ValidationScores(Mapping[str, float]):
    """A state's validation metrics (read like a dict: "R@5", "zs_acc", "zs_auroc", "probe_f1",
    "score") and ``metric_replicates``, paired bootstrap replicates of each metric (empty when
    none were drawn)."""

    metrics: dict[str, float]
    metric_replicates: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    @property
    def replicates(self) -> np.ndarray | None:
        """The replicates of "score" (``combined_score`` of the metrics'); None without any."""
        return combined_score(self.metric_replicates) if self.metric_replicates else None

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)


def validation_split(
    n: int, labels: np.ndarray | None, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(fit, validation)`` of ``n`` training rows: ``fraction`` of each class (of the
    rows when unlabelled) held out for validation (``split_indices``), at least one row; none
    below 10 rows."""
    if fraction <= 0.0 or n < 10:
        return np.arange(n), np.arange(0)
    fit, validation = split_indices(n, labels, test_fraction=fraction, seed=seed)
    if not validation.size:
        validation = np.sort(np.random.default_rng(seed).permutation(n)[:1])
        fit = np.setdiff1d(np.arange(n), validation)
    return fit, validation


def closed_form_alignment(data: EmbeddedDataset, method: str) -> LinearAlignment:
    """The frozen baseline's map on ``data``: ``method`` ("lstsq" or "cca") with its ridge chosen
    by cross-validation on ``data`` (exactly as ``common.evaluation`` fits frozen + ``method``)."""
    assert data.image is not None and data.text is not None
    ridge = select_ridge(data.image, data.text, method=method, groups=data.text_groups)
    return linear_alignment(data.image, data.text, method=method, ridge=ridge)


def init_closed_form(model: HeadModel, data: EmbeddedDataset, method: str) -> str:
    """Start the head's linear paths at the closed-form map fitted on ``data`` and its residual
    MLPs at zero: the head's outputs are then the map's (L2-normalised).

    Image-text pairs with the two-tower layout: image tower = ``alignment.transform_a``, text
    tower (and so the class prompts) = ``transform_b`` (a CCA space narrower than the head is
    padded with zero columns, which no cosine sees). Otherwise each tower starts at the centred
    identity (its frozen input). Returns what was set, e.g. ``"lstsq (ridge-tuned)"``.
    """
    towers = model.head.towers()
    if not model.head.has_linear_path:
        raise ConfigError("init: the head has no linear path (use the 'aligned' head preset)")
    if set(towers) == {"image", "text"} and data.image is not None and data.text is not None:
        alignment = closed_form_alignment(data, method)
        for name, mean, proj in (
            ("image", alignment.mean_a, alignment.proj_a),
            ("text", alignment.mean_b, alignment.proj_b),
        ):
            tower = towers[name]
            weight = np.zeros((tower.out_dim, proj.shape[0]))
            weight[: proj.shape[1]] = proj.T
            bias = np.zeros(tower.out_dim)
            bias[: proj.shape[1]] = -mean @ proj
            tower.set_linear_path(
                torch.from_numpy(weight.astype(np.float32)),
                torch.from_numpy(bias.astype(np.float32)),
            )
        return method
    for name, tower in towers.items():
        inputs = inputs_of(name, data)
        if tower.in_dim != tower.out_dim:
            raise ConfigError(
                f"init: the {name} head maps {tower.in_dim} to {tower.out_dim} dims; a closed-form "
                "start needs image-text pairs or an equal width"
            )
        mean = inputs.mean(axis=0).astype(np.float32)
        tower.set_linear_path(torch.eye(tower.in_dim), torch.from_numpy(-mean))
    return "centred identity"


def inputs_of(name: str, data: EmbeddedDataset) -> np.ndarray:
    parts = {"image": data.image, "text": data.text}
    if name == "joint":
        arrays = [a for a in parts.values() if a is not None]
        return np.concatenate(arrays, axis=1)
    array = parts[name]
    if array is None:
        raise DataError(f"the data has no {name} embeddings")
    return array


def validation_scores(
    model: HeadModel, fit: EmbeddedDataset, validation: EmbeddedDataset, *, replicates: int = 0
) -> ValidationScores:
    """The head's scores on ``validation`` rows and their mean, ``score`` (each in [0, 1]).

    Retrieval: mean image<->text recall@5 ("R@5"). Classification: zero-shot accuracy and macro
    AUROC over the class prompts ("zs_acc", "zs_auroc"), and the macro-F1 of a linear probe (a
    ridge classifier on standardised projections of the ``fit`` rows, "probe_f1"). ``score`` is
    the mean of the retrieval, zero-shot (mean of its two) and probe parts the data supports
    (``combined_score``). With ``replicates`` > 0 each metric is also recomputed under that many
    paired row resamples of ``validation`` (``ValidationScores.metric_replicates``: how sure a
    difference between two states is; the experiments' diagnostics draw them, training does not).
    """
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    z = model.project(validation)
    unit = np.ones((1, len(validation)))
    if replicates and len(validation):
        weights = bootstrap_weights(len(validation), replicates, seed=_SELECTION_SEED)
        unit = np.vstack([unit, weights])
    values: dict[str, np.ndarray] = {}  # [B + 1] each: the point value, then the replicates
    if "image" in z and "text" in z and len(validation) >= 2:
        i2t, t2i = cross_modal_hits(z["image"], z["text"], k=5, groups_text=validation.text_groups)
        values["R@5"] = (weighted_mean(i2t, unit) + weighted_mean(t2i, unit)) / 2.0
    labels = validation.labels
    known = np.flatnonzero(labels >= 0) if labels is not None else np.arange(0)
    if labels is not None and "image" in z and "prompts" in z and known.size:
        y = labels[known]
        similarity = _l2_normalize(z["image"][known]) @ _l2_normalize(z["prompts"]).T
        values["zs_acc"] = weighted_mean(similarity.argmax(axis=1) == y, unit[:, known])
        if np.unique(y).size >= 2:
            per_class = np.vstack(
                [weighted_auroc(y == c, similarity[:, c], unit[:, known]) for c in np.unique(y)]
            )
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a replicate without a class
                values["zs_auroc"] = np.nanmean(per_class, axis=0)
    if labels is not None and fit.labels is not None and known.size:
        key = "joint" if "joint" in z else ("image" if "image" in z else "text")
        fit_rows = np.flatnonzero(fit.labels >= 0)
        if np.unique(fit.labels[fit_rows]).size >= 2:
            fit_z = model.project(fit)[key][fit_rows]
            scaler = StandardScaler().fit(fit_z)
            probe = RidgeClassifier(alpha=1.0).fit(scaler.transform(fit_z), fit.labels[fit_rows])
            predicted = probe.predict(scaler.transform(z[key][known]))
            values["probe_f1"] = weighted_macro_f1(labels[known], predicted, unit[:, known])
    scores = {k: float(v[0]) for k, v in values.items()}
    score = combined_score(values)
    scores["score"] = math.nan if score is None else float(score[0])
    if score is None or unit.shape[0] == 1:
        return ValidationScores(scores)
    return ValidationScores(scores, metric_replicates={k: v[1:] for k, v in values.items()})


def beats_start(candidate: Mapping[str, float], start: Mapping[str, float]) -> float:
    """The share of paired bootstrap replicates in which ``candidate``'s score exceeds
    ``start``'s; nan when either has no replicates (or they were drawn on different rows)."""
    a = getattr(candidate, "replicates", None)
    b = getattr(start, "replicates", None)
    if a is None or b is None or a.shape != b.shape:
        return math.nan
    return float(np.mean(a > b))
