"""The site pipeline's data side: dataset spec -> dataset -> cached frozen embeddings -> train/test split."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.cache import EmbeddingCache, SupportsEmbed
from common.config import DataSpec
from common.data.dataset import SiteDataset
from common.data.partition import concat_datasets, partition_indices, split_indices
from common.data.registry import BUILTIN_DATASETS, DEFAULT_SYNTHETIC_SIZE, load_dataset
from common.embedding import EmbeddedDataset, EmbedReport, embed_dataset
from common.encoders import (
    ENCODER_CODE_VERSION,
    Encoder,
    fingerprint_files,
    load_encoder,
    weight_files,
)
from common.encoders.runtime import runtime_key
from common.errors import CacheError, DataError

DEFAULT_CACHE_DIR = Path(".fedembed") / "cache"


@dataclass
class SiteData:
    """A site's embedded data, split into a training and a held-out part."""

    train: EmbeddedDataset
    test: EmbeddedDataset
    report: EmbedReport
    encoders: dict[str, dict[str, Any]]


def get_encoder(
    spec: str,
    *,
    modality: str,
    image_size: int | None = None,
    max_length: int = 128,
    weights: str | None = None,
    precision: str = "auto",
    device: str = "auto",
) -> Encoder:
    """Load an encoder once per process (loading a model costs seconds; embedding reuses it),
    and again when its weight files change (a long-lived site worker sees new weights).
    ``weights``: the files' ``fingerprint_files`` if the caller has it (else computed here)."""
    # runtime_key: what the resolution depends on besides these (e.g. FEDEMBED_ONNXRUNTIME)
    settings = (
        spec,
        modality,
        image_size,
        max_length,
        precision,
        device,
        runtime_key(precision, device),
    )
    encoder = _cached_encoder(*settings)
    if (weights or fingerprint_files(weight_files(spec))) != encoder.identity()["weights"]:
        _cached_encoder.cache_clear()
        encoder = _cached_encoder(*settings)
    return encoder


def forget_loaded_encoders() -> None:
    """Drop the encoders ``get_encoder`` keeps and the weight digests this process remembers, so
    the next call loads its model again, as a new process would."""
    from common.encoders.fingerprint import forget_digests

    _cached_encoder.cache_clear()
    forget_digests()


@cache  # keyed on all seven values, however the caller spelled them
def _cached_encoder(
    spec: str,
    modality: str,
    image_size: int | None,
    max_length: int,
    precision: str,
    device: str,
    runtime: str,  # runtime_key(precision, device): part of the cache key only
) -> Encoder:
    del runtime
    return load_encoder(
        spec,
        modality=modality,
        image_size=image_size,
        max_length=max_length,
        precision=precision,
        device=device,
    )


def known_encoder(
    spec: str,
    *,
    modality: str,
    image_size: int | None = None,
    max_length: int = 128,
    precision: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike[str],
) -> SupportsEmbed:
    """The encoder ``get_encoder`` gives, known without loading its model when the embedding
    cache at ``cache_dir`` recorded an earlier load of the same spec, settings, weight files
    and kind of machine (``runtime_key``: the precision and device resolve alike); the model is
    then loaded on the first input the cache lacks. Otherwise loaded and recorded.

    A site whose data is all cached (every round after its first, a re-run) never loads the
    encoder: no model in memory, no seconds spent loading it.
    """
    cache = EmbeddingCache(cache_dir)
    weights = fingerprint_files(weight_files(spec), memo=cache.weight_digests)
    load = {
        "code_version": ENCODER_CODE_VERSION,
        "spec": _spec_location(spec),
        "modality": modality,
        "image_size": image_size,
        "max_length": max_length,
        "weights": weights,
        "runtime": runtime_key(precision, device),
    }

    def loaded() -> Encoder:
        return get_encoder(
            spec,
            modality=modality,
            image_size=image_size,
            max_length=max_length,
            weights=weights,
            precision=precision,
            device=device,
        )

    known = cache.recorded_encoder(load)
    if known is None:
        encoder = loaded()
        cache.record_encoder(load, encoder)
        return encoder
    identity, dim = known
    return RecordedEncoder(identity, dim, loaded)


def _spec_location(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec.strip()


class RecordedEncoder:
    """An encoder known by the identity and size an earlier load of it recorded; its model is
    loaded only when something must be embedded, and must give that identity."""

    def __init__(self, identity: dict[str, Any], dim: int, load: Callable[[], Encoder]) -> None:
        self._identity = identity
        self.dim = dim
        self._load = load
        self._encoder: Encoder | None = None

    def identity(self) -> dict[str, Any]:
        return copy.deepcopy(self._identity)

    def embed(
        self,
        items: Sequence[Any],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        on_error: Callable[[int, DataError], None] | None = None,
    ) -> np.ndarray:
        if self._encoder is None:  # loaded and checked once, on the first chunk the cache lacks
            encoder = self._load()
            if encoder.identity() != self._identity:
                raise CacheError(
                    f"encoder {self._identity.get('source')!r}: the loaded model's identity "
                    "differs from the one its cache recorded for the same files and settings "
                    f"(dim {encoder.dim} vs {self.dim}); remove the cache's 'loads' records"
                )
            self._encoder = encoder
        return self._encoder.embed(
            items, batch_size=batch_size, progress=progress, on_error=on_error
        )


def _enabled(spec: str | None) -> bool:
    return bool(spec) and str(spec).lower() not in {"none", "off", "-"}


def load_pooled_dataset(spec: DataSpec) -> SiteDataset:
    """The whole dataset before partitioning.

    For ``synthetic-radiology`` split over P sites, the pool holds n/P examples from each of P
    site profiles (acquisition shifts), so the "site" partition is the natural, heterogeneous one.

    A partitioned built-in dataset is a pure function of the spec, so a process keeps the last
    pool it built: the simulation engine runs many virtual sites in one process, and each takes
    its partition of the same pool (generated once, not once per site). Manifests are re-read.
    """
    if not spec.partitioned or spec.dataset not in BUILTIN_DATASETS:
        return _build_pool(spec)
    return _shared_pool(replace(spec, partition_id=0))  # every site of a run shares the pool


@lru_cache(maxsize=1)  # one pool at a time: a process serves one run's dataset
def _shared_pool(spec: DataSpec) -> SiteDataset:
    return _build_pool(spec)


def _build_pool(spec: DataSpec) -> SiteDataset:
    if spec.partitioned and spec.dataset == "synthetic-radiology":
        total = spec.n or DEFAULT_SYNTHETIC_SIZE
        per_site = max(1, total // spec.num_partitions)
        return concat_datasets(
            [
                load_dataset(
                    spec.dataset, n=per_site, seed=spec.seed, site=k, image_size=spec.image_size
                )
                for k in range(spec.num_partitions)
            ]
        )
    return load_dataset(
        spec.dataset,
        n=spec.n,
        seed=spec.seed,
        site=spec.site,
        task=spec.task,
        image_size=spec.image_size,
        on_error=spec.on_bad_row,
    )


def site_rows(pooled: SiteDataset, spec: DataSpec) -> np.ndarray:
    """The rows of the pooled dataset that ``spec``'s site takes (all of them unpartitioned)."""
    if not spec.partitioned:
        return np.arange(len(pooled))
    return np.asarray(
        partition_indices(
            pooled,
            scheme=spec.partition,
            num_partitions=spec.num_partitions,
            partition_id=spec.partition_id,
            alpha=spec.alpha,
            seed=spec.seed,
        )
    )


def load_site_dataset(spec: DataSpec) -> SiteDataset:
    """The site's raw data: the spec's dataset, or this site's partition of the pooled dataset."""
    pooled = load_pooled_dataset(spec)
    return pooled.subset(site_rows(pooled, spec)) if spec.partitioned else pooled


def embed_site(
    spec: DataSpec, *, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR, progress: bool = False
) -> tuple[EmbeddedDataset, EmbedReport, dict[str, dict[str, Any]]]:
    """Embed the spec's dataset with its encoders through the site cache."""
    dataset = load_site_dataset(spec)
    image_encoder = text_encoder = None
    identities: dict[str, dict[str, Any]] = {}
    if dataset.images is not None and _enabled(spec.image_encoder):
        image_encoder = known_encoder(
            spec.image_encoder,
            modality="image",
            image_size=spec.encoder_image_size,
            precision=spec.encoder_precision,
            device=spec.encoder_device,
            cache_dir=cache_dir,
        )
        identities["image"] = image_encoder.identity()
    if dataset.texts is not None and _enabled(spec.text_encoder):
        text_encoder = known_encoder(
            spec.text_encoder,
            modality="text",
            max_length=spec.max_length,
            precision=spec.encoder_precision,
            device=spec.encoder_device,
            cache_dir=cache_dir,
        )
        identities["text"] = text_encoder.identity()
    embedded, report = embed_dataset(
        dataset,
        cache_dir=cache_dir,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        progress=progress,
        on_bad_row=spec.on_bad_row,
    )
    return embedded, report, identities


def prepare_site_data(
    spec: DataSpec, *, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR, progress: bool = False
) -> SiteData:
    """Embed (cached) and split a site's data as ``spec`` says.

    Rows the manifest marks ``split = test`` are the held-out split (``test_rows = "holdout"``)
    or are left out (``"exclude"``); otherwise a stratified ``test_fraction`` of the rows is held
    out (none at 0). A split that leaves nothing to train on is an error.
    """
    embedded, report, identities = embed_site(spec, cache_dir=cache_dir, progress=progress)
    marked = embedded.marked_test_rows()
    if marked.size and spec.test_rows == "holdout":
        train_idx = np.setdiff1d(np.arange(len(embedded)), marked)
        test_idx = marked
    else:  # a random split of the rows not marked test
        rows = np.setdiff1d(np.arange(len(embedded)), marked)
        labels = None if embedded.labels is None else embedded.labels[rows]
        train_part, test_part = split_indices(
            len(rows), labels, test_fraction=spec.test_fraction, seed=spec.split_seed
        )
        train_idx, test_idx = rows[train_part], rows[test_part]
    if not train_idx.size:
        raise DataError(
            f"{spec.dataset}: no rows left to train on ({len(embedded)} rows, {marked.size} marked "
            f"split=test, test-rows {spec.test_rows}, test-fraction {spec.test_fraction})"
        )
    return SiteData(embedded.subset(train_idx), embedded.subset(test_idx), report, identities)


def encoder_specs(spec: DataSpec, dataset: SiteDataset) -> dict[str, str]:
    """The encoder ``embed_site`` uses for each modality of ``dataset``: {"image"/"text": spec}."""
    used: dict[str, str] = {}
    if dataset.images is not None and _enabled(spec.image_encoder):
        used["image"] = spec.image_encoder
    if dataset.texts is not None and _enabled(spec.text_encoder):
        used["text"] = spec.text_encoder
    return used
