"""One entry point for site data: built-in datasets by name or CSV/JSONL manifests by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data.dataset import SiteDataset
from common.data.manifest import MANIFEST_SUFFIXES, load_manifest
from common.errors import ConfigError

BUILTIN_DATASETS: dict[str, str] = {
    "synthetic-radiology": "seeded synthetic chest radiographs (64x64) with templated reports; "
    "5 findings, per-site acquisition shifts (default demo data)",
    "iu-xray-reports": "3,927 real Indiana University chest X-ray reports (text only) with MeSH "
    "labels; tasks: abnormal, cardiomegaly, opacity (needs the torchxrayvision wheel)",
    "digits": "scikit-learn's 1,797 8x8 handwritten digits with captions, 10 classes "
    "(fastest smoke tests)",
}
DEFAULT_SYNTHETIC_SIZE = 2000
IMAGE_SIZE_DATASETS: dict[str, tuple[int, int]] = {
    "synthetic-radiology": (64, 16),
    "digits": (8, 8),
}
"""The built-ins whose images are drawn at a chosen side (``image_size``): (default, minimum)."""


def load_dataset(
    spec: str,
    *,
    n: int | None = None,
    seed: int = 0,
    site: int = 0,
    task: str | None = None,
    image_size: int | None = None,
    on_error: str = "raise",
) -> SiteDataset:
    """Load a built-in dataset (see BUILTIN_DATASETS) or a .csv/.jsonl manifest.

    ``n``: number of examples (synthetic: generated, default 2,000; otherwise a seeded random
    subset). ``site`` selects the synthetic site profile. ``task`` applies to iu-xray-reports
    (default "abnormal"). ``image_size`` applies to synthetic-radiology (default 64) and digits
    (default 8, upsampled). ``on_error`` ("raise"/"skip") applies to manifests. Options that do
    not apply to the chosen dataset raise ConfigError rather than being ignored.
    """
    if spec in BUILTIN_DATASETS:
        return _load_builtin(spec, n=n, seed=seed, site=site, task=task, image_size=image_size)
    if Path(spec).suffix.lower() in MANIFEST_SUFFIXES:
        _reject(spec, site=site, task=task, image_size=image_size)
        dataset = load_manifest(spec, on_error=on_error)
        return dataset if n is None else _subsample(dataset, n, seed)
    raise ConfigError(
        f"unknown dataset {spec!r}: use a built-in ({', '.join(BUILTIN_DATASETS)}) "
        f"or a manifest path ending in {' or '.join(MANIFEST_SUFFIXES)}"
    )


def _load_builtin(
    spec: str, *, n: int | None, seed: int, site: int, task: str | None, image_size: int | None
) -> SiteDataset:
    if spec == "synthetic-radiology":
        from common.data.synthetic import make_synthetic_radiology

        _reject(spec, task=task)
        return make_synthetic_radiology(
            DEFAULT_SYNTHETIC_SIZE if n is None else n,
            seed=seed,
            site=site,
            image_size=IMAGE_SIZE_DATASETS[spec][0] if image_size is None else image_size,
        )
    if spec == "iu-xray-reports":
        from common.data.iu_xray import load_iu_xray

        _reject(spec, site=site, image_size=image_size)
        return load_iu_xray(task=task or "abnormal", n=n, seed=seed)
    from common.data.digits import load_digits_dataset

    _reject(spec, site=site, task=task)
    return load_digits_dataset(n=n, seed=seed, image_size=image_size)


def _reject(
    spec: str, *, site: int = 0, task: str | None = None, image_size: int | None = None
) -> None:
    """ConfigError for options that the dataset ``spec`` does not use."""
    unused = [
        name
        for name, value, default in (
            ("site", site, 0),
            ("task", task, None),
            ("image_size", image_size, None),
        )
        if value != default
    ]
    if unused:
        raise ConfigError(f"{spec}: option {', '.join(unused)} does not apply to this dataset")


def _subsample(dataset: SiteDataset, n: int, seed: int) -> SiteDataset:
    if not 0 < n <= len(dataset):
        raise ConfigError(f"n must be in 1..{len(dataset)} for {dataset.name}, got {n}")
    keep = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    return dataset.subset(keep)


def split_dataset(
    dataset: SiteDataset, *, test_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> tuple[SiteDataset, SiteDataset]:
    """Deterministic (train, test) split; both keep the original order of their examples.

    The test set has ``round(test_fraction * len(dataset))`` examples (at least 1, at most
    len - 1). With ``stratify`` and labels, each class (unlabelled -1 counts as one) contributes
    in proportion to its size (largest-remainder rounding), so class proportions match.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if len(dataset) < 2:
        raise ConfigError(f"{dataset.name}: cannot split {len(dataset)} example(s)")
    rng = np.random.default_rng(seed)
    if stratify and dataset.labels is not None:
        groups = [np.flatnonzero(dataset.labels == c) for c in np.unique(dataset.labels)]
    else:
        groups = [np.arange(len(dataset))]
    total = min(max(round(test_fraction * len(dataset)), 1), len(dataset) - 1)
    counts = _allocate(np.array([len(g) for g in groups]), total)
    test = np.concatenate([rng.permutation(g)[:k] for g, k in zip(groups, counts, strict=True)])
    is_test = np.zeros(len(dataset), dtype=bool)
    is_test[test] = True
    return dataset.subset(np.flatnonzero(~is_test)), dataset.subset(np.flatnonzero(is_test))


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder, ties by order)."""
    exact = sizes * (total / sizes.sum())
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts
