"""The coordinator's view of the task: the initial global head and the optional held-out validation set."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSettings, resolve_path
from common.data.registry import BUILTIN_DATASETS
from common.embedding import EmbeddedDataset
from common.errors import ConfigError
from common.pipeline import DataSpec, embed_site, known_encoder
from common.training import HeadModel, build_run_model
from common.wire import TASK_CLASSES

_TASK_SAMPLE = 20
SERVER_EVAL_SEED = 7919
"""Added to the run's seed for the coordinator's validation set: disjoint from the sites' data."""


def describe_task(run: RunSettings) -> dict[str, Any]:
    """Modalities and classes of the run's task, read from a small sample of the run's dataset.

    Sites must agree with it: a site whose data gives other shapes fails loudly on the first round.
    """
    from common.data.registry import load_dataset

    if run.dataset in BUILTIN_DATASETS:
        source = run.dataset
        sample = load_dataset(run.dataset, n=_TASK_SAMPLE, seed=run.seed, task=run.task or None)
    else:  # a manifest the coordinator can read (a simulation), else its server-eval manifest
        source = run.dataset if Path(run.dataset).is_file() else run.server_eval
        if not source or (source not in BUILTIN_DATASETS and not Path(source).is_file()):
            raise ConfigError(
                f"run-config: dataset '{run.dataset}' is neither built in nor a manifest the "
                "coordinator can read; set server-eval to a manifest (or built-in dataset) with "
                "the sites' modalities and classes"
            )
        task = run.task or None if source in BUILTIN_DATASETS else None
        sample = load_dataset(source, seed=run.seed, task=task)
    return {
        "modalities": list(sample.modalities),
        "class_names": list(sample.class_names),
        "classes_declared": sample.classes_declared,
        "source": source,
    }


def task_config(task: Mapping[str, Any]) -> dict[str, str]:
    """The train config's part that names the run's classes (``TASK_CLASSES``) when they are a
    manifest's declaration (the run's dataset or its server-eval manifest): a site whose own
    manifest declares another list fails instead of training class i as another class. Nothing
    for a built-in dataset (the run-config's default, which real sites replace with their own
    ``data``) or classes read from labels."""
    if not task.get("classes_declared") or not task.get("class_names"):
        return {}
    if task.get("source") in BUILTIN_DATASETS:
        return {}
    return {TASK_CLASSES: json.dumps(list(task["class_names"]))}


def coordinator_cache() -> Path:
    """The coordinator's embedding cache, ``$FEDEMBED_HOME/cache``: its validation set's embeddings
    and the encoders' recorded loads (so a later run sizes the head without loading a model)."""
    return resolve_path("", "cache")


def initial_model(run: RunSettings) -> tuple[HeadModel, dict[str, Any]]:
    """The global head at round 0 (seeded), sized for the run's encoders and task."""
    task = describe_task(run)
    cache = coordinator_cache()
    dims: dict[str, int] = {}
    if "image" in task["modalities"]:
        dims["image"] = known_encoder(
            run.image_encoder,
            modality="image",
            image_size=run.encoder_image_size or None,
            cache_dir=cache,
        ).dim
    if "text" in task["modalities"]:
        dims["text"] = known_encoder(
            run.text_encoder, modality="text", max_length=run.max_length, cache_dir=cache
        ).dim
    return build_run_model(run, dims=dims, num_classes=len(task["class_names"])), task


def server_eval_spec(run: RunSettings) -> DataSpec:
    """The coordinator's own validation set (run-config ``server-eval``), drawn apart from the
    sites' data: a built-in dataset from another seed, a manifest whole."""
    return run.data_spec(run.server_eval, n=run.server_eval_n, seed=run.seed + SERVER_EVAL_SEED)


class ServerEvaluator:
    """Scores the global head each round on a coordinator-held validation set (never site data)."""

    def __init__(self, run: RunSettings) -> None:
        spec = server_eval_spec(run)
        self.data: EmbeddedDataset
        self.data, _, _ = embed_site(spec, cache_dir=coordinator_cache())
        self.model, _ = initial_model(run)

    def evaluate(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        from common.artifacts import load_state_arrays
        from common.evaluation import quick_metrics

        load_state_arrays(self.model, arrays, source="global head")
        return quick_metrics(self.model, self.data, prefix="server-")
