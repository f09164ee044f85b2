"""Fingerprints of model weight files: what an encoder's identity and a site's data bundle record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from common.atomic import atomic_write_json, sha256_file

_FULL_HASH_LIMIT = 1 << 30  # weight files up to 1 GiB are hashed in full ...

_EDGE_BYTES = 1 << 20  # ... larger ones by size + mtime + their first and last MiB

_DIGESTS: dict[str, str] = {}
"""This process's file digests, by ``_stat_key``: a file is hashed once per version."""

_IN_MEMO: dict[str, set[str]] = {}
"""The keys this process read from or wrote to each memo file: while every file's key is known
here and there, the memo is neither read nor written."""

_DIGEST = re.compile(r"(partial:)?[0-9a-f]{64}")

_SETTLED_NS = 2_000_000_000
"""A digest is remembered only for a file last changed this long before it was hashed: file
times tick in jiffies (milliseconds), so a file rewritten at once at the same size could keep its
stat key ("racy git"); one that old is not being written."""


def fingerprint_files(files: Sequence[Path], *, memo: Path | None = None) -> str:
    """SHA-256 over the names and contents of ``files``.

    Files up to 1 GiB are hashed in full; larger ones by size, mtime and their first and last
    MiB (fast for multi-GB LLM shards, and still changes when a file is replaced). The digest
    of a file unchanged for ``_SETTLED_NS`` is reused while its path, inode, size, mtime and
    ctime stay the same (ctime changes on every write and cannot be set back; git's index relies
    on the same): within the process, and across processes through the JSON file ``memo`` when
    given (the embedding cache keeps one; read only when this process does not know that a file's
    digest is in it, and rewritten without the older versions of the files it adds).
    """
    versions = [(path, *_stat_key(path)) for path in sorted(files, key=lambda p: p.name)]
    in_memo = _IN_MEMO.setdefault(str(memo), set()) if memo is not None else set()
    settled_keys = {key for _, key, _, settled in versions if settled}
    unknown = any(key not in _DIGESTS for key in settled_keys) or not settled_keys <= in_memo
    known = _read_memo(memo) if memo is not None and unknown else {}
    if memo is not None and unknown:
        in_memo.intersection_update(known)  # what the file holds now (another writer may differ)
    fresh: dict[str, str] = {}
    digest = hashlib.sha256()
    for path, key, stat, settled in versions:
        value = (_DIGESTS.get(key) or known.get(key)) if settled else None
        if value is None:
            value = _file_digest(path, stat)
        if settled:
            _DIGESTS[key] = value
            if key not in known and key not in in_memo:
                fresh[key] = value
        digest.update(path.name.encode("utf-8") + b"\0" + value.encode("ascii") + b"\0")
    if memo is not None and fresh:
        replaced = {_memo_path(key) for key in fresh}
        kept = {k: v for k, v in known.items() if _memo_path(k) not in replaced}
        # a read-only cache still fingerprints; it only cannot remember
        with contextlib.suppress(OSError):
            atomic_write_json(memo, {**kept, **fresh})
            in_memo.update(fresh)
    if memo is not None:
        in_memo.update(key for key in settled_keys if key in known)
    return digest.hexdigest()


def forget_digests() -> None:
    """Drop this process's remembered digests (as a new process starts; the memo files stay)."""
    _DIGESTS.clear()
    _IN_MEMO.clear()


def _stat_key(path: Path) -> tuple[str, os.stat_result, bool]:
    """The file's version key, its stat, and whether it last changed ``_SETTLED_NS`` ago or
    more."""
    stat = path.stat()
    key = f"{os.path.realpath(path)}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    return key, stat, time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) >= _SETTLED_NS


def _memo_path(key: str) -> str:
    """The file path of a version key (``_stat_key``: the path, then four numbers)."""
    return key.rsplit(":", 4)[0]


def _read_memo(memo: Path) -> dict[str, str]:
    try:
        values = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: hash again (and rewrite it)
        return {}
    if not isinstance(values, dict):
        return {}
    return {str(k): v for k, v in values.items() if isinstance(v, str) and _DIGEST.fullmatch(v)}


def _file_digest(path: Path, stat: os.stat_result) -> str:
    if stat.st_size <= _FULL_HASH_LIMIT:
        return sha256_file(path)
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(-_EDGE_BYTES, 2)
        digest.update(handle.read(_EDGE_BYTES))
    return "partial:" + digest.hexdigest()
