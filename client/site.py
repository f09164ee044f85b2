"""A site's embedded data, loaded once: from the process cache, the site's bundle file, or by embedding."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSettings, SiteSettings
from common.embedding import EmbeddedDataset
from common.errors import CacheError
from common.pipeline import DataSpec
from common.tensorfile import read_tensorfile, write_tensorfile

log = logging.getLogger(__name__)

BUNDLE_VERSION = 1


@dataclass
class Site:
    """What one site trains and evaluates on; nothing here ever leaves the site."""

    name: str
    spec: DataSpec
    train: EmbeddedDataset
    test: EmbeddedDataset
    encoders: dict[str, Any]
    source: str  # "memory", "bundle" or "embedded": where this process got the data from


_LOADED: dict[str, Site] = {}


def bundle_path(settings: SiteSettings, spec: DataSpec) -> Path:
    """The site's embedded-data bundle for ``spec`` (one file, memory-mappable, atomic)."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:20]
    return settings.state_path / "embeddings" / f"{digest}.safetensors"


def load_site(settings: SiteSettings, run: RunSettings) -> Site:
    """The site's train/test embeddings, computing them (through the embedding cache) only once.

    A long-lived process keeps them in memory; a fresh per-message process reads the bundle file
    (no encoder is loaded, no dataset is read); only the very first call embeds.
    """
    spec = settings.data_spec(run)
    path = bundle_path(settings, spec)
    key = str(path.resolve())
    if key in _LOADED:
        return _LOADED[key]
    site = _read_bundle(path, settings.name, spec)
    if site is None:
        from common.pipeline import prepare_site_data  # heavy: transformers + encoders

        data = prepare_site_data(spec, cache_dir=settings.cache_path)
        for line in data.report.summary():  # skip-and-report mode (node-config on-bad-row)
            log.warning("site %s: %s", settings.name, line)
        _write_bundle(path, data.train, data.test, data.encoders)
        site = Site(settings.name, spec, data.train, data.test, data.encoders, source="embedded")
    _LOADED[key] = Site(site.name, spec, site.train, site.test, site.encoders, source="memory")
    return site


def _write_bundle(
    path: Path, train: EmbeddedDataset, test: EmbeddedDataset, encoders: dict[str, Any]
) -> None:
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"version": BUNDLE_VERSION, "encoders": encoders}
    for split, data in (("train", train), ("test", test)):
        meta[f"{split}.ids"] = data.ids
        meta["class_names"] = data.class_names
        for field in ("image", "text", "labels", "text_groups"):
            value = getattr(data, field)
            if value is not None:
                tensors[f"{split}.{field}"] = np.ascontiguousarray(value)
        if data.prompts is not None:
            tensors["prompts"] = np.ascontiguousarray(data.prompts)
    write_tensorfile(path, tensors, key="fedembed", document=meta)


def _read_bundle(path: Path, name: str, spec: DataSpec) -> Site | None:
    if not path.exists():
        return None
    try:
        tensors, meta = read_tensorfile(path, key="fedembed")
        if meta.get("version") != BUNDLE_VERSION:
            return None
        splits = [_split_from(tensors, meta, split) for split in ("train", "test")]
    except (OSError, ValueError, KeyError, TypeError, CacheError) as exc:
        log.warning("site bundle %s is unreadable (%s); re-embedding from the cache", path, exc)
        return None
    return Site(name, spec, splits[0], splits[1], meta["encoders"], source="bundle")


def _split_from(
    tensors: dict[str, np.ndarray], meta: dict[str, Any], split: str
) -> EmbeddedDataset:
    data = EmbeddedDataset(
        ids=list(meta[f"{split}.ids"]),
        image=tensors.get(f"{split}.image"),
        text=tensors.get(f"{split}.text"),
        labels=tensors.get(f"{split}.labels"),
        class_names=list(meta["class_names"]),
        prompts=tensors.get("prompts"),
        text_groups=tensors.get(f"{split}.text_groups"),
    )
    data.validate(source="site bundle")
    return data
