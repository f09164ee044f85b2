"""Embedding killed with SIGKILL halfway: the next run resumes from the committed shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.cache import EmbeddingCache
from common.data.dataset import SiteDataset
from common.embedding import embed_dataset
from common.encoders import Encoder, load_encoder

REPO = Path(__file__).resolve().parents[2]
SHARD = 8
N_TEXTS = 240
WORDS = "nodule opacity effusion cardiomegaly tube line normal heart lung left right upper lower"

SCRIPT = """
import json, sys
from common.data.dataset import SiteDataset
from common.embedding import embed_dataset
from common.encoders import load_encoder

model, cache, texts = sys.argv[1], sys.argv[2], json.loads(open(sys.argv[3]).read())
shard = int(sys.argv[4])
dataset = SiteDataset(name="resume", ids=[str(i) for i in range(len(texts))], texts=texts)
encoder = load_encoder(model, modality="text")
embed_dataset(dataset, cache_dir=cache, text_encoder=encoder, shard_size=shard, batch_size=shard)
"""


def _texts() -> list[str]:
    words = WORDS.split()
    return [
        f"{words[i % 13]} in the {words[(i // 13) % 13]} {words[(i // 169) % 13]} {i}"
        for i in range(N_TEXTS)
    ]


def _committed(cache: Path) -> int:
    return len(list(cache.glob("*/shards/*.json")))


@pytest.fixture(scope="module")
def text_encoder(tiny_model_dirs: dict[str, Path]) -> Encoder:
    return load_encoder(str(tiny_model_dirs["text"]), modality="text")


def test_sigkill_halfway_then_resume_reuses_shards_and_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dirs: dict[str, Path], text_encoder: Encoder
) -> None:
    (tmp_path / "embed_script.py").write_text(SCRIPT)
    texts = _texts()
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        str(tmp_path / "embed_script.py"),
        str(tiny_model_dirs["text"]),
        str(cache),
        str(tmp_path / "texts.json"),
        str(SHARD),
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _committed(cache) < 5:
            assert process.poll() is None, f"embedding ended early ({process.returncode})"
            assert time.monotonic() < deadline, "no shard written within 120 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = _committed(cache)
    assert done >= 5 and done * SHARD < N_TEXTS, "the kill did not land halfway"

    after_kill = EmbeddingCache(cache).verify()  # consistent at the worst moment
    assert after_kill.ok and after_kill.shards == done and after_kill.entries == done * SHARD

    dataset = SiteDataset(name="resume", ids=[str(i) for i in range(N_TEXTS)], texts=texts)
    options = {"text_encoder": text_encoder, "shard_size": SHARD, "batch_size": SHARD}
    resumed, report = embed_dataset(dataset, cache_dir=cache, **options)  # type: ignore[arg-type]
    stats = report.stats["text"]
    assert stats.hits == done * SHARD and not stats.corrupt_shards  # every shard was reused
    assert stats.misses == N_TEXTS - done * SHARD < N_TEXTS  # only the rest was encoded
    assert stats.shards_written == -(-stats.misses // SHARD)

    check = EmbeddingCache(cache).verify()
    assert check.ok and check.entries == N_TEXTS
    assert all(path.endswith(".tmp") for path in check.uncommitted)  # at most a killed temp file

    reference, _ = embed_dataset(dataset, cache_dir=tmp_path / "reference", **options)  # type: ignore[arg-type]
    assert resumed.text is not None and reference.text is not None
    np.testing.assert_allclose(resumed.text, reference.text, rtol=0, atol=1e-6)


def test_uncommitted_and_corrupt_shards_are_reported_then_recomputed_or_cleaned(
    tmp_path: Path, text_encoder: Encoder
) -> None:
    texts = _texts()[:40]
    dataset = SiteDataset(name="small", ids=[str(i) for i in range(40)], texts=texts)
    reference, _ = embed_dataset(
        dataset, cache_dir=tmp_path, text_encoder=text_encoder, shard_size=SHARD
    )
    shards = sorted(tmp_path.glob("*/shards/*.json"))
    assert len(shards) == 5
    shards[0].unlink()  # as if killed between writing the data and its index
    npy = shards[1].with_suffix(".npy")
    raw = bytearray(npy.read_bytes())
    raw[-3] ^= 0xFF
    npy.write_bytes(bytes(raw))

    check = EmbeddingCache(tmp_path).verify()
    assert not check.ok and check.corrupt == [str(shards[1])]
    assert check.uncommitted == [str(shards[0].with_suffix(".npy"))]
    assert check.shards == 3 and check.entries == 3 * SHARD
    assert npy.exists()  # verify() changes nothing

    again, report = embed_dataset(
        dataset, cache_dir=tmp_path, text_encoder=text_encoder, shard_size=SHARD
    )
    assert report.stats["text"].misses == 2 * SHARD and report.stats["text"].corrupt_shards
    assert again.text is not None and reference.text is not None
    np.testing.assert_array_equal(again.text, reference.text)
    assert EmbeddingCache(tmp_path).verify().ok

    orphan = shards[0].with_name("0" * 20 + ".npy")
    orphan.write_bytes(b"left by a writer killed long ago")
    two_hours_ago = time.time() - 7200
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    embed_dataset(dataset, cache_dir=tmp_path, text_encoder=text_encoder)
    assert not orphan.exists()
