"""Why a federation starts below frozen + the pooled closed-form map, and what reaches that map with
messages the shape of the head: a diagnostic on the demo's data and splits (issue 15).

Three image -> text least-squares maps, each scored on the demo's test set and validation halves:

- pooled: ridge least squares on every site's training rows, ridge chosen by cross-validation
  (frozen + lstsq, the table's baseline; it needs the rows in one place);
- averaged: each site's own tuned ridge map, averaged weighted by rows (round 1 of a federation
  of the ``aligned`` head today: the start round);
- federated CG: the federation's closed-form start (server/closed_form.py, ``solve``):
  conjugate gradient on the pooled ridge normal equations ``(X'X + lambda I) W = X'Y`` (X, Y
  centred by the pooled means). Each CG iteration is one round in which every site returns
  ``X_k' X_k P`` for the server's direction ``P``, an array the shape of the map (the difference
  of its squared-error gradient at two maps: what a FedSGD round sends); two queries before them
  carry ``X_k' Y_k`` with the sites' sums.

Command: ``python -m simulations.experiments.closed_form_start`` (``--out`` for the results
directory; the demo's embedding cache is reused).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.embedding import EmbeddedDataset
from common.metrics import cross_modal_retrieval, format_table, zero_shot

CG_ROUNDS = 30
RIDGES = (0.3, 1.0)  # relative: times the mean variance of the image embeddings (common.metrics)
OUT_DIR = "docs/results/federated"


def federated_ridge(
    sites: Sequence[EmbeddedDataset], *, ridge: float, rounds: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The CG iterates of the pooled ridge map (``server.closed_form.solve``, the federation's
    solver, on the sums its queries return), one per round, as (d_image x d_text) maps; and the
    row-weighted image and text means."""
    from server.closed_form import solve

    images = [np.asarray(s.image, dtype=np.float64) for s in sites]
    texts = [np.asarray(s.text, dtype=np.float64) for s in sites]
    rows = sum(len(x) for x in images)
    mean_x = sum(x.sum(axis=0) for x in images) / rows
    mean_y = sum(y.sum(axis=0) for y in texts) / rows
    rhs = sum(y.T @ x for x, y in zip(images, texts, strict=True)) - rows * np.outer(mean_y, mean_x)
    sum_squares = sum(float((x * x).sum()) for x in images)
    penalty = ridge * (sum_squares - rows * float(mean_x @ mean_x)) / mean_x.size

    def matvec(direction: np.ndarray) -> np.ndarray:  # what the sites' gram replies sum to
        return sum(direction @ (x - mean_x).T @ x for x in images) + penalty * direction

    iterates: list[np.ndarray] = []
    assert isinstance(rhs, np.ndarray)
    solve(matvec, rhs, steps=rounds, tolerance=0.0, on_step=lambda m: iterates.append(m.T))
    return iterates, mean_x, mean_y


def map_scores(
    weight: np.ndarray, bias: np.ndarray, text_bias: np.ndarray, data: EmbeddedDataset
) -> dict[str, float]:
    """Mean R@5 and zero-shot accuracy / AUROC of ``image @ weight + bias`` against
    ``text + text_bias`` (and the class prompts, likewise) on ``data``."""

    def unit(z: np.ndarray) -> np.ndarray:
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    assert data.image is not None and data.text is not None
    image = unit(data.image @ weight + bias)
    scores = {
        "mean_R@5": float(
            cross_modal_retrieval(
                image, unit(data.text + text_bias), groups_text=data.text_groups, ks=(5,)
            )["mean_R@5"]
        )
    }
    if data.prompts is not None and data.labels is not None:
        known = data.labels >= 0
        zs = zero_shot(image[known], unit(data.prompts + text_bias), data.labels[known])
        scores.update({k: float(v) for k, v in zs.items() if k in ("zs_acc", "zs_auroc")})
    return scores


def run(
    *, n: int = 1200, sites: int = 4, cache_dir: Path = Path("runs/demo/cache")
) -> dict[str, Any]:
    """The three starts on the demo's data (``fedembed demo``'s run-config and splits)."""
    from common.config import RunSettings
    from common.head_start import closed_form_alignment
    from simulations.experiments.arms import concat_embedded, prepare_sites, split_holdout
    from simulations.experiments.demo import TRAINING
    from simulations.experiments.machine import machine_info

    started = time.perf_counter()
    run_settings = RunSettings.from_run_config(
        {"dataset": "synthetic-radiology", "dataset-n": n, "partition": "site", **TRAINING}
    )
    splits = [split_holdout(s) for s in prepare_sites(run_settings, sites, cache_dir=cache_dir)]
    train = concat_embedded([s.train for s in splits])
    sets = {
        "validation": concat_embedded([s.val for s in splits]),
        "test": concat_embedded([s.test for s in splits]),
    }

    def scored(name: str, weight: np.ndarray, bias: np.ndarray, text_bias: np.ndarray) -> dict:
        return {
            "start": name,
            **{k: map_scores(weight, bias, text_bias, v) for k, v in sets.items()},
        }

    pooled = closed_form_alignment(train, "lstsq")
    rows = [
        scored(
            "pooled ridge map (CV ridge; needs pooling)",
            pooled.proj_a,
            -pooled.mean_a @ pooled.proj_a,
            -pooled.mean_b,
        )
    ]
    maps = [closed_form_alignment(s.train, "lstsq") for s in splits]
    weights = np.array([len(s.train) for s in splits], dtype=np.float64)
    weights /= weights.sum()
    rows.append(
        scored(
            "average of the sites' tuned maps (round 1 without the CG start)",
            sum(w * m.proj_a for w, m in zip(weights, maps, strict=True)),
            sum(w * (-m.mean_a @ m.proj_a) for w, m in zip(weights, maps, strict=True)),
            sum(w * (-m.mean_b) for w, m in zip(weights, maps, strict=True)),
        )
    )
    curves: dict[str, list[dict[str, Any]]] = {}
    for ridge in RIDGES:
        iterates, mean_x, mean_y = federated_ridge(
            [s.train for s in splits], ridge=ridge, rounds=CG_ROUNDS
        )
        curves[f"ridge {ridge:g}"] = [
            {"cg_round": i, **scored("", w, -mean_x @ w, -mean_y)}
            for i, w in enumerate(iterates, start=1)
        ]
        chosen = max(
            curves[f"ridge {ridge:g}"], key=lambda r: r["validation"]["mean_R@5"]
        )  # the earliest best on validation (max keeps the first)
        rows.append(
            {
                **{k: v for k, v in chosen.items() if k != "cg_round"},
                "start": f"federated CG, ridge {ridge:g}, {chosen['cg_round']} rounds "
                "(chosen on validation)",
            }
        )
    return {
        "command": "python -m simulations.experiments.closed_form_start",
        "data": {"dataset": "synthetic-radiology", "n": n, "sites": sites, "partition": "site"},
        "sizes": {"train": len(train), **{k: len(v) for k, v in sets.items()}},
        "rows": rows,
        "cg_curves": curves,
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
    }


def render_markdown(document: dict[str, Any]) -> str:
    table = [
        {"start": r["start"], **{f"test {k}": v for k, v in r["test"].items()}}
        for r in document["rows"]
    ]
    columns = ["start", *[c for c in table[0] if c != "start"]]
    lines = [
        "# The federation's closed-form start (demo data, 4 sites by scanner)",
        "",
        f"Command: `{document['command']}`. Rows: {document['sizes']}.",
        "",
        format_table(table, columns),
        "",
        "Federated CG, test mean R@5 by round (ridge: "
        + "; ".join(
            f"{name}: "
            + ", ".join(
                f"{r['cg_round']}: {r['test']['mean_R@5']:.3f}"
                for r in curve
                if r["cg_round"] in (1, 2, 3, 5, 8, 10, 15, 20, 30)
            )
            for name, curve in document["cg_curves"].items()
        )
        + ").",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    from simulations.benchmarks.results import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--cache-dir", default="runs/demo/cache")
    args = parser.parse_args(argv)
    document = run(cache_dir=Path(args.cache_dir))
    markdown = render_markdown(document)
    write_results(args.out, "closed_form_start", document, markdown)
    print(markdown)


if __name__ == "__main__":
    from simulations.experiments.entry import run_main

    run_main("closed_form_start", main)
