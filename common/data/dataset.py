"""The in-memory form of one site's data: paired images and texts with optional class labels."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError


@dataclass(frozen=True)
class ImageRef:
    """One image: either a file on disk (PNG/JPEG/DICOM) or an in-memory array.

    ``key`` is a content hash used by the embedding cache; ``load()`` returns the pixels as a
    float32 array in [0, 1] of shape (H, W) (grayscale) or (H, W, 3) (RGB). ``source`` says where
    the image came from (e.g. "site.csv line 7 (id 'p12') field 'image'") and prefixes any error
    from ``load()``; ``row`` is that manifest line.
    """

    key: str
    path: Path | None = None
    array: np.ndarray | None = field(default=None, repr=False, compare=False)
    source: str | None = field(default=None, compare=False)
    row: int | None = field(default=None, compare=False)

    @classmethod
    def from_array(cls, array: np.ndarray) -> ImageRef:
        """Wrap an in-memory image; the key hashes its dtype, shape and bytes."""
        contiguous = np.ascontiguousarray(array)
        digest = hashlib.sha256()
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
        return cls(key=digest.hexdigest(), array=contiguous)

    def load(self) -> np.ndarray:
        """Return the pixels as float32 in [0, 1], (H, W) or (H, W, 3).

        A file is decoded from the same bytes whose hash must equal ``key``: a file changed or
        truncated after the manifest was read raises DataError instead of being embedded under
        the old key.
        """
        if self.array is not None:
            return _to_unit_float(self.array)
        if self.path is None:
            raise ValueError("ImageRef has neither a path nor an array")
        from common.data.images import read_image  # local import: PIL/pydicom only when needed

        return read_image(self.path, context=self.source, expected_key=self.key)


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def text_key(text: str) -> str:
    """Content hash of a text, as used by the embedding cache (DataError for invalid Unicode)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"text {text[:40]!r} is not valid Unicode (U+{ord(text[exc.start]):04X} "
            f"at character {exc.start + 1})"
        ) from exc
    return hashlib.sha256(data).hexdigest()


SPLITS = ("train", "test")
"""Values of a manifest's ``split`` column: rows marked ``test`` are held out (see DataSpec.test_rows)."""


@dataclass(frozen=True)
class SkippedRow:
    """An example left out because of ``reason``; ``row`` is its 1-based file line (None: unknown)."""

    row: int | None
    id: str | None
    reason: str

    def describe(self) -> str:
        return self.reason if self.row is None else f"line {self.row}: {self.reason}"


@dataclass
class SiteDataset:
    """One site's examples. Either modality may be absent (e.g. text-only clinical notes).

    Attributes:
        name: dataset name (for messages and result files).
        ids: one unique id per example.
        texts: report/note per example, or None for image-only data.
        images: one ImageRef per example, or None for text-only data.
        labels: int class index per example (-1 = unlabelled), or None.
        class_names: names of the classes ``labels`` indexes.
        prompts: one zero-shot text prompt per class (same order as ``class_names``).
        classes_declared: the classes and prompts are public task metadata, fixed before any row
            was read (a built-in dataset's list, or a manifest's declaration), not the set of
            labels the rows happen to hold (which is site data: sample-level DP refuses it).
        sites: the site each example came from (natural partition), or None.
        splits: "train" or "test" per example (a manifest's ``split`` column), or None.
        skipped: rows of the source left out as unusable (skip-and-report mode), with reasons.
    """

    name: str
    ids: list[str]
    texts: list[str] | None = None
    images: list[ImageRef] | None = None
    labels: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    classes_declared: bool = False
    sites: list[str] | None = None
    skipped: list[SkippedRow] = field(default_factory=list)
    splits: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for attr in ("texts", "images", "sites", "splits"):
            value = getattr(self, attr)
            if value is not None and len(value) != n:
                raise ValueError(f"{self.name}: {attr} has {len(value)} entries, ids has {n}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"{self.name}: labels shape {self.labels.shape}, expected ({n},)")
        if self.prompts and len(self.prompts) != len(self.class_names):
            raise ValueError(
                f"{self.name}: {len(self.prompts)} prompts for {len(self.class_names)} classes"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in the fixed order ("image", "text")."""
        present = []
        if self.images is not None:
            present.append("image")
        if self.texts is not None:
            present.append("text")
        return tuple(present)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SiteDataset:
        """A new dataset holding the examples at ``indices`` (same classes and prompts)."""
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        return SiteDataset(
            name=self.name,
            ids=[self.ids[i] for i in idx],
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            images=None if self.images is None else [self.images[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            class_names=list(self.class_names),
            prompts=list(self.prompts),
            classes_declared=self.classes_declared,
            sites=None if self.sites is None else [self.sites[i] for i in idx],
            skipped=list(self.skipped),
            splits=None if self.splits is None else [self.splits[i] for i in idx],
        )
