"""Drawing for `synthetic-radiology`: chest anatomy, findings and support devices with numpy.

Coordinates: the image spans [-1, 1] in both directions (u across, v down); the patient's right
is on the image's left.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

DEVICES = (
    "endotracheal tube",
    "right internal jugular catheter",
    "left subclavian catheter",
    "nasogastric tube",
)

MM_PER_UNIT = 200.0  # image width (2 units) spans 400 mm


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


_FINDING_RENDERERS = {
    "nodule": _render_nodule,
    "opacity": _render_opacity,
    "effusion": _render_effusion,
}
