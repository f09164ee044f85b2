"""The site pipeline's data side: dataset spec -> dataset -> cached frozen embeddings -> train/test split."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from common.data.dataset import SiteDataset
from common.data.partition import PARTITION_SCHEMES
from common.data.registry import load_dataset
from common.embedding import EmbeddedDataset, EmbedReport, embed_dataset
from common.encoders import Encoder, load_encoder
from common.errors import ConfigError

DEFAULT_CACHE_DIR = Path(".fedembed") / "cache"


@dataclass
class DataSpec:
    """Everything that determines a site's embedded data and its held-out split.

    ``dataset`` is a built-in name or a manifest path; encoders are packaged names, Hugging Face ids
    or local directories ("" or "none" disables a modality).
    """

    dataset: str = "synthetic-radiology"
    n: int | None = None
    seed: int = 0
    site: int = 0
    task: str | None = None
    image_size: int | None = None
    image_encoder: str = "mobilenetv2"
    text_encoder: str = "minilm"
    encoder_image_size: int | None = None
    max_length: int = 128
    test_fraction: float = 0.2
    split_seed: int = 0
    partition: str = "none"
    num_partitions: int = 1
    partition_id: int = 0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.partition != "none" and self.partition not in PARTITION_SCHEMES:
            raise ConfigError(
                f"unknown partition {self.partition!r}; choose none or {sorted(PARTITION_SCHEMES)}"
            )
        if self.num_partitions < 1 or not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"partition-id {self.partition_id} is outside 0..{self.num_partitions - 1}"
            )

    @property
    def partitioned(self) -> bool:
        return self.partition != "none" and self.num_partitions > 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataSpec:
        known = {f.name for f in fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise ConfigError(f"unknown data option(s) {unknown}; valid: {sorted(known)}")
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SiteData:
    """A site's embedded data, split into a training and a held-out part."""

    train: EmbeddedDataset
    test: EmbeddedDataset
    report: EmbedReport
    encoders: dict[str, dict[str, Any]]


_ENCODERS: dict[tuple[Any, ...], Encoder] = {}


def get_encoder(
    spec: str, *, modality: str, image_size: int | None = None, max_length: int = 128
) -> Encoder:
    """Load an encoder once per process (loading a model costs seconds; embedding reuses it)."""
    key = (spec, modality, image_size, max_length)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(
            spec, modality=modality, image_size=image_size, max_length=max_length
        )
    return _ENCODERS[key]


def _enabled(spec: str | None) -> bool:
    return bool(spec) and str(spec).lower() not in {"none", "off", "-"}


def load_site_dataset(spec: DataSpec) -> SiteDataset:
    """The raw dataset a spec names (built-in generator/loader or a manifest file)."""
    return load_dataset(
        spec.dataset,
        n=spec.n,
        seed=spec.seed,
        site=spec.site,
        task=spec.task,
        image_size=spec.image_size,
    )


def embed_site(
    spec: DataSpec, *, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR, progress: bool = False
) -> tuple[EmbeddedDataset, EmbedReport, dict[str, dict[str, Any]]]:
    """Embed the spec's dataset with its encoders through the site cache."""
    dataset = load_site_dataset(spec)
    image_encoder = text_encoder = None
    identities: dict[str, dict[str, Any]] = {}
    if dataset.images is not None and _enabled(spec.image_encoder):
        image_encoder = get_encoder(
            spec.image_encoder, modality="image", image_size=spec.encoder_image_size
        )
        identities["image"] = image_encoder.identity()
    if dataset.texts is not None and _enabled(spec.text_encoder):
        text_encoder = get_encoder(spec.text_encoder, modality="text", max_length=spec.max_length)
        identities["text"] = text_encoder.identity()
    embedded, report = embed_dataset(
        dataset,
        cache_dir=cache_dir,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        progress=progress,
    )
    return embedded, report, identities


def split_indices(
    n: int, labels: np.ndarray | None, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test indices, stratified by label when every class has >= 2 examples."""
    rng = np.random.default_rng(seed)
    if labels is not None and labels.size == n:
        train_parts, test_parts = [], []
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            n_test = round(len(members) * test_fraction) if len(members) >= 2 else 0
            test_parts.append(members[:n_test])
            train_parts.append(members[n_test:])
        return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))
    order = rng.permutation(n)
    n_test = max(1, round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def prepare_site_data(
    spec: DataSpec, *, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR, progress: bool = False
) -> SiteData:
    """Embed (cached) and split a site's data as ``spec`` says."""
    embedded, report, identities = embed_site(spec, cache_dir=cache_dir, progress=progress)
    train_idx, test_idx = split_indices(
        len(embedded), embedded.labels, test_fraction=spec.test_fraction, seed=spec.split_seed
    )
    return SiteData(embedded.subset(train_idx), embedded.subset(test_idx), report, identities)
