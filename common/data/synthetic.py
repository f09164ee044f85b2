"""`synthetic-radiology`: seeded stylised chest radiographs with matching templated reports.

Site profiles and case generation live here; drawing in ``synthetic_drawing``, report wording in
``synthetic_reports``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from common.data.dataset import ImageRef, SiteDataset
from common.data.synthetic_drawing import (
    _FINDING_RENDERERS,
    _Grid,
    _render_anatomy,
    _render_device,
    _sample_anatomy,
)
from common.data.synthetic_reports import REPORT_STYLES, write_report
from common.errors import ConfigError

DATASET_NAME = "synthetic-radiology"

CLASS_NAMES = ["normal", "nodule", "opacity", "cardiomegaly", "effusion"]

CLASS_PROMPTS = [
    "a normal chest radiograph with clear lungs",
    "chest radiograph with a pulmonary nodule",
    "chest radiograph with an airspace opacity in the lung",
    "chest radiograph with an enlarged heart, cardiomegaly",
    "chest radiograph with a pleural effusion",
]

DEFAULT_CLASS_PROBS = (0.3, 0.175, 0.175, 0.175, 0.175)


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic site acquires and reports its radiographs.

    Pixel pipeline, in order: ``x ** gamma``; ``(x - 0.5) * contrast + 0.5 + brightness``;
    downsample by ``blur`` and upsample back (resolution loss; 1 = none); add Gaussian noise of
    std ``noise_std``; clip to [0, 1]. ``device_rate`` is the fraction of cases with a line or
    tube, ``report_style`` one of REPORT_STYLES, ``class_probs`` the prior over CLASS_NAMES.
    """

    site: int
    description: str
    gamma: float
    contrast: float
    brightness: float
    noise_std: float
    blur: float
    device_rate: float
    report_style: str
    class_probs: tuple[float, ...]


_REFERENCE = SiteProfile(
    site=0,
    description="reference digital radiography unit",
    gamma=1.0,
    contrast=1.0,
    brightness=0.0,
    noise_std=0.02,
    blur=1.0,
    device_rate=0.15,
    report_style="structured",
    class_probs=DEFAULT_CLASS_PROBS,
)

_PROFILES = (
    _REFERENCE,
    SiteProfile(
        site=1,
        description="ICU portables: low contrast, noisy, soft, many lines",
        gamma=1.0,
        contrast=0.72,
        brightness=0.07,
        noise_std=0.06,
        blur=1.6,
        device_rate=0.55,
        report_style="terse",
        class_probs=(0.2, 0.1, 0.2, 0.25, 0.25),
    ),
    SiteProfile(
        site=2,
        description="screening centre, older CR: dark high-gamma images, many nodules",
        gamma=1.45,
        contrast=1.15,
        brightness=-0.06,
        noise_std=0.03,
        blur=1.0,
        device_rate=0.08,
        report_style="narrative",
        class_probs=(0.35, 0.35, 0.1, 0.1, 0.1),
    ),
    SiteProfile(
        site=3,
        description="rural clinic film digitiser: low resolution, bright, pneumonia-heavy",
        gamma=0.75,
        contrast=0.9,
        brightness=0.05,
        noise_std=0.04,
        blur=2.6,
        device_rate=0.05,
        report_style="structured",
        class_probs=(0.3, 0.1, 0.35, 0.1, 0.15),
    ),
    SiteProfile(
        site=4,
        description="outpatient clinic: strong edge processing, mostly normal",
        gamma=0.9,
        contrast=1.3,
        brightness=-0.08,
        noise_std=0.015,
        blur=1.2,
        device_rate=0.1,
        report_style="narrative",
        class_probs=(0.45, 0.15, 0.15, 0.15, 0.1),
    ),
)


def site_profile(site: int, *, shift: float = 1.0) -> SiteProfile:
    """The acquisition/report profile of a synthetic site.

    Sites 0-4 are fixed: 0 reference DR unit (uniform-ish prior), 1 ICU portables (low contrast,
    noise, blur, many devices, effusion/cardiomegaly-heavy, terse reports), 2 screening centre
    (gamma 1.45, nodule-heavy, narrative reports), 3 rural film digitiser (strong blur, bright,
    opacity-heavy), 4 outpatient clinic (high contrast, mostly normal). Sites >= 5 are drawn from
    ``default_rng(site)`` within the same ranges. ``shift`` scales every acquisition parameter's
    distance from the reference (0: identical acquisition everywhere; the class prior, device
    rate and report style are kept).
    """
    if site < 0:
        raise ConfigError(f"site must be >= 0, got {site}")
    if shift < 0:
        raise ConfigError(f"shift must be >= 0, got {shift}")
    profile = _PROFILES[site] if site < len(_PROFILES) else _random_profile(site)
    ref = _REFERENCE
    return replace(
        profile,
        gamma=ref.gamma + shift * (profile.gamma - ref.gamma),
        contrast=ref.contrast + shift * (profile.contrast - ref.contrast),
        brightness=ref.brightness + shift * (profile.brightness - ref.brightness),
        noise_std=max(0.0, ref.noise_std + shift * (profile.noise_std - ref.noise_std)),
        blur=max(1.0, ref.blur + shift * (profile.blur - ref.blur)),
    )


def _random_profile(site: int) -> SiteProfile:
    rng = np.random.default_rng(site)
    probs = rng.dirichlet(np.full(len(CLASS_NAMES), 4.0))
    return SiteProfile(
        site=site,
        description="randomly drawn acquisition profile",
        gamma=float(rng.uniform(0.75, 1.45)),
        contrast=float(rng.uniform(0.72, 1.3)),
        brightness=float(rng.uniform(-0.08, 0.07)),
        noise_std=float(rng.uniform(0.015, 0.06)),
        blur=float(rng.uniform(1.0, 2.6)),
        device_rate=float(rng.uniform(0.05, 0.55)),
        report_style=str(rng.choice(REPORT_STYLES)),
        class_probs=tuple(float(p) for p in probs),
    )


@dataclass
class SyntheticCase:
    """One generated case: image, report, class index and the finding's ground truth.

    ``attributes`` always has "finding", "ctr" (cardiothoracic ratio) and "device" (name or None),
    plus per finding: nodule "size_mm", "side", "zone", "center_px" (row, col), "radius_px";
    opacity "side", "lobe", "density", "center_px"; cardiomegaly "severity"; effusion "side",
    "size"; and "device_cm_above_carina" with an endotracheal tube. Sides are the patient's.
    """

    image: np.ndarray
    report: str
    label: int
    attributes: dict[str, Any] = field(default_factory=dict)


def make_synthetic_radiology(
    n: int,
    *,
    seed: int = 0,
    site: int = 0,
    image_size: int = 64,
    class_probs: Sequence[float] | None = None,
    shift: float = 1.0,
) -> SiteDataset:
    """``n`` synthetic cases of one site as a SiteDataset (64x64 float32 grayscale by default).

    Each case is a frontal chest radiograph drawn with numpy (body, lungs with diaphragm domes
    and costophrenic angles, heart, mediastinum, clavicles, ribs, vascular texture) and one
    primary finding from ``CLASS_NAMES``, rendered into the image and described, with its
    attributes, in the report:

    - normal: nothing added; reports say so with varied negations.
    - nodule: a round density of 8-30 mm in one lung zone (patient's right/left, upper/lower).
    - opacity: a diffuse density (faint/patchy/dense) confined to one lobe.
    - cardiomegaly: an enlarged heart shadow (cardiothoracic ratio 0.56-0.70; normal 0.38-0.48).
    - effusion: fluid filling a lung base with a meniscus, blunting the costophrenic angle
      (right/left/bilateral; small/moderate/large).

    Independently of the class, a support device (endotracheal tube, central venous catheter or
    nasogastric tube) is drawn and reported in a site-dependent fraction of cases. Image
    coordinates follow the radiographic convention: the patient's right is on the image's left.

    Sites differ in acquisition (gamma, contrast, brightness, noise, resolution), report style
    and class prior: see ``site_profile``. Everything derives from
    ``numpy.random.default_rng([seed, site])``, so a (seed, site) pair always gives the same data.

    ``class_probs`` (one weight per CLASS_NAMES entry) overrides the site's class prior; ``shift``
    scales the site's acquisition shift (see ``site_profile``).
    """
    cases = generate_cases(
        n, seed=seed, site=site, image_size=image_size, class_probs=class_probs, shift=shift
    )
    return SiteDataset(
        name=DATASET_NAME,
        ids=[f"s{site}-{i:05d}" for i in range(n)],
        texts=[case.report for case in cases],
        images=[ImageRef.from_array(case.image) for case in cases],
        labels=np.array([case.label for case in cases], dtype=np.int64),
        class_names=list(CLASS_NAMES),
        prompts=list(CLASS_PROMPTS),
        classes_declared=True,
        sites=[f"site-{site}"] * n,
    )


def generate_cases(
    n: int,
    *,
    seed: int = 0,
    site: int = 0,
    image_size: int = 64,
    class_probs: Sequence[float] | None = None,
    shift: float = 1.0,
) -> list[SyntheticCase]:
    """The cases behind ``make_synthetic_radiology``, with their ground-truth attributes."""
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if image_size < 16:
        raise ConfigError(f"image_size must be >= 16, got {image_size}")
    profile = site_profile(site, shift=shift)
    probs = _normalise_probs(profile.class_probs if class_probs is None else class_probs)
    rng = np.random.default_rng([seed, site])
    grid = _Grid(image_size)
    labels = rng.choice(len(CLASS_NAMES), size=n, p=probs)
    return [_make_case(int(label), rng, grid, profile) for label in labels]


def _normalise_probs(values: Sequence[float]) -> np.ndarray:
    probs = np.asarray(values, dtype=np.float64)
    if probs.shape != (len(CLASS_NAMES),) or np.any(probs < 0) or probs.sum() <= 0:
        raise ConfigError(
            f"class_probs needs {len(CLASS_NAMES)} non-negative weights "
            f"({', '.join(CLASS_NAMES)}), got {list(values)}"
        )
    return probs / probs.sum()


def _acquire(image: np.ndarray, rng: np.random.Generator, profile: SiteProfile) -> np.ndarray:
    """Apply the site's acquisition pipeline (see SiteProfile)."""
    image = np.clip(image, 0.0, 1.0) ** np.float32(profile.gamma)
    image = (image - 0.5) * np.float32(profile.contrast) + np.float32(0.5 + profile.brightness)
    if profile.blur > 1.0:
        size = image.shape[0]
        low = max(4, round(size / profile.blur))
        small = Image.fromarray(image).resize((low, low), Image.Resampling.BOX)
        image = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    noise = rng.standard_normal(image.shape).astype(np.float32) * np.float32(profile.noise_std)
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


def _make_case(
    label: int, rng: np.random.Generator, grid: _Grid, profile: SiteProfile
) -> SyntheticCase:
    finding = CLASS_NAMES[label]
    attrs: dict[str, Any] = {"finding": finding, "device": None}
    if finding == "cardiomegaly":
        ctr = float(rng.uniform(0.56, 0.7))
        attrs["severity"] = "mild" if ctr < 0.6 else "moderate" if ctr < 0.65 else "marked"
    else:
        ctr = float(rng.uniform(0.38, 0.48))
    anatomy = _sample_anatomy(rng, ctr)
    attrs["ctr"] = round(anatomy.ctr, 2)
    image = _render_anatomy(rng, grid, anatomy)
    if finding in _FINDING_RENDERERS:
        image = image + _FINDING_RENDERERS[finding](rng, grid, anatomy, attrs)
    if rng.random() < profile.device_rate:
        image = image + _render_device(rng, grid, anatomy, attrs)
    image = _acquire(image, rng, profile)
    report = write_report(attrs, rng, style=profile.report_style)
    return SyntheticCase(image=image, report=report, label=label, attributes=attrs)
