"""Turn a site's dataset into frozen embeddings (through the cache): the only input heads ever see."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.cache import DEFAULT_SHARD_SIZE, CacheStats, EmbeddingCache, SupportsEmbed
from common.data.dataset import SiteDataset, SkippedRow, text_key
from common.data.manifest import ON_ERROR_CHOICES
from common.errors import ConfigError, DataError


@dataclass
class EmbeddedDataset:
    """Frozen embeddings of one dataset, aligned row by row with its ids.

    Attributes:
        image / text: float32 [n, d] per modality, or None when absent.
        labels: int class index per example (-1 = unlabelled), or None.
        class_names / prompts: the classes and the frozen text embedding [C, d_text] of each class's
            zero-shot prompt (None without a text encoder or prompts).
        classes_declared: the classes are public task metadata (``SiteDataset.classes_declared``).
        text_groups: int id per example, equal for identical texts (retrieval counts them as ties).
        splits: "train" or "test" per example (a manifest's ``split`` column), or None.
    """

    ids: list[str]
    image: np.ndarray | None = None
    text: np.ndarray | None = None
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    prompts: np.ndarray | None = None
    classes_declared: bool = False
    text_groups: np.ndarray | None = None
    splits: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dims(self) -> dict[str, int]:
        """Input dimension per modality present."""
        dims: dict[str, int] = {}
        if self.image is not None:
            dims["image"] = int(self.image.shape[1])
        if self.text is not None:
            dims["text"] = int(self.text.shape[1])
        return dims

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> EmbeddedDataset:
        """Rows at ``indices`` (prompts and classes are shared)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return EmbeddedDataset(
            ids=[self.ids[i] for i in idx],
            image=None if self.image is None else self.image[idx],
            text=None if self.text is None else self.text[idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
            prompts=self.prompts,
            classes_declared=self.classes_declared,
            text_groups=None if self.text_groups is None else self.text_groups[idx],
            splits=None if self.splits is None else [self.splits[i] for i in idx],
        )

    def marked_test_rows(self) -> np.ndarray:
        """Indices of the rows the manifest marks ``split = test`` (empty without the column)."""
        return np.array(
            [i for i, split in enumerate(self.splits or ()) if split == "test"], dtype=np.int64
        )

    def validate(self, *, source: str = "embeddings") -> None:
        """Raise DataError if shapes disagree or values are not finite."""
        n = len(self.ids)
        for name in ("image", "text"):
            array = getattr(self, name)
            if array is None:
                continue
            if array.ndim != 2 or array.shape[0] != n:
                raise DataError(
                    f"{source}: {name} embeddings have shape {array.shape}, expected ({n}, d)"
                )
            if not np.isfinite(array).all():
                raise DataError(f"{source}: {name} embeddings contain NaN or inf")
        if self.labels is not None and self.labels.shape != (n,):
            raise DataError(f"{source}: labels have shape {self.labels.shape}, expected ({n},)")


@dataclass
class EmbedReport:
    """What one embed_dataset call did: cache statistics per modality, and the rows it left out.

    ``skipped`` (skip-and-report mode) holds every unusable row with its reason: those dropped
    while reading the manifest and those whose image could not be decoded.
    """

    stats: dict[str, CacheStats] = field(default_factory=dict)
    skipped: list[SkippedRow] = field(default_factory=list)
    kept: int = 0

    @property
    def encoded(self) -> int:
        """How many inputs went through an encoder (0 on a fully cached re-run)."""
        return sum(s.misses for s in self.stats.values())

    def summary(self, *, limit: int = 5) -> list[str]:
        """Lines for a person: kept/skipped counts, then the first ``limit`` reasons."""
        if not self.skipped:
            return []
        lines = [f"kept {self.kept} rows, skipped {len(self.skipped)} bad rows:"]
        lines += [f"  {row.describe()}" for row in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return lines


def embed_dataset(
    dataset: SiteDataset,
    *,
    cache_dir: str | os.PathLike[str],
    image_encoder: SupportsEmbed | None = None,
    text_encoder: SupportsEmbed | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    on_bad_row: str = "raise",
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> tuple[EmbeddedDataset, EmbedReport]:
    """Embed every modality of ``dataset`` that has an encoder, reusing and filling the cache.

    Each image not cached yet is read, checked against its key and decoded once, one batch
    ahead of the encoder. An unreadable, truncated or changed file raises DataError naming its
    manifest line and field (``on_bad_row="raise"``; shards finished before it stay cached), or
    its row is left out and listed in ``report.skipped`` (``"skip"``), together with the rows
    the manifest reader skipped. The embeddings of the kept rows are those of a dataset holding
    only those rows.
    """
    if on_bad_row not in ON_ERROR_CHOICES:
        raise ConfigError(f"on-bad-row must be {' or '.join(ON_ERROR_CHOICES)}, got {on_bad_row!r}")
    cache = EmbeddingCache(cache_dir, shard_size=shard_size)
    image: np.ndarray | None = None
    stats: dict[str, CacheStats] = {}
    if dataset.images is not None and image_encoder is not None:
        image, stats["image"], dataset = _embed_images(
            dataset, cache, image_encoder, on_bad_row,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
    report = EmbedReport(stats=stats, skipped=list(dataset.skipped), kept=len(dataset))
    out = EmbeddedDataset(
        ids=list(dataset.ids),
        image=image,
        labels=None if dataset.labels is None else np.asarray(dataset.labels, dtype=np.int64),
        class_names=list(dataset.class_names),
        classes_declared=dataset.classes_declared,
        splits=None if dataset.splits is None else list(dataset.splits),
    )
    if dataset.texts is not None and text_encoder is not None:
        texts = dataset.texts
        keys = [text_key(t) for t in texts]
        out.text, report.stats["text"] = cache.embed(
            text_encoder,
            keys,
            lambda idx: [texts[i] for i in idx],
            batch_size=batch_size,
            progress=progress,
            desc=f"{dataset.name}: texts",
            sort_key=lambda i: -len(texts[i]),  # shards of similar length: less padding
        )
        out.text_groups = _group_ids(keys)
    if dataset.prompts and text_encoder is not None:
        prompts = dataset.prompts
        out.prompts, report.stats["prompts"] = cache.embed(
            text_encoder, [text_key(p) for p in prompts], lambda idx: [prompts[i] for i in idx]
        )
    if out.image is None and out.text is None:
        raise DataError(
            f"{dataset.name}: nothing to embed (modalities present: {dataset.modalities or 'none'}; "
            "give an image encoder for images and a text encoder for texts)"
        )
    out.validate(source=dataset.name)
    return out, report


def cache_keys(dataset: SiteDataset) -> set[str]:
    """Every cache key ``embed_dataset`` looks up for ``dataset``: its images, texts and class
    prompts (the same keys under every encoder)."""
    keys = {ref.key for ref in dataset.images or ()}
    keys.update(text_key(text) for text in [*(dataset.texts or ()), *dataset.prompts])
    return keys


def _embed_images(
    dataset: SiteDataset,
    cache: EmbeddingCache,
    encoder: SupportsEmbed,
    on_bad_row: str,
    *,
    batch_size: int | None,
    progress: bool,
) -> tuple[np.ndarray, CacheStats, SiteDataset]:
    """The dataset's image embeddings; in skip mode also the dataset without unreadable images."""
    images = dataset.images
    assert images is not None
    keys = [ref.key for ref in images]
    failed: dict[str, str] = {}  # image key -> why it could not be loaded

    def skip(position: int, error: DataError) -> None:
        failed[keys[position]] = _without_location(str(error), images[position].row)

    vectors, stats = cache.embed(
        encoder,
        keys,
        lambda idx: [images[i] for i in idx],  # loaded by the encoder, one batch ahead
        batch_size=batch_size,
        progress=progress,
        desc=f"{dataset.name}: images",
        on_error=skip if on_bad_row == "skip" else None,
    )
    if not failed:
        return vectors, stats, dataset
    keep = [i for i, key in enumerate(keys) if key not in failed]
    skipped = [
        SkippedRow(row=images[i].row, id=dataset.ids[i], reason=failed[key])
        for i, key in enumerate(keys)
        if key in failed
    ]
    if not keep:
        raise DataError(
            f"{dataset.name}: no readable images ({len(skipped)} skipped; first: {skipped[0].describe()})"
        )
    kept = dataset.subset(keep)
    kept.skipped = [*dataset.skipped, *skipped]
    return vectors[keep], stats, kept


def _without_location(message: str, row: int | None) -> str:
    """``message`` after its "<manifest> line N " prefix (a SkippedRow names its line itself)."""
    location = f" line {row} "
    return message.split(location, 1)[1] if row is not None and location in message else message


def _group_ids(keys: Sequence[Any]) -> np.ndarray:
    """Dense int id per distinct key, in order of first appearance."""
    ids: dict[Any, int] = {}
    return np.fromiter((ids.setdefault(k, len(ids)) for k in keys), dtype=np.int64, count=len(keys))
