"""Evaluation metrics on embeddings: retrieval recall@k, zero-shot, probes, classifiers, alignment.

Modules: ``inputs`` (argument checks, MetricInputError), ``retrieval``, ``zeroshot``,
``classifiers`` (linear probe, classifier suite), ``alignment`` (least squares / CCA baselines),
``bootstrap`` (paired bootstrap replicates of the validation metrics), ``tables`` (markdown
tables).
"""

from common.metrics.alignment import (
    RIDGES,
    LinearAlignment,
    linear_alignment,
    linear_alignments,
    select_ridge,
)
from common.metrics.classifiers import CLASSIFIERS, PROBE_CS, classifier_suite, linear_probe
from common.metrics.inputs import MetricInputError
from common.metrics.retrieval import (
    TIE_TOLERANCE,
    chance_recall_at_k,
    cross_modal_retrieval,
    recall_at_k,
)
from common.metrics.tables import format_table
from common.metrics.zeroshot import zero_shot

__all__ = [
    "CLASSIFIERS",
    "PROBE_CS",
    "RIDGES",
    "TIE_TOLERANCE",
    "LinearAlignment",
    "MetricInputError",
    "chance_recall_at_k",
    "classifier_suite",
    "cross_modal_retrieval",
    "format_table",
    "linear_alignment",
    "linear_alignments",
    "linear_probe",
    "recall_at_k",
    "select_ridge",
    "zero_shot",
]
