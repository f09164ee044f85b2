"""Shared fixtures: tiny random Hugging Face encoders saved to disk, loaded like a user's model dirs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One torch/OpenMP thread per process (read before torch is imported, inherited by the Flower
# processes tests start): with two xdist workers on two cores, torch's default of one thread per
# core oversubscribes the machine, and OpenMP's spinning threads then run tests up to 10x slower
# (two concurrent unit-test files: 70 s each with the default, 6 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel

_WORDS = (
    "chest radiograph frontal there is a no the in of with nodule opacity cardiomegaly effusion "
    "normal heart lung left right upper lower lobe pleural tube line mm size small large"
).split()


@pytest.fixture(scope="session", autouse=True)
def _one_simulated_site_at_a_time() -> Iterator[None]:
    """Simulations in tests run their sites one after another (one Ray actor): the suite runs two
    test processes on two cores, and each actor costs about 6 s of CPU to start. Tests that
    need sites in parallel pass their own CPUs per site. (Session scope: module-scoped fixtures
    that simulate are set up before any function-scoped one.)"""
    from simulations.flower import federate

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(federate, "CPUS_PER_SITE", os.cpu_count() or 1)
        yield


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT (text, 32-d) and a tiny ViT (image, 24-d) saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny-encoders")
    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS])}
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=160,
        )
    )
    bert.save_pretrained(root / "bert")
    BertTokenizer(vocab=vocab).save_pretrained(root / "bert")
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
        )
    )
    vit.save_pretrained(root / "vit")
    return {"text": root / "bert", "image": root / "vit"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with `slow` tests first (their order kept), then the unit tests: with `-n 2 --dist
    loadfile --no-loadscope-reorder` (the Makefile's; xdist's default reorder puts files with
    many tests first) the workers start on the long Flower runs and end on short files, so
    neither waits long for the other at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)
