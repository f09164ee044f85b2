"""Fingerprints of model weight files: what an encoder's identity and a site's data bundle record."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from common.atomic import sha256_file

_FULL_HASH_LIMIT = 1 << 30  # weight files up to 1 GiB are hashed in full ...

_EDGE_BYTES = 1 << 20  # ... larger ones by size + mtime + their first and last MiB


def fingerprint_files(files: Sequence[Path]) -> str:
    """SHA-256 over the names and contents of ``files``.

    Files up to 1 GiB are hashed in full; larger ones by size, mtime and their first and last
    MiB (fast for multi-GB LLM shards, and still changes when a file is replaced).
    """
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(
            path.name.encode("utf-8") + b"\0" + _file_digest(path).encode("ascii") + b"\0"
        )
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size <= _FULL_HASH_LIMIT:
        return sha256_file(path)
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(-_EDGE_BYTES, 2)
        digest.update(handle.read(_EDGE_BYTES))
    return "partial:" + digest.hexdigest()
