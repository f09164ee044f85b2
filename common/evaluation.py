"""Held-out evaluation of frozen vs projected embeddings, side by side, with the cheap baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.embedding import EmbeddedDataset
from common.metrics import (
    LinearAlignment,
    chance_recall_at_k,
    classifier_suite,
    cross_modal_retrieval,
    format_table,
    linear_alignment,
    linear_probe,
    select_ridge,
    zero_shot,
)
from common.training import HeadModel

KS = (1, 5, 10)
ALIGNMENTS = ("lstsq", "cca")  # the closed-form frozen baselines evaluate_head reports


@dataclass
class EvaluationReport:
    """One row per embedding variant ("chance", "frozen+lstsq", "frozen+cca", "frozen", "projected").

    ``scored`` and ``fitted_on`` say which rows were scored and which data the alignment baselines
    and probes were fitted on (or why they are left out); the table prints them above its rows.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    num_train: int = 0
    num_test: int = 0
    scored: str = ""
    fitted_on: str = ""

    def row(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["embeddings"] == name:
                return row
        raise KeyError(name)

    @property
    def columns(self) -> list[str]:
        seen: list[str] = []
        for row in self.rows:
            seen.extend(k for k in row if k not in seen)
        return seen

    def table(self) -> str:
        """What was scored and fitted on (when set), then a GitHub markdown table of every row."""
        captions = [
            f"{name}: {text}"
            for name, text in (
                ("scored", self.scored),
                ("alignment baselines and probes fitted on", self.fitted_on),
            )
            if text
        ]
        return "\n".join([*captions, format_table(self.rows, self.columns)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "scored": self.scored,
            "fitted_on": self.fitted_on,
        }


def evaluate_head(
    model: HeadModel | None,
    train: EmbeddedDataset | None,
    test: EmbeddedDataset,
    *,
    classifiers: Sequence[str] | None = None,
    seed: int = 0,
    alignments: Sequence[str] = ALIGNMENTS,
) -> EvaluationReport:
    """Evaluate on ``test`` (probes and alignments are fitted on ``train``; without ``train``, only
    what needs no fitting: chance and the head's retrieval and zero-shot).

    Paired image-text data gets cross-modal retrieval (image->text, text->image recall@1/5/10) and
    zero-shot classification from the class prompts; labelled data gets a linear probe (and the
    optional classifier suite) on the primary modality (image if present, else text).
    ``alignments``: the closed-form frozen baselines to fit ("lstsq", "cca"), each ridge tuned by
    cross-validation on ``train``.
    """
    report = EvaluationReport(num_train=0 if train is None else len(train), num_test=len(test))
    paired = test.image is not None and test.text is not None
    if paired:
        report.rows.append(_chance_row(test))
    if train is not None:
        if paired:
            for method in alignments:
                report.rows.append(_aligned_frozen_row(train, test, method=method))
        frozen = {
            "embeddings": "frozen",
            **_label_metrics(_primary(train), _primary(test), train, test, classifiers, seed),
        }
        if not paired and test.text is not None and test.prompts is not None:
            frozen.update(_zero_shot(test.text, test.prompts, test))  # one encoder's space
        report.rows.append(frozen)
    if model is not None:
        report.rows.append(_projected_row(model, train, test, classifiers=classifiers, seed=seed))
    return report


def _primary(data: EmbeddedDataset) -> np.ndarray:
    """The frozen features a classifier sees: image if present, else text."""
    array = data.image if data.image is not None else data.text
    assert array is not None  # validated upstream: at least one modality
    return array


def _label_metrics(
    train_x: np.ndarray,
    test_x: np.ndarray,
    train: EmbeddedDataset,
    test: EmbeddedDataset,
    classifiers: Sequence[str] | None,
    seed: int,
) -> dict[str, float]:
    if train.labels is None or test.labels is None:
        return {}
    tr, te = train.labels >= 0, test.labels >= 0
    if len(np.unique(train.labels[tr])) < 2 or not te.any():
        return {}
    metrics = dict(
        linear_probe(train_x[tr], train.labels[tr], test_x[te], test.labels[te], seed=seed)
    )
    if classifiers:
        suite = classifier_suite(
            train_x[tr],
            train.labels[tr],
            test_x[te],
            test.labels[te],
            seed=seed,
            classifiers=list(classifiers),
        )
        metrics.update({f"f1_{name}": value for name, value in suite.items()})
    return metrics


def _chance_row(test: EmbeddedDataset) -> dict[str, Any]:
    row: dict[str, Any] = {"embeddings": "chance"}
    chance = chance_recall_at_k(len(test), ks=KS, groups=test.text_groups)
    for k in KS:
        row[f"i2t_R@{k}"] = row[f"t2i_R@{k}"] = row[f"mean_R@{k}"] = chance[f"R@{k}"]
    if test.num_classes and test.labels is not None:
        row["zs_acc"] = 1.0 / test.num_classes
        row["zs_auroc"] = 0.5
    return row


def _aligned_frozen_row(
    train: EmbeddedDataset, test: EmbeddedDataset, *, method: str
) -> dict[str, Any]:
    """Frozen embeddings put in one space by a closed-form linear map fitted on ``train``, its
    ridge chosen by cross-validation on ``train`` (``select_ridge``)."""
    assert train.image is not None and train.text is not None
    ridge = select_ridge(train.image, train.text, method=method, groups=train.text_groups)
    alignment = linear_alignment(train.image, train.text, method=method, ridge=ridge)
    return {
        "embeddings": f"frozen+{method}",
        "ridge": ridge,
        **aligned_metrics(alignment, test),
    }


def aligned_metrics(
    alignment: LinearAlignment, data: EmbeddedDataset, *, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Retrieval (and zero-shot of the labelled rows, with class prompts) of the frozen embeddings
    of ``data`` put in one space by a fitted ``alignment`` (image = side a, text = side b)."""
    assert data.image is not None and data.text is not None
    image_z, text_z = alignment.transform_a(data.image), alignment.transform_b(data.text)
    metrics = _retrieval(image_z, text_z, data, ks=ks)
    if data.prompts is not None:
        metrics.update(_zero_shot(image_z, alignment.transform_b(data.prompts), data))
    return metrics


def _zero_shot(queries: np.ndarray, prompts: np.ndarray, data: EmbeddedDataset) -> dict[str, float]:
    """Zero-shot scores of the labelled rows of ``data`` (``queries`` are its rows, embedded)
    against the class prompts; none without labels of two classes."""
    if data.labels is None:
        return {}
    rows = data.labels >= 0
    if np.unique(data.labels[rows]).size < 2:
        return {}
    return zero_shot(queries[rows], prompts, data.labels[rows])


def _retrieval(
    image_z: np.ndarray, text_z: np.ndarray, test: EmbeddedDataset, *, ks: Sequence[int] = KS
) -> dict[str, float]:
    return dict(cross_modal_retrieval(image_z, text_z, groups_text=test.text_groups, ks=ks))


def _projected_row(
    model: HeadModel,
    train: EmbeddedDataset | None,
    test: EmbeddedDataset,
    *,
    classifiers: Sequence[str] | None,
    seed: int,
) -> dict[str, Any]:
    return {
        "embeddings": "projected",
        **projected_metrics(model, train, test, classifiers=classifiers, seed=seed),
    }


def projected_metrics(
    model: HeadModel,
    train: EmbeddedDataset | None,
    test: EmbeddedDataset,
    *,
    classifiers: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The head's metrics: retrieval and zero-shot (the labelled rows' images, or for text-only
    data reports, against the class prompts) on projected ``test``; the linear probe (and ``classifiers``) fitted on projected ``train``
    (left out without ``train``)."""
    test_z = model.project(test)
    metrics: dict[str, float] = {}
    if "image" in test_z and "text" in test_z:
        metrics.update(_retrieval(test_z["image"], test_z["text"], test))
    queries = test_z.get("image", test_z.get("text"))  # reports alone: each against the prompts
    if queries is not None and "prompts" in test_z:
        metrics.update(_zero_shot(queries, test_z["prompts"], test))
    if train is not None:
        train_z = model.project(train)
        key = "joint" if "joint" in test_z else ("image" if "image" in test_z else "text")
        metrics.update(_label_metrics(train_z[key], test_z[key], train, test, classifiers, seed))
    return metrics


def headline(report: EvaluationReport) -> dict[str, float]:
    """A few numbers for logs: the projected row's recall@5 (mean of both directions), AUROC, F1."""
    try:
        row = report.row("projected")
    except KeyError:
        return {}
    out: dict[str, float] = {}
    if "mean_R@5" in row:
        out["R@5"] = row["mean_R@5"]
    for key in ("zs_auroc", "zs_acc", "probe_f1_macro"):
        if key in row and not math.isnan(row[key]):
            out[key] = row[key]
    return out


def quick_metrics(
    model: HeadModel, data: EmbeddedDataset, *, prefix: str = "eval-"
) -> dict[str, float]:
    """Cheap held-out scores of a head (per round, at sites and the server): recall and zero-shot.

    Paired data: mean image<->text recall@1/@5; with labels and prompts: zero-shot accuracy and
    macro AUROC. Label-only data: nearest-class-centroid accuracy of the projected embeddings
    (centroids from the same data; a cheap stand-in for the probe, not a held-out classifier).
    """
    if len(data) == 0:
        return {}
    projected = model.project(data)
    metrics: dict[str, float] = {}
    # Label metrics use the labelled rows only (a dataset may leave some rows unlabelled).
    rows = np.flatnonzero(data.labels >= 0) if data.labels is not None else np.array([], int)
    labels = data.labels[rows] if data.labels is not None else np.array([], int)
    if "image" in projected and "text" in projected:
        retrieval = cross_modal_retrieval(
            projected["image"], projected["text"], groups_text=data.text_groups, ks=(1, 5)
        )
        metrics["R@1"] = retrieval["mean_R@1"]
        metrics["R@5"] = retrieval["mean_R@5"]
        if "prompts" in projected and rows.size:
            metrics.update(zero_shot(projected["image"][rows], projected["prompts"], labels))
    elif np.unique(labels).size >= 2:  # one class: every row is "right", which says nothing
        z = projected[next(iter(projected))][rows]
        classes = np.unique(labels)
        centroids = np.stack([z[labels == c].mean(axis=0) for c in classes])
        predicted = classes[np.argmax(z @ centroids.T, axis=1)]
        metrics["centroid_acc"] = float((predicted == labels).mean())
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}
