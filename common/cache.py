"""Site-local embedding cache: each input is encoded once per encoder, stored in memory-mappable shards.

Layout under the cache root::

    <root>/<encoder-fingerprint>/encoder.json        the encoder's identity (what the key hashes)
    <root>/<encoder-fingerprint>/shards/<id>.npy     float32 [m, dim] embeddings of m inputs
    <root>/<encoder-fingerprint>/shards/<id>.json    {"keys": [...], "sha256": ..., "dim": ..., "count": ...}
    <root>/<encoder-fingerprint>/loads/<id>.json     {"load": {...}}: a load that gave this encoder
    <root>/weight-digests.json                        weight files' SHA-256 by path and stat (a memo)

An entry is keyed by the encoder's identity (model, weights fingerprint, pooling, preprocessing) and
the content hash of the input, so a changed file or a changed encoder is never served a stale vector.
New embeddings are computed in chunks; each chunk is written as a shard (the ``.npy`` first, then its
``.json`` index, both atomically), so an interrupted run keeps every finished chunk and resumes from
there, even after ``kill -9``: a shard whose ``.json`` was never written is not part of the
cache, and the resumed run rewrites the same chunk under the same name. Each shard's SHA-256 is
checked the first time it is read; a corrupt shard is moved aside (``*.corrupt``), reported, and
recomputed. ``EmbeddingCache.verify()`` checks every shard without changing anything;
``EmbeddingCache.prune(keep)`` deletes every entry whose key is not kept (a withdrawn patient's),
rewriting shards with the same commit order.

A load record names what was asked for (spec, modality, sizes, weight-file fingerprint) when a
model gave this identity, so a later process that finds everything cached knows the encoder
without loading the model (``recorded_encoder``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.atomic import atomic_open, atomic_write_json, sha256_file
from common.errors import CacheError, DataError

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 512
_STALE_TMP_SECONDS = 3600.0


class SupportsEmbed(Protocol):
    """What the cache needs from an encoder (see common.encoders.Encoder)."""

    dim: int

    def identity(self) -> dict[str, Any]: ...

    def embed(
        self,
        items: Sequence[Any],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        on_error: Callable[[int, DataError], None] | None = None,
    ) -> np.ndarray: ...


@dataclass
class CacheStats:
    """What one cache lookup did: hits served from disk, misses encoded now, shards repaired."""

    hits: int = 0
    misses: int = 0
    shards_written: int = 0
    corrupt_shards: list[str] = field(default_factory=list)


@dataclass
class CacheCheck:
    """What ``EmbeddingCache.verify`` found: committed shards, and anything that is not one."""

    shards: int = 0
    entries: int = 0
    corrupt: list[str] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every committed shard matches its checksum, shape and dtype."""
        return not self.corrupt


@dataclass
class PruneReport:
    """What ``EmbeddingCache.prune`` removed (or would remove, in a dry run) and kept."""

    entries_kept: int = 0
    entries_removed: int = 0
    shards_rewritten: int = 0  # rewritten without their removed entries
    shards_removed: int = 0  # every entry removed, or corrupt
    encoders_removed: int = 0  # encoder directories left without entries, or not kept
    leftovers_removed: int = 0  # corrupt, uncommitted and temporary files
    bytes_freed: int = 0


def encoder_fingerprint(identity: dict[str, Any]) -> str:
    """Stable short hash of an encoder identity (JSON with sorted keys)."""
    payload = json.dumps(
        {"identity": identity, "cache_format": CACHE_FORMAT_VERSION}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def _load_name(load: dict[str, Any]) -> str:
    payload = json.dumps(load, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def weight_digests_path(root: str | os.PathLike[str]) -> Path:
    """The memo of the encoders' weight-file digests (``fingerprint_files``'s ``memo``) in the
    cache at ``root``: a cached re-run in a new process does not hash the weights again."""
    return Path(root) / "weight-digests.json"


class EmbeddingCache:
    """Embeddings of one site's inputs for any number of encoders, under one directory."""

    def __init__(
        self, root: str | os.PathLike[str], *, shard_size: int = DEFAULT_SHARD_SIZE
    ) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root = Path(root)
        self.shard_size = shard_size
        self._verified: set[Path] = set()

    @property
    def weight_digests(self) -> Path:
        """Where the encoders' weight-file digests are remembered (``weight_digests_path``)."""
        return weight_digests_path(self.root)

    # ------------------------------------------------------------------ public API
    def record_encoder(self, load: dict[str, Any], encoder: SupportsEmbed) -> None:
        """Remember that the load described by ``load`` (JSON values) gave ``encoder``."""
        directory = self._encoder_dir(encoder)
        atomic_write_json(directory / "loads" / f"{_load_name(load)}.json", {"load": load})

    def recorded_encoder(self, load: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
        """The identity and output size a load described by ``load`` gave before, if recorded
        here (a record whose encoder directory does not match its identity is ignored)."""
        wanted = json.loads(json.dumps(load))
        for path in sorted(self.root.glob(f"*/loads/{_load_name(load)}.json")):
            directory = path.parent.parent
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))["load"]
                meta = json.loads((directory / "encoder.json").read_text(encoding="utf-8"))
                identity, dim = meta["identity"], int(meta["dim"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if saved == wanted and encoder_fingerprint(identity) == directory.name:
                return identity, dim
        return None

    def embed(
        self,
        encoder: SupportsEmbed,
        keys: Sequence[str],
        load_items: Callable[[list[int]], Sequence[Any]],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        desc: str = "embedding",
        on_error: Callable[[int, DataError], None] | None = None,
        sort_key: Callable[[int], Any] | None = None,
    ) -> tuple[np.ndarray, CacheStats]:
        """Return float32 embeddings [len(keys), dim] for ``keys``, encoding only the missing ones.

        ``load_items(indices)`` returns the encoder's inputs at those positions of ``keys`` (texts,
        image arrays, or objects the encoder loads lazily, e.g. ``ImageRef``); it is called only
        for inputs that are not cached yet, one shard at a time. With ``on_error``, an input
        whose loading raises DataError is reported as ``on_error(position, error)``, is not
        cached, and its rows (every position of its key) are NaN. With ``sort_key``, the missing
        inputs are encoded (and sharded) in ascending ``sort_key(position)`` order, so that each
        shard, and each of the encoder's batches within it, holds similar inputs (texts of
        similar length pad less); the result's row order is ``keys``' either way.
        """
        stats = CacheStats()
        directory = self._encoder_dir(encoder)
        index = self._load_index(directory, stats)
        missing = _unique_missing(keys, index)
        if sort_key is not None:
            missing.sort(key=sort_key)
        missing_keys = {keys[i] for i in missing}
        stats.misses = len(missing)
        stats.hits = sum(1 for key in keys if key not in missing_keys)
        if missing:
            self._compute_missing(
                encoder, keys, missing, load_items, directory, index, stats,
                batch_size=batch_size, progress=progress, desc=desc, on_error=on_error,
            )  # fmt: skip
        return self._gather(directory, keys, index, encoder.dim), stats

    def contains(self, encoder: SupportsEmbed, keys: Sequence[str]) -> bool:
        """True if every key is cached for this encoder (no shard is read)."""
        return not self.missing(encoder, keys)

    def missing(self, encoder: SupportsEmbed, keys: Sequence[str]) -> list[int]:
        """Positions of ``keys`` not cached for this encoder (no shard is read or changed)."""
        index = self._load_index(self._encoder_dir(encoder), CacheStats(), verify=False)
        return [position for position, key in enumerate(keys) if key not in index]

    def verify(self) -> CacheCheck:
        """Check every committed shard of every encoder (checksum, dtype, shape); change nothing.

        ``uncommitted`` lists data files without an index and temporary files: what a killed
        writer leaves; they are never read, and are rewritten or cleaned up by later runs.
        """
        check = CacheCheck()
        for shards in sorted(self.root.glob("*/shards")):
            for meta_path in sorted(shards.glob("*.json")):
                npy_path = meta_path.with_suffix(".npy")
                try:
                    meta = json.loads(meta_path.read_text(encoding="utf-8"))
                    keys = meta["keys"]
                    valid = self._shard_ok(npy_path, meta, remember=False)
                except (OSError, ValueError, KeyError, TypeError):
                    valid = False
                if not valid:
                    check.corrupt.append(str(meta_path))
                    continue
                check.shards += 1
                check.entries += len(keys)
            check.uncommitted += [
                str(path)
                for path in sorted(shards.iterdir())
                if path.name.endswith(".tmp")
                or (path.suffix == ".npy" and not path.with_suffix(".json").exists())
            ]
        return check

    def prune(
        self,
        keep: Container[str],
        *,
        keep_encoder: Callable[[dict[str, Any]], bool] | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Remove every entry whose key is not in ``keep``, and every encoder directory whose
        identity ``keep_encoder`` rejects (None: keep every encoder).

        A shard holding some kept entries is rewritten with only those (the new shard is
        committed before the old one's index, then its data, is deleted: a crash in between
        leaves every kept entry readable and the next prune finishes the job). Corrupt,
        uncommitted and temporary files hold data too and are removed, whatever their age: run
        it while nothing embeds into this cache. ``dry_run`` changes nothing.
        """
        report = PruneReport()
        directories = (
            sorted(path for path in self.root.iterdir() if (path / "shards").is_dir())
            if self.root.is_dir()
            else []
        )
        for directory in directories:
            identity = _read_identity(directory)
            if keep_encoder is not None and (identity is None or not keep_encoder(identity)):
                self._remove_encoder(directory, report, dry_run=dry_run)
                continue
            kept = sum(
                self._prune_shard(meta_path, keep, report, dry_run=dry_run)
                for meta_path in sorted((directory / "shards").glob("*.json"))
            )
            self._remove_leftovers(directory / "shards", report, dry_run=dry_run)
            report.entries_kept += kept
            if not kept:  # nothing left but its identity
                report.encoders_removed += 1
                report.bytes_freed += _size(directory / "encoder.json")
                if not dry_run:
                    shutil.rmtree(directory, ignore_errors=True)
        return report

    # ------------------------------------------------------------------ internals
    def _prune_shard(
        self, meta_path: Path, keep: Container[str], report: PruneReport, *, dry_run: bool
    ) -> int:
        """Prune one committed shard; return how many entries it keeps."""
        npy_path = meta_path.with_suffix(".npy")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            keys = list(meta["keys"])
            valid = self._shard_ok(npy_path, meta, remember=False)
        except (OSError, ValueError, KeyError, TypeError):
            keys, valid = [], False
        rows = [row for row, key in enumerate(keys) if key in keep] if valid else []
        if valid and len(rows) == len(keys):
            return len(rows)
        report.entries_removed += len(keys) - len(rows)
        before = _size(meta_path) + _size(npy_path)
        if rows:
            report.shards_rewritten += 1
            kept_bytes = int(before * len(rows) / len(keys))  # a dry run's estimate
            if not dry_run:
                vectors = np.load(npy_path, mmap_mode="r")[rows]
                written = self._write_shard(
                    meta_path.parent.parent, [keys[r] for r in rows], vectors
                )
                kept_bytes = _size(written) + _size(written.with_suffix(".json"))
            report.bytes_freed += before - kept_bytes
        else:
            report.shards_removed += 1
            report.bytes_freed += before
        if not dry_run:
            meta_path.unlink(missing_ok=True)  # the commit marker first: never a half shard
            npy_path.unlink(missing_ok=True)
            self._verified.discard(npy_path)
        return len(rows)

    def _remove_leftovers(self, shards: Path, report: PruneReport, *, dry_run: bool) -> None:
        for path in sorted(shards.iterdir()):
            uncommitted = path.suffix == ".npy" and not path.with_suffix(".json").exists()
            if uncommitted or path.name.endswith((".tmp", ".corrupt")):
                report.leftovers_removed += 1
                report.bytes_freed += _size(path)
                if not dry_run:
                    path.unlink(missing_ok=True)

    def _remove_encoder(self, directory: Path, report: PruneReport, *, dry_run: bool) -> None:
        """Remove an encoder directory: the shards' indexes first, then everything else."""
        shards = directory / "shards"
        for meta_path in sorted(shards.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                report.entries_removed += len(json.loads(meta_path.read_text("utf-8"))["keys"])
            report.shards_removed += 1
        report.encoders_removed += 1
        files = sorted(path for path in directory.rglob("*") if path.is_file())
        report.bytes_freed += sum(_size(path) for path in files)
        if dry_run:
            return
        for path in sorted(files, key=lambda p: p.suffix != ".json"):
            path.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def _encoder_dir(self, encoder: SupportsEmbed) -> Path:
        identity = encoder.identity()
        directory = self.root / encoder_fingerprint(identity)
        meta = directory / "encoder.json"
        if not meta.exists():
            atomic_write_json(meta, {"identity": identity, "dim": encoder.dim})
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(directory / "shards")
        return directory

    def _load_index(
        self, directory: Path, stats: CacheStats, *, verify: bool = True
    ) -> dict[str, tuple[Path, int] | None]:
        """Map key -> (shard .npy, row) over every committed shard (one with its .json written);
        ``embed`` marks a key whose input failed to load with None."""
        index: dict[str, tuple[Path, int] | None] = {}
        shards = directory / "shards"
        if not shards.exists():
            return index
        for meta_path in sorted(shards.glob("*.json")):
            npy_path = meta_path.with_suffix(".npy")
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                keys = meta["keys"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._quarantine(meta_path, npy_path, f"unreadable index ({exc})", stats)
                continue
            if verify and not self._shard_ok(npy_path, meta):
                self._quarantine(meta_path, npy_path, "checksum mismatch or missing data", stats)
                continue
            for row, key in enumerate(keys):
                index.setdefault(key, (npy_path, row))
        return index

    def _shard_ok(self, npy_path: Path, meta: dict[str, Any], *, remember: bool = True) -> bool:
        if remember and npy_path in self._verified:
            return True
        if not npy_path.exists() or sha256_file(npy_path) != meta.get("sha256"):
            return False
        try:
            array = np.load(npy_path, mmap_mode="r")
        except (OSError, ValueError):
            return False
        if array.dtype != np.float32 or array.shape != (len(meta["keys"]), meta.get("dim")):
            return False
        if remember:
            self._verified.add(npy_path)
        return True

    def _quarantine(self, meta_path: Path, npy_path: Path, reason: str, stats: CacheStats) -> None:
        log.warning(
            "embedding cache: shard %s is corrupt (%s); it will be recomputed",
            meta_path.stem,
            reason,
        )
        stats.corrupt_shards.append(meta_path.stem)
        for path in (meta_path, npy_path):
            if path.exists():
                os.replace(path, path.with_name(path.name + ".corrupt"))

    def _compute_missing(
        self,
        encoder: SupportsEmbed,
        keys: Sequence[str],
        missing: list[int],
        load_items: Callable[[list[int]], Sequence[Any]],
        directory: Path,
        index: dict[str, tuple[Path, int] | None],
        stats: CacheStats,
        *,
        batch_size: int | None,
        progress: bool,
        desc: str,
        on_error: Callable[[int, DataError], None] | None,
    ) -> None:
        bar = _progress_bar(len(missing), desc) if progress else None
        chunk: list[int] = []
        failed: set[int] = set()  # rows of the current chunk whose input failed to load

        def report(row: int, error: DataError) -> None:
            failed.add(row)
            assert on_error is not None
            on_error(chunk[row], error)

        try:
            for start in range(0, len(missing), self.shard_size):
                chunk = missing[start : start + self.shard_size]
                failed.clear()
                items = load_items(chunk)
                if len(items) != len(chunk):
                    raise CacheError(
                        f"load_items returned {len(items)} items for {len(chunk)} indices"
                    )
                vectors = np.ascontiguousarray(
                    encoder.embed(
                        items, batch_size=batch_size, on_error=None if on_error is None else report
                    ),
                    dtype=np.float32,
                )
                kept = [row for row in range(len(chunk)) if row not in failed]
                if failed:
                    vectors = vectors[kept]
                _check_vectors(vectors, len(kept), encoder.dim)
                for row in failed:
                    index[keys[chunk[row]]] = None  # not cached: its rows come out NaN
                if kept:
                    chunk_keys = [keys[chunk[row]] for row in kept]
                    npy_path = self._write_shard(directory, chunk_keys, vectors)
                    for row, key in enumerate(chunk_keys):
                        index[key] = (npy_path, row)
                    stats.shards_written += 1
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()

    def _write_shard(self, directory: Path, keys: list[str], vectors: np.ndarray) -> Path:
        shard_id = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:20]
        npy_path = directory / "shards" / f"{shard_id}.npy"
        with atomic_open(npy_path, "wb") as handle:
            np.save(handle, vectors, allow_pickle=False)
        meta = {
            "keys": keys,
            "sha256": sha256_file(npy_path),
            "dim": int(vectors.shape[1]),
            "count": len(keys),
            "created": time.time(),
        }
        atomic_write_json(npy_path.with_suffix(".json"), meta)  # the commit marker, written last
        self._verified.add(npy_path)
        return npy_path

    def _gather(
        self,
        directory: Path,
        keys: Sequence[str],
        index: dict[str, tuple[Path, int] | None],
        dim: int,
    ) -> np.ndarray:
        out = np.empty((len(keys), dim), dtype=np.float32)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            if key not in index:
                raise CacheError(
                    f"embedding cache {directory}: key {key[:12]}... missing after encoding"
                )
            entry = index[key]
            if entry is None:  # its input failed to load (on_error)
                out[position] = np.nan
                continue
            npy_path, row = entry
            by_shard.setdefault(npy_path, []).append((position, row))
        for npy_path, pairs in by_shard.items():
            shard = np.load(npy_path, mmap_mode="r")
            if shard.shape[1] != dim:
                raise CacheError(
                    f"embedding cache shard {npy_path} has dim {shard.shape[1]}, encoder dim {dim}"
                )
            positions = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
            rows = np.fromiter((r for _, r in pairs), dtype=np.int64, count=len(pairs))
            out[positions] = shard[rows]
        return out


def _read_identity(directory: Path) -> dict[str, Any] | None:
    """The identity in an encoder directory's encoder.json (None if missing or unreadable)."""
    try:
        identity = json.loads((directory / "encoder.json").read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return identity if isinstance(identity, dict) else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unique_missing(keys: Sequence[str], index: dict[str, tuple[Path, int] | None]) -> list[int]:
    """Positions of the first occurrence of each key that is not cached."""
    seen: set[str] = set()
    missing: list[int] = []
    for position, key in enumerate(keys):
        if key not in index and key not in seen:
            seen.add(key)
            missing.append(position)
    return missing


def _check_vectors(vectors: np.ndarray, count: int, dim: int) -> None:
    if vectors.shape != (count, dim):
        raise CacheError(f"encoder returned shape {vectors.shape}, expected ({count}, {dim})")
    if not np.isfinite(vectors).all():
        raise CacheError("encoder returned non-finite embeddings (NaN or inf); nothing was cached")


def _remove_stale_tmp(directory: Path) -> None:
    """Delete what a killed writer left (old enough not to belong to a live one): temporary files,
    and shard data whose index was never written (never read: the index is the commit marker)."""
    now = time.time()
    orphans = [npy for npy in directory.glob("*.npy") if not npy.with_suffix(".json").exists()]
    for leftover in [*directory.glob(".*.tmp"), *orphans]:
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                leftover.unlink()
        except OSError:
            continue


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False)
