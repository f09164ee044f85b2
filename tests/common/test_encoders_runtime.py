"""How encoders run: device and precision in the identity and the cache key, the auto precision
rule, the allocator setting, each image decoded once and loaded one batch ahead."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import common.data.images
from common.cache import EmbeddingCache
from common.data.dataset import ImageRef, text_key
from common.data.manifest import read_manifest
from common.embedding import embed_dataset
from common.encoders import Encoder, load_encoder
from common.encoders import runtime as runtime_module
from common.encoders.onnx import OnnxNetwork, onnxruntime_enabled
from common.encoders.runtime import FIDELITY_MIN_COSINE, Runtime, bf16_native, tune_allocator
from common.errors import ConfigError
from common.pipeline import RecordedEncoder, forget_loaded_encoders, get_encoder, known_encoder

TEXTS = ["the chest is normal", "a small nodule", "no effusion", "the heart is enlarged"] * 3
NATIVE_BF16 = bf16_native("cpu")


def test_identity_names_device_and_precision_and_fp32_is_exact(
    tiny_model_dirs: dict[str, Path],
) -> None:
    exact = load_encoder(str(tiny_model_dirs["text"]), precision="fp32", device="cpu")
    assert exact.identity()["precision"] == "fp32" and exact.identity()["device"] == "cpu"
    assert exact.fidelity is None  # no probe when the precision is given
    auto = load_encoder(str(tiny_model_dirs["text"]))
    assert auto.identity()["precision"] == auto.runtime.precision
    if NATIVE_BF16:  # auto ran the fidelity probe and followed its rule
        assert auto.fidelity is not None
        passes = auto.fidelity["min_cosine"] >= FIDELITY_MIN_COSINE
        assert auto.runtime.precision == ("bf16" if passes else "fp32")
    else:  # no native bf16: fp32 without a probe, and bf16 on demand is refused
        assert auto.runtime.precision == "fp32" and auto.fidelity is None
        with pytest.raises(ConfigError, match="no native bfloat16"):
            load_encoder(str(tiny_model_dirs["text"]), precision="bf16")


def test_auto_falls_back_to_fp32_when_the_probe_misses_the_fidelity_bar(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_module, "FIDELITY_MIN_COSINE", 1.5)  # no cosine reaches it
    encoder = load_encoder(str(tiny_model_dirs["image"]), modality="image")
    assert encoder.runtime.precision == "fp32"
    assert (encoder.fidelity is not None) == NATIVE_BF16


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16")
def test_bf16_embeddings_are_close_to_fp32_and_never_served_for_fp32(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    exact = load_encoder(str(tiny_model_dirs["text"]), precision="fp32")
    reduced = load_encoder(str(tiny_model_dirs["text"]), precision="bf16")
    assert exact.identity() != reduced.identity()
    cache = EmbeddingCache(tmp_path)
    keys = [text_key(t) for t in TEXTS]
    first, stats = cache.embed(exact, keys, lambda idx: [TEXTS[i] for i in idx])
    assert stats.misses == len(set(keys))
    second, stats = cache.embed(reduced, keys, lambda idx: [TEXTS[i] for i in idx])
    assert stats.hits == 0 and stats.misses == len(set(keys))  # nothing of fp32's reused
    assert not np.array_equal(first, second)
    cosines = (
        (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    )
    assert cosines.min() > 0.99
    np.testing.assert_array_equal(cache.embed(exact, keys, lambda idx: [])[0], first)


def test_a_recorded_load_is_reused_only_for_the_same_runtime_setting(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = str(tiny_model_dirs["text"])
    first = known_encoder(model, modality="text", precision="fp32", cache_dir=tmp_path)
    assert isinstance(first, Encoder)
    again = known_encoder(model, modality="text", precision="fp32", cache_dir=tmp_path)
    assert isinstance(again, RecordedEncoder) and again.identity() == first.identity()
    auto = known_encoder(model, modality="text", precision="auto", cache_dir=tmp_path)
    assert isinstance(auto, Encoder)  # another setting: loaded, not the fp32 record


def test_allocator_tuning_is_on_by_default_on_glibc_and_can_be_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import platform

    monkeypatch.setattr(runtime_module, "_TUNED", False)
    monkeypatch.setenv("FEDEMBED_MALLOC_TUNING", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("FEDEMBED_MALLOC_TUNING")
    assert tune_allocator() is (platform.libc_ver()[0] == "glibc")


def _png_manifest(root: Path, count: int) -> Path:
    rng = np.random.default_rng(1)
    lines = ["id,image,text"]
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(f"r{i},{i}.png,report {i}")
    (root / "site.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "site.csv"


def test_each_new_image_is_decoded_once_and_a_cached_one_never(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _png_manifest(tmp_path, 7)
    decoded: list[str] = []
    threads: set[str] = set()
    real = common.data.images.read_image

    def counting(path: Any, **kwargs: Any) -> np.ndarray:
        decoded.append(Path(path).name)
        threads.add(threading.current_thread().name)
        return real(path, **kwargs)

    monkeypatch.setattr(common.data.images, "read_image", counting)
    encoder = load_encoder(str(tiny_model_dirs["image"]), modality="image", batch_size=3)
    dataset = read_manifest(manifest).dataset
    first, report = embed_dataset(dataset, cache_dir=tmp_path / "c", image_encoder=encoder)
    assert sorted(decoded) == sorted(f"{i}.png" for i in range(7))  # once each
    assert report.stats["image"].misses == 7
    assert all(name.startswith("fedembed-load") for name in threads)  # off the main thread
    decoded.clear()
    again, report = embed_dataset(dataset, cache_dir=tmp_path / "c", image_encoder=encoder)
    assert decoded == [] and report.stats["image"].hits == 7
    assert first.image is not None and again.image is not None
    np.testing.assert_array_equal(first.image, again.image)


class _Lazy:
    """An image loaded on demand, recording when."""

    def __init__(self, index: int, log: list[tuple[str, int]]) -> None:
        self.index, self.log = index, log

    def load(self) -> np.ndarray:
        self.log.append(("load", self.index))
        return np.full((16, 16), self.index / 40, dtype=np.float32)


def test_images_are_loaded_one_batch_ahead_never_all_at_once(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = load_encoder(str(tiny_model_dirs["image"]), modality="image", precision="fp32")
    log: list[tuple[str, int]] = []
    lazy = [_Lazy(i, []) for i in range(20)]
    direct = encoder.embed([item.load() for item in lazy], batch_size=4)
    forward = encoder._forward

    def logged(inputs: Any) -> Any:
        log.append(("forward", int(inputs.shape[0])))
        return forward(inputs)

    monkeypatch.setattr(encoder, "_forward", logged)
    vectors = encoder.embed([_Lazy(i, log) for i in range(20)], batch_size=4)
    np.testing.assert_array_equal(vectors, direct)
    loads = forwards = 0
    for kind, _ in log:
        if kind == "forward":
            forwards += 1
        else:  # at most the batch being run and the next one are loaded
            loads += 1
            assert loads <= 4 * (forwards + 2)
    assert (loads, forwards) == (20, 5)


@pytest.mark.parametrize("model", ["tiny text", "mobilenetv2"])
def test_loading_runs_the_probe_once_per_form_it_compares(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    # auto compares forms on the probe (torch fp32 with bf16 where native, or with ONNX Runtime
    # for MobileNetV2); the output size comes from the chosen form's probe, not a third run.
    from common.encoders.base import Encoder as Base
    from common.encoders.text import HFTextEncoder
    from common.encoders.vision import ImageEncoder

    owner: type[Base] = HFTextEncoder if model == "tiny text" else ImageEncoder
    calls: list[Runtime] = []
    forward = owner._forward

    def counted(self: Any, inputs: Any) -> Any:
        calls.append(self.runtime)
        return forward(self, inputs)

    monkeypatch.setattr(owner, "_forward", counted)
    if model == "tiny text":
        encoder = load_encoder(str(tiny_model_dirs["text"]), modality="text", precision="auto")
        compared = 2 if NATIVE_BF16 else 1
    else:
        encoder = load_encoder("mobilenetv2", image_size=32, precision="auto")
        compared = 2 if onnxruntime_enabled() or NATIVE_BF16 else 1
    assert len(calls) == len(set(calls)) == compared
    assert encoder.runtime in calls and encoder.dim > 0


def test_skip_mode_leaves_an_undecodable_image_out_and_caches_the_rest(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    manifest = _png_manifest(tmp_path, 5)
    (tmp_path / "2.png").write_bytes((tmp_path / "2.png").read_bytes()[:50])
    encoder = load_encoder(
        str(tiny_model_dirs["image"]), modality="image", batch_size=2, precision="fp32"
    )
    dataset = read_manifest(manifest).dataset  # the hash is of the cut file: decoding fails
    embedded, report = embed_dataset(
        dataset, cache_dir=tmp_path / "c", image_encoder=encoder, on_bad_row="skip"
    )
    assert embedded.ids == ["r0", "r1", "r3", "r4"] and embedded.image is not None
    assert np.isfinite(embedded.image).all()
    assert [(s.row, s.id) for s in report.skipped] == [(4, "r2")]
    assert "field 'image'" in report.skipped[0].reason
    assert "cannot decode image" in report.skipped[0].reason
    assert dataset.images is not None
    cache = EmbeddingCache(tmp_path / "c")
    keys = [ref.key for ref in dataset.images]
    assert cache.missing(encoder, keys) == [2]  # the bad image was never cached
    alone = encoder.embed([ref.load() for i, ref in enumerate(dataset.images) if i != 2])
    np.testing.assert_allclose(embedded.image, alone, atol=1e-6)
    assert isinstance(dataset.images[0], ImageRef)


def test_grouped_convolutions_stay_float32_and_others_hand_on_float32_under_bf16() -> None:
    import torch
    from torch import nn

    from common.encoders.runtime import keep_convolutions_faithful

    seen: dict[str, torch.dtype] = {}
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    net[1].register_forward_pre_hook(
        lambda m, args: seen.__setitem__("depthwise_in", args[0].dtype)
    )
    keep_convolutions_faithful(net)
    keep_convolutions_faithful(net)  # idempotent: one hook, one wrapper
    assert len(net[0]._forward_hooks) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        plain = nn.Conv2d(3, 8, 1)(x)
    assert plain.dtype == torch.bfloat16  # what autocast alone would hand on
    assert seen["depthwise_in"] == torch.float32 and out.dtype == torch.float32
    with torch.no_grad():
        exact = net(x)
    torch.testing.assert_close(out, exact, rtol=0.05, atol=0.05)


def _radiographs(n: int) -> list[np.ndarray]:
    from common.config import DataSpec
    from common.pipeline import load_site_dataset

    dataset = load_site_dataset(DataSpec(dataset="synthetic-radiology", n=max(n, 100)))
    return [ref.load() for ref in (dataset.images or [])[:n]]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_mobilenetv2_on_a_cpu_runs_on_onnxruntime_with_torch_fp32s_embeddings_never_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert onnxruntime_enabled()  # a dependency: installed wherever fedembed is
    images = _radiographs(12)
    fast = load_encoder("mobilenetv2")  # auto
    assert fast.runtime == Runtime("cpu", "fp32", "onnxruntime")
    assert fast.fidelity is not None and fast.fidelity["onnxruntime_min_cosine"] >= 0.99999
    # the exporter must not leave any module in training mode (dropout, batch statistics)
    assert not any(module.training for module in fast.model.modules())
    assert load_encoder("mobilenetv2", precision="fp32").runtime.backend == "onnxruntime"
    assert load_encoder("mobilenetv2", precision="bf16").runtime.backend == "torch"
    monkeypatch.setenv("FEDEMBED_ONNXRUNTIME", "0")
    exact = load_encoder("mobilenetv2", precision="fp32")
    assert exact.runtime == Runtime("cpu", "fp32")
    assert _min_cosine(fast.embed(images), exact.embed(images)) >= 0.99999
    assert fast.identity() != exact.identity()  # so the cache never serves one for the other
    keys = [f"image-{i}" for i in range(len(images))]
    cache = EmbeddingCache(tmp_path)
    cache.embed(exact, keys, lambda idx: [images[i] for i in idx])
    assert cache.missing(fast, keys) == list(range(len(images)))
    monkeypatch.delenv("FEDEMBED_ONNXRUNTIME")

    def failing_export(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ONNX export failed: simulated")

    with monkeypatch.context() as patch:
        patch.setattr(OnnxNetwork, "__init__", failing_export)
        with pytest.warns(UserWarning, match="not on ONNX Runtime.*simulated"):
            fallback = load_encoder("mobilenetv2", precision="fp32")
    assert fallback.runtime == Runtime("cpu", "fp32")  # torch runs it; the load still succeeds
    np.testing.assert_allclose(fallback.embed(images), exact.embed(images), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(runtime_module, "ONNX_MIN_COSINE", 1.5)  # no probe can reach it
    with pytest.warns(UserWarning, match="not on ONNX Runtime.*probe cosine"):
        unfaithful = load_encoder("mobilenetv2", precision="fp32")
    assert unfaithful.runtime == Runtime("cpu", "fp32") and unfaithful._onnx is None


def test_a_process_asked_for_torch_gets_a_torch_encoder_not_the_one_it_loaded_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forget_loaded_encoders()
    first = get_encoder("mobilenetv2", modality="image")
    assert first.runtime.backend == "onnxruntime"
    monkeypatch.setenv("FEDEMBED_ONNXRUNTIME", "0")
    second = get_encoder("mobilenetv2", modality="image")
    assert second.runtime.backend == "torch" and second.identity() != first.identity()
    forget_loaded_encoders()


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16")
def test_mobilenetv2_in_bf16_keeps_every_radiograph_within_the_fidelity_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = _radiographs(32)
    monkeypatch.setenv("FEDEMBED_ONNXRUNTIME", "0")  # torch's two forms
    exact = load_encoder("mobilenetv2", precision="fp32").embed(images)
    reduced = load_encoder("mobilenetv2", precision="bf16").embed(images)
    assert _min_cosine(exact, reduced) >= FIDELITY_MIN_COSINE
    assert load_encoder("mobilenetv2").runtime.precision == "bf16"  # auto's probe agrees
