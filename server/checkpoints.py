"""The coordinator's run directory: per-round checkpoints, metrics history, the final exported head."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.atomic import append_line, atomic_write_json, atomic_write_text
from common.digest import payload_digest
from common.errors import ConfigError
from common.tensorfile import read_tensorfile, write_tensorfile

if TYPE_CHECKING:
    from common.training import HeadModel

_CHECKPOINT = re.compile(r"round-(\d{4,})\.safetensors$")
# The arrays' SHA-256, kept in a checkpoint's document: safetensors has no checksum of its own, so
# flipped bytes in the data would otherwise load as a different head.
_DIGEST = "arrays-sha256"


@dataclass
class Checkpoint:
    """The global head after ``round`` completed rounds."""

    round: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class RunStore:
    """Files of one federated run under ``run_dir``::

    run.json                      the run's settings and the head's description
    checkpoints/round-NNNN.safetensors   global head after round N (atomic; round 0 = initial)
    checkpoints/server-state/round-NNNN.safetensors   FedAdam/FedYogi/FedAvgM state after round N
    history.jsonl                 one JSON line per completed round (sites, bytes, times, metrics)
    final/head.safetensors, final/head.json   the exported head, loadable by `fedembed evaluate`
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir)
        self.checkpoints = self.root / "checkpoints"
        self.history = self.root / "history.jsonl"

    def archive_previous(self) -> Path | None:
        """Move an earlier run's files aside (a fresh run in the same run-dir loses nothing)."""
        if not (self.history.exists() or self.checkpoints.exists()):
            return None
        stamp = f"{self.root.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        target = self.root.with_name(stamp)
        suffix = 1
        while True:  # two archives in one second each get their own directory, never a merge
            try:
                target.mkdir(parents=True)
                break
            except FileExistsError:
                suffix += 1
                target = self.root.with_name(f"{stamp}-{suffix}")
        for child in list(self.root.iterdir()):
            os.replace(child, target / child.name)
        return target

    def start_fresh(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Archive an earlier run in this run-dir, then checkpoint the initial head as round 0."""
        archived = self.archive_previous()
        if archived is not None:
            print(f"[fedembed] an earlier run in {self.root} was moved to {archived}", flush=True)
        self.save_checkpoint(0, arrays, meta)

    def export_final(
        self, model: HeadModel, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]
    ) -> Path:
        """Load ``arrays`` into ``model`` and export it (head + config) to ``<run-dir>/final``."""
        from common.artifacts import load_state_arrays, save_head

        load_state_arrays(model, arrays, source="final global head")
        path = save_head(self.root / "final", model, metadata=metadata)
        print(f"[fedembed] final head exported to {path}", flush=True)
        return path

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        atomic_write_json(self.root / "run.json", dict(info))

    def save_checkpoint(
        self, server_round: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> Path:
        path = self.checkpoints / f"round-{server_round:04d}.safetensors"
        write_tensorfile(
            path, arrays, key="meta", document={**meta, _DIGEST: arrays_digest(arrays)}
        )
        return path

    def save_server_state(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """The server optimiser's state after ``server_round`` (server/strategy/state.py), if any.

        Written before that round's checkpoint: a checkpoint implies its state.
        """
        if arrays:
            path = self.checkpoints / "server-state" / f"round-{server_round:04d}.safetensors"
            write_tensorfile(path, arrays, key="meta", document={_DIGEST: arrays_digest(arrays)})

    def load_server_state(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The state saved with checkpoint ``server_round`` (None: none saved, or unreadable)."""
        path = self.checkpoints / "server-state" / f"round-{server_round:04d}.safetensors"
        try:
            return self.load_checkpoint(path, server_round).arrays
        except ConfigError:
            return None

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint (a corrupt newest one is skipped, with the next older used)."""
        if not self.checkpoints.exists():
            return None
        candidates = sorted(
            (int(m.group(1)), p)
            for p in self.checkpoints.iterdir()
            if (m := _CHECKPOINT.search(p.name))
        )
        for server_round, path in reversed(candidates):
            try:
                return self.load_checkpoint(path, server_round)
            except ConfigError:
                continue
        return None

    @staticmethod
    def load_checkpoint(path: Path, server_round: int) -> Checkpoint:
        try:
            arrays, meta = read_tensorfile(path, key="meta")
        except ValueError as exc:
            raise ConfigError(f"checkpoint {path} is unreadable: {exc}") from exc
        recorded = meta.pop(_DIGEST, None) if isinstance(meta, dict) else None
        if recorded is not None and recorded != arrays_digest(arrays):  # None: an older checkpoint
            raise ConfigError(
                f"checkpoint {path} is corrupt: its arrays do not match their SHA-256"
            )
        return Checkpoint(round=server_round, arrays=dict(arrays), meta=meta)

    def append_history(self, entry: Mapping[str, Any]) -> None:
        append_line(self.history, json.dumps(dict(entry), sort_keys=True, default=str))

    def read_history(self) -> list[dict[str, Any]]:
        if not self.history.exists():
            return []
        entries = []
        for line in self.history.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return entries

    def truncate_history(self, last_round: int) -> None:
        """Keep only rounds <= ``last_round`` (resuming from that checkpoint must not duplicate rounds)."""
        kept = [e for e in self.read_history() if int(e.get("round", 0)) <= last_round]
        atomic_write_text(self.history, "".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """The egress digest (common/digest.py) of named arrays taken by name: safetensors reads a
    file's arrays back sorted by name, so the digest must not depend on their order."""
    return payload_digest({name: arrays[name] for name in sorted(arrays)})
