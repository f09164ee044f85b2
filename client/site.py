"""A site's embedded data as its manifest is now: from the process memory, the site's bundle, or by embedding.

Every load keys the data (``bundle_key``) by what it is a function of: the DataSpec, the dataset's
content as it is now (every row's fields, each image's content hash as the embedding cache keys it,
the classes and prompts) and the encoders' weight files. A bundle is stored under its key, so an
edited manifest, a replaced image or new model weights never serve the old data: the next load
embeds again (through the cache, so only what changed is encoded), and the superseded bundle of
the same spec is deleted. ``prune_bundles`` removes every bundle that is no longer current.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunSettings, SiteSettings
from common.data.dataset import ImageRef, SiteDataset
from common.embedding import EmbeddedDataset
from common.errors import FedEmbedError
from common.pipeline import DataSpec
from common.tensorfile import read_tensorfile, write_tensorfile

log = logging.getLogger(__name__)

BUNDLE_VERSION = 2
BUNDLE_DIR = "embeddings"  # under the site's state directory
BUNDLE_SUFFIX = ".safetensors"
_DOCUMENT_KEY = "fedembed"
_SPLITS = ("train", "test")


@dataclass
class Site:
    """What one site trains and evaluates on; nothing here ever leaves the site."""

    name: str
    spec: DataSpec
    train: EmbeddedDataset
    test: EmbeddedDataset
    encoders: dict[str, Any]
    source: str  # "memory", "bundle" or "embedded": where this process got the data from


@dataclass(frozen=True)
class BundleKey:
    """What a site's embedded data is a function of; ``name`` names its bundle file."""

    spec: str  # digest of DataSpec.to_dict()
    content: str  # dataset_fingerprint of the site's dataset
    encoders: dict[str, dict[str, Any]]  # modality -> the code version and weights of its encoder

    @property
    def name(self) -> str:
        return f"{self.spec}-{_digest({'content': self.content, 'encoders': self.encoders})[:24]}"


_LOADED: dict[str, Site] = {}  # bundle path -> its data, for a long-lived process (site worker)


def bundle_key(spec: DataSpec, *, cache_dir: Path | None = None) -> BundleKey:
    """The key of the site's data as it is now, without loading a model or embedding anything.

    Reads the dataset (a manifest is parsed and each image file hashed) and fingerprints the
    weight files of the encoders it uses (``common.encoders.weight_files``; with the embedding
    cache ``cache_dir``, through its memo of the files' digests).
    """
    from common.cache import weight_digests_path
    from common.encoders import ENCODER_CODE_VERSION, fingerprint_files, weight_files
    from common.encoders.runtime import runtime_key
    from common.pipeline import encoder_specs, load_site_dataset

    dataset = load_site_dataset(spec)
    runtime = runtime_key(spec.encoder_precision, spec.encoder_device)
    memo = None if cache_dir is None else weight_digests_path(cache_dir)
    encoders = {
        modality: {
            "code_version": ENCODER_CODE_VERSION,
            "weights": fingerprint_files(weight_files(encoder), memo=memo),
            "runtime": runtime,
        }
        for modality, encoder in encoder_specs(spec, dataset).items()
    }
    return BundleKey(_digest(spec.to_dict())[:16], dataset_fingerprint(dataset), encoders)


def dataset_fingerprint(dataset: SiteDataset) -> str:
    """SHA-256 over every field of ``dataset`` (ids, texts, labels, sites, splits, classes, prompts,
    the rows left out, ...); an image counts by its content key, the embedding cache's key."""
    digest = hashlib.sha256()
    for item in fields(dataset):
        value = [item.name, getattr(dataset, item.name)]
        digest.update(json.dumps(value, default=_plain, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, ImageRef):
        return value.key
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"dataset_fingerprint: cannot fingerprint a {type(value).__name__}")


def _digest(document: Any) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def bundle_path(settings: SiteSettings, key: BundleKey) -> Path:
    """The site's bundle for ``key`` (one file, written atomically)."""
    return settings.state_path / BUNDLE_DIR / f"{key.name}{BUNDLE_SUFFIX}"


def load_site(settings: SiteSettings, run: RunSettings) -> Site:
    """The site's train/test embeddings as its data is now; only new data goes through an encoder.

    Each call keys the data (``bundle_key``). A long-lived process keeps the data of the current key
    in memory; a fresh per-message process reads the bundle of that key (no encoder is loaded);
    a new key embeds through the cache, writes its bundle and deletes the superseded one.
    """
    spec = settings.data_spec(run)
    key = bundle_key(spec, cache_dir=settings.cache_path)
    path = bundle_path(settings, key)
    memo = path.resolve()
    if str(memo) in _LOADED:
        return _LOADED[str(memo)]
    site = _read_bundle(path, settings.name, spec, key)
    if site is None:
        site, saved = _embed(settings, spec, key, path)
        if not saved:
            return site  # the data changed while it was embedded: not under this key
    for other in [k for k in _LOADED if _same_spec(Path(k), memo)]:
        del _LOADED[other]  # superseded: older content or encoders of this spec
    _LOADED[str(memo)] = replace(site, source="memory")
    return site


def _embed(settings: SiteSettings, spec: DataSpec, key: BundleKey, path: Path) -> tuple[Site, bool]:
    """Embed (through the cache) and save the bundle; False if the key moved meanwhile."""
    from common.pipeline import prepare_site_data  # heavy: transformers + encoders

    data = prepare_site_data(spec, cache_dir=settings.cache_path)
    for line in data.report.summary():  # skip-and-report mode (node-config on-bad-row)
        log.warning("site %s: %s", settings.name, line)
    site = Site(settings.name, spec, data.train, data.test, data.encoders, source="embedded")
    stamped = ("code_version", "weights")  # the key's other part, the runtime, is the spec's
    stamps = {m: {k: i[k] for k in stamped} for m, i in data.encoders.items()}
    wanted = {m: {k: e[k] for k in stamped} for m, e in key.encoders.items()}
    if stamps != wanted or bundle_key(spec, cache_dir=settings.cache_path) != key:
        log.warning(
            "site %s: its data or encoders changed while they were being embedded; no bundle "
            "saved (the next load embeds the data as it is then, from the cache)",
            settings.name,
        )
        return site, False
    _write_bundle(path, key, site)
    for other in path.parent.glob(f"*{BUNDLE_SUFFIX}"):
        if _same_spec(other, path) or "-" not in other.name:  # superseded, or an old format
            other.unlink(missing_ok=True)
            log.info("site %s: removed superseded bundle %s", settings.name, other.name)
    return site, True


def _same_spec(other: Path, path: Path) -> bool:
    """``other`` is another bundle of the same spec in the same directory as ``path``."""
    spec = path.name.split("-", 1)[0]
    return other != path and other.parent == path.parent and other.name.startswith(f"{spec}-")


def _write_bundle(path: Path, key: BundleKey, site: Site) -> None:
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {
        "version": BUNDLE_VERSION,
        "key": key.name,
        "spec": site.spec.to_dict(),
        "encoders": site.encoders,
    }
    for split, data in zip(_SPLITS, (site.train, site.test), strict=True):
        for item in fields(data):
            value = getattr(data, item.name)
            if isinstance(value, np.ndarray):
                tensors[f"{split}.{item.name}"] = np.ascontiguousarray(value)
            elif value is not None:
                meta[f"{split}.{item.name}"] = value
    write_tensorfile(path, tensors, key=_DOCUMENT_KEY, document=meta)


def _read_bundle(path: Path, name: str, spec: DataSpec, key: BundleKey) -> Site | None:
    if not path.exists():
        return None
    try:
        tensors, meta = read_tensorfile(path, key=_DOCUMENT_KEY)
        if meta.get("version") != BUNDLE_VERSION or meta.get("key") != key.name:
            return None
        train, test = (_split_from(tensors, meta, split, path) for split in _SPLITS)
    except (OSError, ValueError, KeyError, TypeError, FedEmbedError) as exc:
        log.warning("site bundle %s is unreadable (%s); re-embedding from the cache", path, exc)
        return None
    return Site(name, spec, train, test, meta["encoders"], source="bundle")


def _split_from(
    tensors: dict[str, np.ndarray], meta: dict[str, Any], split: str, path: Path
) -> EmbeddedDataset:
    values: dict[str, Any] = {}
    for item in fields(EmbeddedDataset):
        stored = f"{split}.{item.name}"
        if stored in tensors:
            values[item.name] = tensors[stored]
        elif stored in meta:
            values[item.name] = meta[stored]
    data = EmbeddedDataset(**values)
    data.validate(source=f"site bundle {path}")
    return data


@dataclass
class BundlePrune:
    """What ``prune_bundles`` kept and removed (or would remove, in a dry run)."""

    kept: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    bytes_removed: int = 0


def prune_bundles(
    state_dir: str | Path,
    keep: Callable[[DataSpec, dict[str, Any]], bool],
    *,
    dry_run: bool = False,
) -> BundlePrune:
    """Remove the site's bundles that are not current or that ``keep(spec, encoders)`` rejects.

    Current: its spec's data and encoders still have the key it is stored under (an edited
    manifest, a withdrawn row, new weights or an unreadable manifest make it stale). Leftovers
    of interrupted writes go too. ``dry_run`` only reports.
    """
    directory = Path(state_dir) / BUNDLE_DIR
    result = BundlePrune()
    if not directory.is_dir():
        return result
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if path.name.endswith(BUNDLE_SUFFIX) and _current(path, keep):
            result.kept.append(path)
            continue
        if not (path.name.endswith(BUNDLE_SUFFIX) or path.name.endswith(".tmp")):
            continue  # not ours
        result.removed.append(path)
        result.bytes_removed += path.stat().st_size
        if not dry_run:
            path.unlink(missing_ok=True)
    return result


def _current(path: Path, keep: Callable[[DataSpec, dict[str, Any]], bool]) -> bool:
    try:
        _, meta = read_tensorfile(path, key=_DOCUMENT_KEY)
        if meta.get("version") != BUNDLE_VERSION or f"{meta['key']}{BUNDLE_SUFFIX}" != path.name:
            return False
        spec = DataSpec.from_dict(meta["spec"])
        return keep(spec, dict(meta["encoders"])) and bundle_key(spec).name == meta["key"]
    except (OSError, ValueError, KeyError, TypeError, FedEmbedError) as exc:
        log.info("site bundle %s is stale or unreadable: %s", path, exc)
        return False
