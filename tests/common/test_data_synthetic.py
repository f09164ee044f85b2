"""Tests for common.data.synthetic: reproducibility, visible findings, site shifts and reports."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from common.data.synthetic import (
    CLASS_NAMES,
    CLASS_PROMPTS,
    SyntheticCase,
    generate_cases,
    make_synthetic_radiology,
    site_profile,
)
from common.errors import ConfigError

SIZE = 64


@pytest.fixture(scope="module")
def balanced() -> list[SyntheticCase]:
    """1,200 site-0 cases with equal class probabilities."""
    return generate_cases(1200, seed=0, site=0, class_probs=[1] * 5)


def _images(cases: list[SyntheticCase]) -> np.ndarray:
    return np.stack([case.image for case in cases])


def _by_finding(cases: list[SyntheticCase], finding: str) -> list[SyntheticCase]:
    return [case for case in cases if case.attributes["finding"] == finding]


def _box(u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
    """Pixel window of a region given in [-1, 1] coordinates (u across, v down)."""

    def px(x: float) -> int:
        return int((x + 1) / 2 * SIZE)

    return slice(px(v0), px(v1)), slice(px(u0), px(u1))


def test_dataset_shape_ids_and_prompts() -> None:
    dataset = make_synthetic_radiology(50, seed=1, site=2)
    assert dataset.name == "synthetic-radiology" and len(dataset) == 50
    assert dataset.ids[0] == "s2-00000" and dataset.ids[-1] == "s2-00049"
    assert dataset.sites == ["site-2"] * 50
    assert dataset.class_names == CLASS_NAMES and dataset.prompts == CLASS_PROMPTS
    assert dataset.images is not None and dataset.texts is not None and dataset.labels is not None
    image = dataset.images[0].load()
    assert image.shape == (64, 64) and image.dtype == np.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    larger = make_synthetic_radiology(3, image_size=96).images
    assert larger is not None and larger[0].load().shape == (96, 96)


def test_exactly_reproducible_for_a_seed() -> None:
    first = make_synthetic_radiology(40, seed=7, site=3)
    second = make_synthetic_radiology(40, seed=7, site=3)
    assert first.texts == second.texts
    assert [ref.key for ref in first.images or []] == [ref.key for ref in second.images or []]
    assert first.labels is not None and second.labels is not None
    assert np.array_equal(first.labels, second.labels)
    other_seed = make_synthetic_radiology(40, seed=8, site=3)
    other_site = make_synthetic_radiology(40, seed=7, site=4)
    keys = {ref.key for ref in first.images or []}
    assert keys.isdisjoint(ref.key for ref in other_seed.images or [])
    assert keys.isdisjoint(ref.key for ref in other_site.images or [])


def test_fast_with_mostly_unique_reports() -> None:
    start = time.perf_counter()
    dataset = make_synthetic_radiology(2000, seed=0)
    assert time.perf_counter() - start < 10.0  # about 1 s on 2 cores
    texts = dataset.texts or []
    assert len(texts) == 2000 and len(set(texts)) / len(texts) > 0.95


def test_nodules_are_brighter_than_their_surroundings(balanced: list[SyntheticCase]) -> None:
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    contrasts = []
    for case in _by_finding(balanced, "nodule"):
        row, col = case.attributes["center_px"]
        radius = max(float(case.attributes["radius_px"]), 1.0)
        distance = np.hypot(rows - row, cols - col)
        ring = (distance > radius + 1.5) & (distance <= radius + 3.5)
        contrasts.append(case.image[distance <= radius].mean() - case.image[ring].mean())
    assert len(contrasts) > 150
    assert np.mean(np.array(contrasts) > 0.03) > 0.9


def test_opacity_effusion_cardiomegaly_change_their_regions(balanced: list[SyntheticCase]) -> None:
    normal = _images(_by_finding(balanced, "normal")).mean(axis=0)
    opacity_gain = []
    for case in _by_finding(balanced, "opacity"):
        row, col = (round(x) for x in case.attributes["center_px"])
        window = slice(max(row - 2, 0), row + 3), slice(max(col - 2, 0), col + 3)
        opacity_gain.append(case.image[window].mean() - normal[window].mean())
    assert np.mean(np.array(opacity_gain) > 0.0) > 0.9
    effusions = _by_finding(balanced, "effusion")
    right_base = _box(-0.65, -0.35, 0.25, 0.5)  # patient's right = image left
    right = _images([c for c in effusions if c.attributes["side"] == "right"])
    left = _images([c for c in effusions if c.attributes["side"] == "left"])
    assert right[(slice(None), *right_base)].mean() - normal[right_base].mean() > 0.06
    assert abs(left[(slice(None), *right_base)].mean() - normal[right_base].mean()) < 0.03
    heart_border = _box(0.3, 0.5, 0.15, 0.45)
    enlarged = _images(_by_finding(balanced, "cardiomegaly"))
    assert enlarged[(slice(None), *heart_border)].mean() - normal[heart_border].mean() > 0.1
    assert min(c.attributes["ctr"] for c in _by_finding(balanced, "cardiomegaly")) >= 0.55
    assert max(c.attributes["ctr"] for c in _by_finding(balanced, "normal")) <= 0.5


def test_linear_model_on_raw_pixels_beats_chance(balanced: list[SyntheticCase]) -> None:
    cases = balanced[:900]
    pixels = np.stack(
        [
            np.asarray(Image.fromarray(c.image).resize((16, 16), Image.Resampling.BOX)).ravel()
            for c in cases
        ]
    )
    labels = np.array([c.label for c in cases])
    features = StandardScaler().fit_transform(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(max_iter=200, C=0.05).fit(features[:600], labels[:600])
    accuracy = float(np.mean(model.predict(features[600:]) == labels[600:]))
    assert accuracy > 0.5  # chance is 0.2; about 0.7 measured


def test_site_shifts_change_image_statistics() -> None:
    stats = {}
    for site in range(5):
        images = _images(generate_cases(150, seed=0, site=site, class_probs=[1] * 5))
        stats[site] = (images.mean(), images.std(), np.abs(np.diff(images, axis=2)).mean())
    means = [stats[s][0] for s in range(5)]
    assert max(means) - min(means) > 0.2
    assert stats[1][2] > 1.3 * stats[0][2]  # noisy ICU portables
    assert stats[2][0] < stats[0][0] - 0.1  # dark high-gamma screening centre
    neutral = _images(generate_cases(150, seed=0, site=1, class_probs=[1] * 5, shift=0.0))
    assert abs(neutral.mean() - stats[0][0]) < 0.02  # shift=0: reference acquisition


def test_site_profiles_and_class_priors() -> None:
    assert site_profile(0).blur == 1.0 and site_profile(3).blur > 2.0
    assert site_profile(7) == site_profile(7) and site_profile(7) != site_profile(8)
    assert site_profile(1, shift=0.0).contrast == 1.0
    labels = make_synthetic_radiology(1000, seed=0, site=2).labels
    assert labels is not None
    assert np.mean(labels == CLASS_NAMES.index("nodule")) > 0.28  # nodule-heavy screening site
    only_effusion = make_synthetic_radiology(20, class_probs=[0, 0, 0, 0, 1]).labels
    assert only_effusion is not None and set(only_effusion.tolist()) == {4}


def test_reports_mention_the_attributes(balanced: list[SyntheticCase]) -> None:
    for case in balanced:
        attrs, report = case.attributes, case.report.lower()
        finding = attrs["finding"]
        if finding == "nodule":
            size = attrs["size_mm"]
            assert re.search(rf"\b({size}[ -]mm|{size / 10:.1f} cm)\b", report), report
            assert f"{attrs['side']} {attrs['zone']}" in report
        elif finding == "opacity":
            assert f"{attrs['side']} {attrs['lobe']} lobe" in report
            density_words = {
                "faint": "faint|hazy|subtle",
                "patchy": "patchy|ill-defined|streaky",
                "dense": "dense|confluent|consolidative",
            }[attrs["density"]]
            assert re.search(density_words, report), report
        elif finding == "cardiomegaly":
            assert attrs["severity"] in report or f"{attrs['ctr']:.2f}" in report
        elif finding == "effusion":
            assert f"{attrs['size']} {attrs['side']} pleural effusion" in report
        else:
            assert not re.search(r"nodule measuring|cardiomegaly\.|pleural effusion with", report)
        if attrs["device"] is not None:
            words = {
                "endotracheal tube": "carina",
                "nasogastric tube": "stomach",
                "right internal jugular catheter": "right",
                "left subclavian catheter": "left subclavian",
            }
            assert words[attrs["device"]] in report


def test_negations_never_contradict_the_finding(balanced: list[SyntheticCase]) -> None:
    for case in _by_finding(balanced, "effusion"):
        assert "no pleural effusion" not in case.report.lower()
    for case in _by_finding(balanced, "cardiomegaly"):
        assert "heart size is normal" not in case.report.lower()
    for case in _by_finding(balanced, "nodule"):
        assert "no suspicious pulmonary nodules" not in case.report.lower()


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="class_probs"):
        make_synthetic_radiology(5, class_probs=[1, 2])
    with pytest.raises(ConfigError, match="image_size"):
        make_synthetic_radiology(5, image_size=8)
    with pytest.raises(ConfigError, match="site"):
        make_synthetic_radiology(5, site=-1)
