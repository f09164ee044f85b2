"""`synthetic-radiology`: seeded stylised chest radiographs with matching templated reports."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from common.data.dataset import ImageRef, SiteDataset
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
DEVICES = (
    "endotracheal tube",
    "right internal jugular catheter",
    "left subclavian catheter",
    "nasogastric tube",
)
REPORT_STYLES = ("structured", "narrative", "terse")
MM_PER_UNIT = 200.0  # image width (2 units) spans 400 mm


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


# ----------------------------------------------------------------------------- geometry


class _Grid:
    """Pixel-centre coordinates in [-1, 1]: u left to right, v top to bottom."""

    def __init__(self, size: int) -> None:
        axis = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
        self.size = size
        self.v, self.u = np.meshgrid(axis, axis, indexing="ij")
        self.soft = 1.0 / size  # half a pixel: anti-aliased edges

    def to_px(self, u: float, v: float) -> tuple[float, float]:
        """(row, col) of a point in pixel units."""
        return ((v + 1.0) / 2.0 * self.size - 0.5, (u + 1.0) / 2.0 * self.size - 0.5)


def _step(x: np.ndarray, soft: float) -> np.ndarray:
    """Smooth 0 -> 1 step (x in coordinate units, transition over about 2 * soft)."""
    return np.float32(0.5) * (np.float32(1.0) + np.tanh(x / np.float32(2.0 * soft)))


def _ellipse(grid: _Grid, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    radius = np.sqrt(((grid.u - cu) / ru) ** 2 + ((grid.v - cv) / rv) ** 2)
    return _step((1.0 - radius) * min(ru, rv), grid.soft)


def _polyline(grid: _Grid, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """Soft mask of a polyline of the given half-width."""
    distance = np.full(grid.u.shape, np.inf, dtype=np.float32)
    for (u0, v0), (u1, v1) in itertools.pairwise(points):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((grid.u - u0) * du + (grid.v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(grid.u - u0 - t * du, grid.v - v0 - t * dv))
    return _step(width - distance, grid.soft)


def _smooth_noise(rng: np.random.Generator, grid: _Grid, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1] (bicubic upsampling of a coarse grid)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field_ = Image.fromarray(coarse).resize((grid.size, grid.size), Image.Resampling.BICUBIC)
    return np.asarray(field_, dtype=np.float32) / 1.5


@dataclass(frozen=True)
class _Lung:
    cu: float
    cv: float
    ru: float
    rv: float
    dome_base: float  # v of the lung bottom at its edges (costophrenic angle level)
    dome_height: float
    lateral: int  # -1: the lateral wall is toward -u (patient's right lung), +1 toward +u

    def dome(self, u: np.ndarray | float) -> np.ndarray:
        t = np.clip(((np.asarray(u) - self.cu) / self.ru) ** 2, 0.0, 1.0)
        return self.dome_base - self.dome_height * (1.0 - t)


@dataclass(frozen=True)
class _Anatomy:
    scale: float
    du: float
    dv: float
    lungs: dict[str, _Lung]  # keyed by the patient's side: "right" (image left), "left"
    heart_ru: float
    heart_rv: float
    heart_cu: float
    heart_cv: float

    @property
    def ctr(self) -> float:
        """Cardiothoracic ratio: heart width over the distance between the lungs' outer edges."""
        return 2.0 * self.heart_ru / _thorax_width(self.lungs)


def _thorax_width(lungs: dict[str, _Lung]) -> float:
    return (lungs["left"].cu + lungs["left"].ru) - (lungs["right"].cu - lungs["right"].ru)


def _sample_anatomy(rng: np.random.Generator, ctr: float) -> _Anatomy:
    s = float(rng.uniform(0.92, 1.05))
    du, dv = (float(x) for x in rng.normal(0.0, 0.03, size=2))
    lungs = {
        "right": _Lung(-0.37 * s + du, -0.02 + dv, 0.28 * s, 0.68 * s, 0.56 * s + dv, 0.14, -1),
        "left": _Lung(0.38 * s + du, 0.0 + dv, 0.27 * s, 0.66 * s, 0.6 * s + dv, 0.12, 1),
    }
    heart_ru = ctr * _thorax_width(lungs) / 2.0
    return _Anatomy(
        scale=s,
        du=du,
        dv=dv,
        lungs=lungs,
        heart_ru=heart_ru,
        heart_rv=0.25 * s + 0.3 * (heart_ru - 0.28),
        heart_cu=du + 0.07 + 0.45 * (heart_ru - 0.28),
        heart_cv=0.33 * s + dv,
    )


def _lung_mask(grid: _Grid, lung: _Lung) -> np.ndarray:
    inside = _ellipse(grid, lung.cu, lung.cv, lung.ru, lung.rv)
    return inside * _step(lung.dome(grid.u) - grid.v, grid.soft)


def _heart_mask(grid: _Grid, anatomy: _Anatomy) -> np.ndarray:
    return _ellipse(grid, anatomy.heart_cu, anatomy.heart_cv, anatomy.heart_ru, anatomy.heart_rv)


# ----------------------------------------------------------------------------- rendering


def _render_anatomy(rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy) -> np.ndarray:
    s, du, dv = anatomy.scale, anatomy.du, anatomy.dv
    body = _ellipse(grid, du, 0.25 + dv, 0.9 * s, 1.25 * s)
    neck = _ellipse(grid, du, -0.95 + dv, 0.2 * s, 0.35)
    lungs = _lung_mask(grid, anatomy.lungs["right"]) + _lung_mask(grid, anatomy.lungs["left"])
    heart = _heart_mask(grid, anatomy)
    mediastinum = _ellipse(grid, du + 0.01, -0.3 + dv, 0.1 * s, 0.7 * s)
    spine = _step(0.055 * s - np.abs(grid.u - du), grid.soft) * body
    aortic_knob = _ellipse(grid, du + 0.11, -0.28 + dv, 0.07 * s, 0.07 * s)
    clavicles = _polyline(
        grid, [(du - 0.72, -0.78 + dv), (du - 0.1, -0.64 + dv)], 0.035
    ) + _polyline(grid, [(du + 0.1, -0.64 + dv), (du + 0.72, -0.78 + dv)], 0.035)
    rib_phase = float(rng.uniform(0, 2 * np.pi))
    ribs = _step(
        np.sin(2 * np.pi * 5.0 * (grid.v - 0.35 * (grid.u - du) ** 2) + rib_phase) - 0.55, 0.05
    )
    texture = _smooth_noise(rng, grid, 10)
    image = (
        0.04
        + 0.46 * np.maximum(body, neck)
        - 0.3 * lungs * (1.0 - heart)
        + 0.06 * heart
        + 0.05 * mediastinum
        + 0.06 * spine
        + 0.06 * aortic_knob
        + 0.12 * clavicles
        + 0.06 * ribs * lungs
        + 0.035 * texture * lungs
    )
    return image.astype(np.float32)


def _render_nodule(
    rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, attrs: dict[str, Any]
) -> np.ndarray:
    side, zone = str(rng.choice(["right", "left"])), str(rng.choice(["upper", "lower"]))
    size_mm = int(rng.integers(8, 31))
    lung = anatomy.lungs[side]
    cu, cv = _point_in_lung(rng, lung, zone)
    radius = size_mm / 2.0 / MM_PER_UNIT
    distance = np.hypot(grid.u - cu, grid.v - cv)
    blob = _step(radius - distance, max(grid.soft, radius / 4.0))
    row, col = grid.to_px(cu, cv)
    attrs.update(
        size_mm=size_mm,
        side=side,
        zone=zone,
        center_px=(row, col),
        radius_px=radius * grid.size / 2.0,
    )
    return np.float32(0.32) * blob


def _point_in_lung(rng: np.random.Generator, lung: _Lung, zone: str) -> tuple[float, float]:
    """A point well inside the lung, in its upper, middle or lower band."""
    bands = {"upper": (-0.6, -0.15), "middle": (-0.15, 0.2), "lower": (0.2, 0.6)}
    low, high = bands[zone]
    cu, cv = lung.cu, lung.cv
    for _ in range(50):
        cu = lung.cu + float(rng.uniform(-0.55, 0.55)) * lung.ru
        cv = lung.cv + float(rng.uniform(low, high)) * lung.rv
        radius = np.hypot((cu - lung.cu) / lung.ru, (cv - lung.cv) / lung.rv)
        if radius < 0.75 and cv < float(lung.dome(cu)) - 0.08:
            break
    return cu, cv


_DENSITY_AMPLITUDE = {"faint": 0.14, "patchy": 0.2, "dense": 0.28}


def _render_opacity(
    rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, attrs: dict[str, Any]
) -> np.ndarray:
    side = str(rng.choice(["right", "left"]))
    lobe = str(rng.choice(["upper", "middle", "lower"] if side == "right" else ["upper", "lower"]))
    density = str(rng.choice(list(_DENSITY_AMPLITUDE)))
    lung = anatomy.lungs[side]
    cu, cv = _point_in_lung(rng, lung, lobe)
    spread_u, spread_v = 0.5 * lung.ru, 0.28 * lung.rv
    blob = np.exp(-0.5 * (((grid.u - cu) / spread_u) ** 2 + ((grid.v - cv) / spread_v) ** 2))
    patchiness = 0.6 if density == "patchy" else 0.3
    texture = 1.0 + patchiness * _smooth_noise(rng, grid, 12)
    attrs.update(side=side, lobe=lobe, density=density, center_px=grid.to_px(cu, cv))
    amplitude = np.float32(_DENSITY_AMPLITUDE[density])
    region = _lung_mask(grid, lung) * (1.0 - _heart_mask(grid, anatomy))
    return (amplitude * blob * np.clip(texture, 0.0, None) * region).astype(np.float32)


_EFFUSION_HEIGHT = {"small": 0.15, "moderate": 0.28, "large": 0.45}


def _render_effusion(
    rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, attrs: dict[str, Any]
) -> np.ndarray:
    side = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
    size = str(rng.choice(list(_EFFUSION_HEIGHT)))
    sides = ["right", "left"] if side == "bilateral" else [side]
    fluid = np.zeros_like(grid.u)
    for name in sides:
        lung = anatomy.lungs[name]
        height = _EFFUSION_HEIGHT[size] * float(rng.uniform(0.85, 1.15))
        lateral = np.clip((lung.lateral * (grid.u - lung.cu) / lung.ru + 1.0) / 2.0, 0.0, 1.0)
        # the fluid surface climbs the lateral chest wall (meniscus)
        surface = lung.dome_base - height + 0.12 * (1.0 - lateral) ** 2
        fluid += _step(grid.v - surface, 2 * grid.soft) * _lung_mask(grid, lung)
    attrs.update(side=side, size=size)
    return (np.float32(0.32) * fluid * (1.0 - _heart_mask(grid, anatomy))).astype(np.float32)


_DEVICE_PATHS: dict[str, list[tuple[float, float]]] = {
    "endotracheal tube": [(0.0, -1.05), (0.0, -0.6)],  # tip set from the reported distance
    "right internal jugular catheter": [(-0.22, -1.05), (-0.1, -0.62), (-0.06, -0.12)],
    "left subclavian catheter": [(0.7, -0.66), (0.2, -0.52), (-0.05, -0.4), (-0.06, -0.12)],
    "nasogastric tube": [(0.0, -1.05), (0.02, 0.35), (0.2, 0.62), (0.38, 0.7)],
}
_CARINA_V = -0.22


def _render_device(
    rng: np.random.Generator, grid: _Grid, anatomy: _Anatomy, attrs: dict[str, Any]
) -> np.ndarray:
    device = str(rng.choice(DEVICES))
    points = [(u + anatomy.du, v + anatomy.dv) for u, v in _DEVICE_PATHS[device]]
    if device == "endotracheal tube":
        cm_above = round(float(rng.uniform(2.0, 6.5)), 1)
        tip_v = _CARINA_V + anatomy.dv - cm_above * 10.0 / MM_PER_UNIT
        points = [points[0], (points[1][0], tip_v)]
        attrs["device_cm_above_carina"] = cm_above
    attrs["device"] = device
    return np.float32(0.35) * _polyline(grid, points, 0.016)


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


_FINDING_RENDERERS = {
    "nodule": _render_nodule,
    "opacity": _render_opacity,
    "effusion": _render_effusion,
}


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


# ----------------------------------------------------------------------------- reports

_INDICATIONS = (
    "Cough.",
    "Shortness of breath.",
    "Fever.",
    "Chest pain.",
    "Preoperative evaluation.",
    "Follow-up.",
    "Hypoxia.",
    "Evaluate for pneumonia.",
    "Trauma.",
    "Weakness.",
)
_NEGATIONS: dict[str, tuple[str, ...]] = {
    "lungs": (
        "The lungs are clear.",
        "Lungs are clear bilaterally.",
        "No focal airspace disease.",
        "No focal consolidation.",
    ),
    "heart": (
        "Heart size is normal.",
        "The cardiac silhouette is within normal limits.",
        "Normal heart size (cardiothoracic ratio {ctr:.2f}).",
        "The cardiomediastinal silhouette is normal.",
    ),
    "effusion": (
        "No pleural effusion.",
        "No pleural effusions.",
        "The costophrenic angles are sharp.",
        "There is no pleural effusion.",
    ),
    "nodule": ("No suspicious pulmonary nodules.", "No focal nodule or mass."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "bones": (
        "Osseous structures are intact.",
        "No acute osseous abnormality.",
        "Visualized bones are unremarkable.",
    ),
}
_NEGATION_EXCLUDES = {
    "normal": set(),
    "nodule": {"lungs", "nodule"},
    "opacity": {"lungs"},
    "cardiomegaly": {"heart"},
    "effusion": {"effusion", "lungs"},
}
_POSITIVE: dict[str, tuple[str, ...]] = {
    "nodule": (
        "There is a {size_mm} mm nodule in the {side} {zone} lobe.",
        "{A_an} {size_mm}-mm {adjective}pulmonary nodule projects over the {side} {zone} lung zone.",
        "{Side} {zone} lobe nodule measuring {size_cm:.1f} cm.",
        "Solitary {size_mm} mm nodule in the {side} {zone} lobe.",
    ),
    "opacity": (
        "{Density} airspace opacity in the {side} {lobe} lobe.",
        "There is {density} opacity in the {side} {lobe} lobe, which may represent pneumonia.",
        "{Side} {lobe} lobe {density} airspace disease.",
    ),
    "cardiomegaly": (
        "The heart is {severity_adverb} enlarged (cardiothoracic ratio {ctr:.2f}).",
        "{Severity} cardiomegaly.",
        "{Severity} enlargement of the cardiac silhouette, cardiothoracic ratio {ctr:.2f}.",
    ),
    "effusion": (
        "{Size} {side} pleural {effusions} with blunting of the {angles}.",
        "Blunting of the {angles}, consistent with {article}{size} {side} pleural {effusions}.",
        "There {is_are} {article}{size} {side} pleural {effusions}.",
    ),
}
_IMPRESSIONS: dict[str, tuple[str, ...]] = {
    "normal": (
        "No acute cardiopulmonary abnormality.",
        "Normal chest radiograph.",
        "No acute cardiopulmonary process.",
        "No active disease.",
    ),
    "nodule": (
        "{Side} {zone} lobe pulmonary nodule; CT recommended for further evaluation.",
        "{size_mm} mm {side} {zone} lobe nodule.",
        "Pulmonary nodule, follow-up CT advised.",
    ),
    "opacity": (
        "{Side} {lobe} lobe opacity, likely pneumonia in the appropriate clinical setting.",
        "Findings concerning for {side} {lobe} lobe pneumonia.",
        "Airspace disease as above.",
    ),
    "cardiomegaly": (
        "{Severity} cardiomegaly without pulmonary edema.",
        "Cardiomegaly.",
        "Enlarged heart, no acute process.",
    ),
    "effusion": ("{Size} {side} pleural {effusions}.", "Pleural {effusions} as described."),
}
_DEVICE_SENTENCES = {
    "endotracheal tube": (
        "Endotracheal tube tip is {cm:.1f} cm above the carina.",
        "ETT in place, terminating {cm:.1f} cm above the carina.",
    ),
    "right internal jugular catheter": (
        "Right internal jugular central venous catheter with tip in the superior vena cava.",
        "Right IJ central line terminates in the SVC.",
    ),
    "left subclavian catheter": (
        "Left subclavian central venous catheter with tip in the superior vena cava.",
        "Left subclavian line tip projects over the SVC.",
    ),
    "nasogastric tube": (
        "Nasogastric tube courses below the diaphragm into the stomach.",
        "Enteric tube tip is in the stomach.",
    ),
}
_NO_DEVICE = ("No support devices.", "No lines or tubes.")
_DENSITY_WORDS = {
    "faint": ("faint", "hazy", "subtle"),
    "patchy": ("patchy", "ill-defined", "streaky"),
    "dense": ("dense", "confluent", "consolidative"),
}
_SEVERITY_ADVERBS = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}


def write_report(
    attrs: dict[str, Any], rng: np.random.Generator, *, style: str = "structured"
) -> str:
    """A radiology report for a case's attributes, with randomly chosen wording.

    The positive-finding sentence always carries the attributes (size, side, zone/lobe, density,
    severity or cardiothoracic ratio, effusion size); other findings are negated.
    """
    if style not in REPORT_STYLES:
        raise ConfigError(f"report style must be one of {', '.join(REPORT_STYLES)}, got {style!r}")
    finding = attrs["finding"]
    words = _template_words(attrs, rng)
    positive = [_pick(rng, _POSITIVE[finding]).format(**words)] if finding in _POSITIVE else []
    negations = _negations(
        finding, words, rng, count=1 if style == "terse" else int(rng.integers(2, 5))
    )
    device = _device_sentence(attrs, rng)
    impression = _pick(rng, _IMPRESSIONS[finding]).format(**words)
    if style == "terse":
        return " ".join(
            [*positive, *device, *negations] if positive else [impression, *device, *negations]
        )
    findings = " ".join([*positive, *device, *negations])
    if style == "narrative":
        return f"{findings} {impression}"
    indication = f"INDICATION: {_pick(rng, _INDICATIONS)} " if rng.random() < 0.6 else ""
    return f"{indication}FINDINGS: {findings} IMPRESSION: {impression}"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _template_words(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    words: dict[str, Any] = {**attrs}
    if "side" in attrs:
        words["Side"] = str(attrs["side"]).capitalize()
    if "size_mm" in attrs:
        words["size_cm"] = attrs["size_mm"] / 10.0
        words["A_an"] = (
            "An" if str(attrs["size_mm"]).startswith("8") or attrs["size_mm"] in (11, 18) else "A"
        )
        words["adjective"] = _pick(rng, ("", "well-circumscribed ", "rounded ", "noncalcified "))
    if "density" in attrs:
        words["density"] = _pick(rng, _DENSITY_WORDS[attrs["density"]])
        words["Density"] = words["density"].capitalize()
    if "severity" in attrs:
        words["Severity"] = str(attrs["severity"]).capitalize()
        words["severity_adverb"] = _SEVERITY_ADVERBS[attrs["severity"]]
    if attrs["finding"] == "effusion":
        bilateral = attrs["side"] == "bilateral"
        words["Size"] = str(attrs["size"]).capitalize()
        words["effusions"] = "effusions" if bilateral else "effusion"
        words["is_are"] = "are" if bilateral else "is"
        words["article"] = "" if bilateral else "a "
        words["angles"] = (
            "costophrenic angles" if bilateral else f"{attrs['side']} costophrenic angle"
        )
    return words


def _negations(
    finding: str, words: dict[str, Any], rng: np.random.Generator, *, count: int
) -> list[str]:
    groups = [name for name in _NEGATIONS if name not in _NEGATION_EXCLUDES[finding]]
    chosen = rng.permutation(len(groups))[: min(count, len(groups))]
    sentences = [_pick(rng, _NEGATIONS[groups[i]]).format(**words) for i in chosen]
    if finding == "nodule" and rng.random() < 0.5:
        sentences.insert(0, "The lungs are otherwise clear.")
    return sentences


def _device_sentence(attrs: dict[str, Any], rng: np.random.Generator) -> list[str]:
    device = attrs.get("device")
    if device is None:
        return [_pick(rng, _NO_DEVICE)] if rng.random() < 0.3 else []
    cm = attrs.get("device_cm_above_carina", 0.0)
    return [_pick(rng, _DEVICE_SENTENCES[device]).format(cm=cm)]
