"""The federation's closed-form start: the pooled ridge least-squares map of frozen + lstsq, reached
without pooling, before round 1.

Round 1 of an ``aligned`` head used to start at the mean of the sites' own tuned least-squares
maps. Each site fits a map of ``d_image x d_text`` numbers on its own few hundred rows, and the mean
of such maps scores far below the one map fitted on every site's rows (docs/results.md, "the
federation's closed-form start"). This module fits that one map by conjugate gradient (CG) on the
pooled ridge normal equations ``(X~'X~ + lambda D) M = X~'Y`` (X~ = the image embeddings with a
ones column, Y the paired text embeddings, D the identity without the intercept's entry), whose
solution is the pooled centred ridge map of ``common.metrics.linear_alignment`` with the same
relative ridge (solved centred: ``(X_c'X_c + lambda I) W = X_c'Y_c``, better conditioned). Every quantity is a sum over the sites, and each site computes its part on its own
rows (client/training.py ``start_product``):

- one ``cross`` query: X_k~'Y_k, and the scalars n_k and sum |x|^2;
- one ``gram`` query with P = the intercept's unit vector: X_k~'X_k~ P, whose weight row is the
  site's image sum (with the scalars: the ridge's scale, the mean variance of the pooled images);
- one ``gram`` query per CG step with the step's direction P (bias -P mean_x: the reply is then
  the centred product).

Wire (common/wire.py): Flower ``query`` messages whose ``arrays`` record is the head with the
image tower's linear path set to P (zero for ``cross``) and whose config record holds
``start-query``; replies are the head's arrays, zero but for that linear path (weight rows, bias),
audited by the site like train replies (client/audit.py), receipted by the coordinator. These are
differences of the squared-error gradient of the head's linear path at two heads: what a gradient
round sends, not rows. Not used with sample-level or client-level DP (the sums are not private),
nor under secure aggregation (its messages are SecAgg+ rounds): round 1 then averages the sites'
own maps as before. Every site connected at the start takes part in every query; any site that
does not answer abandons the start (the run goes on from the sites' own maps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from common.config import RunSettings
from common.flower import arrays_from_record, record_from_arrays
from common.wire import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    NUM_EXAMPLES,
    SERVER_ROUND,
    START_CROSS,
    START_GRAM,
    START_QUERY,
    SUM_SQUARES,
)

if TYPE_CHECKING:
    from common.training import HeadModel

TOLERANCE = 1e-6  # CG stops when the residual is this share of the right-hand side's norm


@dataclass
class StartReport:
    """What the start did, for run.json and the coordinator's log."""

    method: str  # "federated ridge least squares (CG)" or "each site's own map"
    reason: str = ""  # why the federated start was not used or abandoned
    steps: int = 0
    residual: float = float("nan")  # relative residual of the normal equations at the end
    sites: int = 0
    rows: int = 0
    ridge: float = 0.0

    @property
    def used(self) -> bool:
        return self.steps > 0

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", None)}

    def line(self) -> str:
        if not self.used:
            return f"[fedembed] closed-form start: {self.method} ({self.reason})"
        return (
            f"[fedembed] closed-form start: {self.method}, {self.sites} sites, {self.rows} rows, "
            f"ridge {self.ridge:g}, {self.steps} CG steps, relative residual {self.residual:.1e}"
        )


class StartAbandoned(Exception):
    """A site did not answer a start query (or answered with an error)."""


def why_not(run: RunSettings, model: HeadModel, *, sample_dp: bool) -> str:
    """Why this run cannot use the federated start ("" when it can); ``sample_dp``: the
    run-config turns on sample-level DP at every site."""
    towers = model.head.towers()
    if run.start_steps == 0:
        return "start-steps = 0"
    if not model.head.has_linear_path:
        return f"the '{run.head}' head has no linear path"
    if set(towers) != {"image", "text"}:
        return "it needs image-text pairs and the two-tower layout"
    if run.secure_aggregation:
        return "not under secure aggregation (its sums would leave each site in the clear)"
    if run.client_dp != "off":
        return "not under client-level DP (its sums are not clipped or noised)"
    if sample_dp:
        return "not under sample-level DP (its sums are not private)"
    text_dim, out_dim = towers["text"].in_dim, towers["image"].out_dim
    if text_dim > out_dim:
        return f"the head's {out_dim}-d output is narrower than the {text_dim}-d text embeddings"
    return ""


def federated_start(
    grid: Grid, run: RunSettings, model: HeadModel, *, timeout: float | None, sample_dp: bool
) -> StartReport:
    """Set ``model``'s linear paths to the pooled ridge least-squares map, computed by CG from
    the connected sites' sums; returns what was done. On an unanswered query the model is left
    as it was and the report says why (round 1 then starts from each site's own map)."""
    reason = why_not(run, model, sample_dp=sample_dp)
    if reason:
        return StartReport(method="each site's own map", reason=reason)
    sample_nodes(grid, run.min_sites, run.min_sites)  # waits for min-sites sites to connect
    nodes = sorted(grid.get_node_ids())
    towers = model.head.towers()
    image, text = towers["image"], towers["text"]
    assert image.linear is not None and text.linear is not None
    text_dim = text.in_dim
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def query(
        kind: str, weight: np.ndarray, bias: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        return _query(grid, model, nodes, kind, weight, bias, timeout=timeout)

    shape_w = tuple(image.linear.weight.shape)
    zero_w, zero_b = np.zeros(shape_w), np.zeros(shape_w[0])
    try:
        cross_w, cross_b, metrics = query(START_CROSS, zero_w, zero_b)
        rows = int(sum(int(m[NUM_EXAMPLES]) for m in metrics))
        sum_squares = float(sum(float(m[SUM_SQUARES]) for m in metrics))
        unit_b = zero_b.copy()
        unit_b[0] = 1.0
        ones_w, _, _ = query(START_GRAM, zero_w, unit_b)  # row 0: the sum of the image rows
        mean_x = ones_w[0] / rows
        mean_y = cross_b[:text_dim] / rows
        # centred: X_c'Y_c = X'Y - n mean_x mean_y'; the ridge as common.metrics scales it
        rhs = cross_w[:text_dim] - rows * np.outer(mean_y, mean_x)
        penalty = run.start_ridge * (sum_squares - rows * float(mean_x @ mean_x)) / mean_x.size

        def matvec(direction: np.ndarray) -> np.ndarray:
            # with the bias -P mean_x, a site's X~'X~ P is P X_k'(X_k - mean_x): summed, P X_c'X_c
            weight, bias = zero_w.copy(), zero_b.copy()
            weight[:text_dim], bias[:text_dim] = direction, -direction @ mean_x
            product, _, _ = query(START_GRAM, weight, bias)
            return product[:text_dim] + penalty * direction

        map_w, steps, residual = solve(matvec, rhs, steps=run.start_steps)
    except StartAbandoned as exc:
        model.load_state_dict(saved)
        return StartReport(method="each site's own map", reason=f"abandoned: {exc}")
    _set_start(model, map_w, -map_w @ mean_x, mean_y)
    return StartReport(
        method="federated ridge least squares (CG)",
        steps=steps,
        residual=residual,
        sites=len(nodes),
        rows=rows,
        ridge=run.start_ridge,
    )


def solve(
    matvec: Callable[[np.ndarray], np.ndarray],
    rhs: np.ndarray,
    *,
    steps: int,
    tolerance: float = TOLERANCE,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, int, float]:
    """Conjugate gradient on ``matvec(M) = rhs`` (``matvec`` symmetric positive definite) from
    M = 0: at most ``steps`` products, fewer once the residual is below ``tolerance`` of
    ``rhs``; ``on_step`` sees each iterate. Returns the solution, the products used and the
    final relative residual."""
    solution = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = rhs.copy()
    norm = scale = float((rhs * rhs).sum())
    used = 0
    while used < steps and scale > 0 and norm > tolerance**2 * scale:
        product = matvec(direction)
        used += 1
        curvature = float((direction * product).sum())
        if not curvature > 0:  # converged to rounding (or not positive definite): stop here
            break
        step = norm / curvature
        solution = solution + step * direction
        residual = residual - step * product
        new_norm = float((residual * residual).sum())
        direction = residual + new_norm / norm * direction
        norm = new_norm
        if on_step is not None:
            on_step(solution)
    return solution, used, float(np.sqrt(norm / scale)) if scale > 0 else 0.0


def _set_start(model: HeadModel, weight: np.ndarray, bias: np.ndarray, mean_y: np.ndarray) -> None:
    """Image tower: ``x @ weight.T + bias`` (the centred map); text tower: ``y - mean_y``, as
    ``common.head_start.init_closed_form`` sets lstsq; rows past the text's width zero (no cosine
    sees them); MLPs zero."""
    import torch

    towers = model.head.towers()
    text_dim = mean_y.size
    for name, w, b in (
        ("image", weight, bias),
        ("text", np.eye(text_dim), -mean_y),
    ):
        tower = towers[name]
        assert tower.linear is not None
        full_w = np.zeros(tuple(tower.linear.weight.shape))
        full_b = np.zeros(tower.out_dim)
        full_w[:text_dim], full_b[:text_dim] = w, b
        tower.set_linear_path(
            torch.from_numpy(full_w.astype(np.float32)), torch.from_numpy(full_b.astype(np.float32))
        )


def _query(
    grid: Grid,
    model: HeadModel,
    nodes: list[int],
    kind: str,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    timeout: float | None,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Send every node the head with the image linear path set to (weight, bias); return the
    sums of the replies' image linear paths and each reply's metrics."""
    import torch

    from common.artifacts import state_arrays

    image = model.head.towers()["image"]
    assert image.linear is not None
    with torch.no_grad():
        image.linear.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        image.linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    arrays = state_arrays(model)
    names = _linear_names(model)
    messages = [
        grid.create_message(
            RecordDict(
                {
                    ARRAYS_RECORD: record_from_arrays(arrays),
                    CONFIG_RECORD: ConfigRecord({START_QUERY: kind, SERVER_ROUND: 0}),
                }
            ),
            "query",
            node,
            group_id="start",
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answered = {int(r.metadata.src_node_id): r for r in replies}
    missing = [n for n in nodes if n not in answered]
    if missing:
        raise StartAbandoned(f"node(s) {missing} did not answer the {kind} query in time")
    total_w, total_b = np.zeros(weight.shape), np.zeros(bias.shape)
    metrics: list[dict] = []
    for node in nodes:
        reply: Message = answered[node]
        if reply.has_error():
            raise StartAbandoned(f"node {node}: {reply.error.reason}")
        got = arrays_from_record(reply.content.array_records[ARRAYS_RECORD])
        total_w += got[names[0]].astype(np.float64)
        total_b += got[names[1]].astype(np.float64)
        record: MetricRecord = reply.content.metric_records[METRICS_RECORD]
        metrics.append(dict(record))
    return total_w, total_b, metrics


def _linear_names(model: HeadModel) -> tuple[str, str]:
    """The state names of the image tower's linear weight and bias."""
    image = model.head.towers()["image"]
    assert image.linear is not None
    by_id = {id(p): name for name, p in model.state_dict(keep_vars=True).items()}
    return by_id[id(image.linear.weight)], by_id[id(image.linear.bias)]
