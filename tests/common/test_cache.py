"""Embedding cache: hits, misses, corruption repair, resume after an interruption, encoder identity."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.cache import EmbeddingCache
from common.data.dataset import text_key
from common.encoders import Encoder, load_encoder

TEXTS = [
    f"there is a {w} in the left lung {i}" for i, w in enumerate(["nodule", "opacity", "tube"] * 7)
]


class Counting:
    """Wraps a real encoder and counts the items that went through a forward pass."""

    def __init__(self, encoder: Encoder, *, fail_after: int | None = None) -> None:
        self.encoder = encoder
        self.dim = encoder.dim
        self.calls = 0
        self.items = 0
        self.fail_after = fail_after
        self.seen: list[list[Any]] = []  # the items of each call, in the order received

    def identity(self) -> dict[str, Any]:
        return self.encoder.identity()

    def embed(
        self,
        items: Sequence[Any],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        on_error: Any = None,
    ) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.items += len(items)
        self.seen.append(list(items))
        return self.encoder.embed(items, batch_size=batch_size, on_error=on_error)


@pytest.fixture(scope="module")
def text_encoder(tiny_model_dirs: dict[str, Path]) -> Encoder:
    return load_encoder(str(tiny_model_dirs["text"]), modality="text")


def _embed(cache: EmbeddingCache, encoder: Any, texts: list[str]) -> tuple[np.ndarray, Any]:
    return cache.embed(encoder, [text_key(t) for t in texts], lambda idx: [texts[i] for i in idx])


def test_second_run_does_no_forward_pass_and_returns_identical_vectors(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    counting = Counting(text_encoder)
    first, stats1 = _embed(EmbeddingCache(tmp_path, shard_size=8), counting, TEXTS)
    assert stats1.misses == len(TEXTS) and stats1.hits == 0 and counting.items == len(TEXTS)
    second, stats2 = _embed(EmbeddingCache(tmp_path, shard_size=8), counting, TEXTS)
    assert stats2.hits == len(TEXTS) and stats2.misses == 0
    assert counting.items == len(TEXTS)  # nothing encoded the second time
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, text_encoder.embed(TEXTS), atol=1e-6)


def test_only_new_inputs_are_encoded_and_duplicates_once(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    counting = Counting(text_encoder)
    _embed(EmbeddingCache(tmp_path), counting, TEXTS[:10])
    more = [*TEXTS, TEXTS[0], "a brand new report"]
    vectors, stats = _embed(EmbeddingCache(tmp_path), counting, more)
    assert stats.misses == len(TEXTS) - 10 + 1
    assert counting.items == len(TEXTS) + 1
    np.testing.assert_array_equal(vectors[len(TEXTS)], vectors[0])


def test_sort_key_sets_the_order_inputs_are_encoded_and_sharded_in_not_the_rows(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    texts = [f"{'word ' * (i * 7 % 11)}report {i}" for i in range(20)]
    counting = Counting(text_encoder)
    keys = [text_key(t) for t in texts]
    vectors, _ = EmbeddingCache(tmp_path, shard_size=6).embed(
        counting, keys, lambda idx: [texts[i] for i in idx], sort_key=lambda i: -len(texts[i])
    )
    received = [text for call in counting.seen for text in call]
    assert received == sorted(texts, key=len, reverse=True)  # longest first, across shards
    assert [len(call) for call in counting.seen] == [6, 6, 6, 2]
    np.testing.assert_allclose(vectors, text_encoder.embed(texts), atol=1e-6)  # rows: keys' order
    again, stats = EmbeddingCache(tmp_path, shard_size=6).embed(
        counting, keys[::-1], lambda idx: [texts[::-1][i] for i in idx]
    )
    assert stats.misses == 0
    np.testing.assert_array_equal(again, vectors[::-1])


def test_changed_encoder_identity_is_a_different_cache_entry(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    mean = Counting(load_encoder(str(tiny_model_dirs["text"]), modality="text", pooling="mean"))
    cls = Counting(load_encoder(str(tiny_model_dirs["text"]), modality="text", pooling="cls"))
    a, _ = _embed(EmbeddingCache(tmp_path), mean, TEXTS)
    b, stats = _embed(EmbeddingCache(tmp_path), cls, TEXTS)
    assert stats.misses == len(TEXTS) and cls.items == len(TEXTS)
    assert not np.allclose(a, b)


def test_corrupt_shard_is_detected_moved_aside_and_recomputed(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    reference, _ = _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    shard = sorted(tmp_path.glob("*/shards/*.npy"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the data, not the header
    shard.write_bytes(bytes(raw))
    counting = Counting(text_encoder)
    vectors, stats = _embed(EmbeddingCache(tmp_path, shard_size=8), counting, TEXTS)
    assert len(stats.corrupt_shards) == 1
    assert 0 < counting.items <= 8  # only the corrupt shard's inputs were recomputed
    assert list(tmp_path.glob("*/shards/*.corrupt"))
    np.testing.assert_array_equal(vectors, reference)


def test_truncated_index_file_is_repaired(tmp_path: Path, text_encoder: Encoder) -> None:
    reference, _ = _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    index = sorted(tmp_path.glob("*/shards/*.json"))[0]
    index.write_text(index.read_text()[:20])
    vectors, stats = _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    assert stats.corrupt_shards
    np.testing.assert_array_equal(vectors, reference)


def test_interrupted_run_keeps_finished_shards_and_resumes(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    interrupted = Counting(text_encoder, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _embed(EmbeddingCache(tmp_path, shard_size=5), interrupted, TEXTS)
    assert len(list(tmp_path.glob("*/shards/*.json"))) == 2
    assert not list(tmp_path.glob("*/shards/*.tmp"))
    resumed = Counting(text_encoder)
    vectors, stats = _embed(EmbeddingCache(tmp_path, shard_size=5), resumed, TEXTS)
    assert stats.hits == 10 and resumed.items == len(TEXTS) - 10
    np.testing.assert_allclose(vectors, text_encoder.embed(TEXTS), atol=1e-6)


def test_non_finite_encoder_output_is_refused_and_not_cached(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    class Broken(Counting):
        def embed(
            self,
            items: Sequence[Any],
            *,
            batch_size: int | None = None,
            progress: bool = False,
            on_error: Any = None,
        ) -> np.ndarray:
            out = super().embed(items, batch_size=batch_size)
            out[0, 0] = np.nan
            return out

    from common.errors import CacheError

    with pytest.raises(CacheError, match="non-finite"):
        _embed(EmbeddingCache(tmp_path), Broken(text_encoder), TEXTS)
    assert not list(tmp_path.glob("*/shards/*.json"))


def test_shards_memory_map_and_record_their_checksum(tmp_path: Path, text_encoder: Encoder) -> None:
    _embed(EmbeddingCache(tmp_path), Counting(text_encoder), TEXTS)
    meta_path = next(tmp_path.glob("*/shards/*.json"))
    meta = json.loads(meta_path.read_text())
    from common.atomic import sha256_file

    assert meta["sha256"] == sha256_file(meta_path.with_suffix(".npy"))
    mapped = np.load(meta_path.with_suffix(".npy"), mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.shape == (len(TEXTS), text_encoder.dim)
    identity = json.loads(next(tmp_path.glob("*/encoder.json")).read_text())["identity"]
    assert identity == json.loads(json.dumps(text_encoder.identity(), default=str))


def test_prune_rewrites_shards_without_the_removed_keys_and_keeps_the_rest_bitwise(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    reference, _ = _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    withdrawn = {text_key(TEXTS[i]) for i in (1, 2, 9)}  # two in the first shard, one in the second
    kept = [t for t in TEXTS if text_key(t) not in withdrawn]
    keep = {text_key(t) for t in kept}

    dry = EmbeddingCache(tmp_path, shard_size=8).prune(keep, dry_run=True)
    assert (dry.entries_removed, dry.shards_rewritten) == (3, 2)
    assert EmbeddingCache(tmp_path).verify().entries == len(TEXTS)  # a dry run changes nothing

    report = EmbeddingCache(tmp_path, shard_size=8).prune(keep)
    assert (report.entries_removed, report.entries_kept, report.shards_rewritten) == (3, 18, 2)
    assert report.bytes_freed > 0
    stored = {
        k for p in tmp_path.glob("*/shards/*.json") for k in json.loads(p.read_text())["keys"]
    }
    assert stored == keep
    counting = Counting(text_encoder)
    vectors, stats = _embed(EmbeddingCache(tmp_path, shard_size=8), counting, kept)
    assert stats.hits == len(kept) and counting.items == 0
    np.testing.assert_array_equal(vectors, reference[[TEXTS.index(t) for t in kept]])
    assert EmbeddingCache(tmp_path).verify().ok

    assert EmbeddingCache(tmp_path).prune(set()).encoders_removed == 1  # nothing kept: all gone
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_prune_interrupted_after_the_new_shard_loses_nothing_and_the_next_prune_finishes(
    tmp_path: Path, text_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, _ = _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    keep = {text_key(t) for t in TEXTS[1:]}
    real_unlink = Path.unlink

    def crash(self: Path, missing_ok: bool = False) -> None:
        raise KeyboardInterrupt("killed before the old shard was deleted")

    monkeypatch.setattr(Path, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache(tmp_path, shard_size=8).prune(keep)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert EmbeddingCache(tmp_path).verify().ok  # the new shard is committed, the old one intact
    vectors, stats = _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    assert stats.misses == 0
    np.testing.assert_array_equal(vectors, reference)

    report = EmbeddingCache(tmp_path).prune(keep)
    assert report.entries_removed == 1
    stored = [
        k for p in tmp_path.glob("*/shards/*.json") for k in json.loads(p.read_text())["keys"]
    ]
    assert sorted(stored) == sorted(keep)


def test_prune_removes_corrupt_and_uncommitted_files_and_rejected_encoders(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    _embed(EmbeddingCache(tmp_path, shard_size=8), Counting(text_encoder), TEXTS)
    shards = next(tmp_path.glob("*/shards"))
    (shards / "leftover.npy").write_bytes(b"uncommitted data")
    (shards / "old.json.corrupt").write_text("{}")
    keep = {text_key(t) for t in TEXTS}
    report = EmbeddingCache(tmp_path).prune(keep)
    assert (report.leftovers_removed, report.entries_removed) == (2, 0)
    assert sorted(p.name for p in shards.iterdir() if p.suffix not in (".json", ".npy")) == []

    report = EmbeddingCache(tmp_path).prune(keep, keep_encoder=lambda identity: False)
    assert (report.encoders_removed, report.entries_removed) == (1, len(TEXTS))
    assert not list(tmp_path.iterdir())


def test_cache_keys_are_exactly_what_embed_dataset_stores(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    from common.data.manifest import load_manifest
    from common.embedding import cache_keys, embed_dataset
    from tests.hospital_data import make_rows, write_manifest

    dataset = load_manifest(write_manifest(tmp_path / "m.csv", make_rows(tmp_path, 6)))
    embed_dataset(
        dataset,
        cache_dir=tmp_path / "cache",
        image_encoder=load_encoder(str(tiny_model_dirs["image"])),
        text_encoder=load_encoder(str(tiny_model_dirs["text"])),
    )
    stored = {
        k for p in tmp_path.glob("cache/*/shards/*.json") for k in json.loads(p.read_text())["keys"]
    }
    assert stored == cache_keys(dataset)
