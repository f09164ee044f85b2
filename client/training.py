"""One federated round at a site: global head in, locally trained head and scalar metrics out."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.privacy import PrivacySettings
from client.site import Site, load_site
from common.artifacts import load_state_arrays, state_arrays
from common.config import RunSettings, SiteSettings
from common.errors import ConfigError, DataError
from common.evaluation import quick_metrics
from common.training import HeadModel, build_run_model, train_head
from common.wire import (
    HEAD_STARTED,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    ROUND_OFFSET,
    SERVER_ROUND,
    START_CROSS,
    START_GRAM,
    START_QUERY,
    SUM_SQUARES,
    TASK_CLASSES,
    absolute_round,
)

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What a site sends back: the head's arrays and finite scalar metrics, nothing else.

    A declined round (its privacy budget would be exceeded) has no arrays and a reason.
    """

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float | int] = field(default_factory=dict)
    declined: bool = False
    reason: str = ""
    privacy: dict[str, float | int | str] = field(default_factory=dict)


def require_task_classes(site: Site, config: Mapping[str, Any]) -> None:
    """DataError when the site's manifest declares other classes than the run's manifest
    (``TASK_CLASSES``, server/model.task_config): label i would then train the head's class i as
    another class (its class proxies). A built-in dataset, or classes read from the site's labels,
    are not compared: the prompt objectives index the site's own prompts, and sample-level DP
    refuses undeclared classes anyway."""
    from common.data.registry import BUILTIN_DATASETS

    sent = config.get(TASK_CLASSES)
    if sent is None or not site.train.classes_declared or site.spec.dataset in BUILTIN_DATASETS:
        return
    task = [str(name) for name in json.loads(str(sent))]
    mine = list(site.train.class_names)
    if mine == task:
        return
    if len(mine) != len(task):
        first = f"{len(mine)} classes, the run's {len(task)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(mine, task, strict=True)) if a != b)
        first = f"class {i} is {mine[i]!r}, the run's is {task[i]!r}"
    raise DataError(  # short: the coordinator keeps 300 characters of it
        f"site {site.name}: its .classes.json is not the run's ({first}); give every site the "
        "same sidecar as the coordinator's dataset or server-eval manifest"
    )


def _load_global(run: RunSettings, site: Site, arrays: Mapping[str, np.ndarray]) -> HeadModel:
    model = build_run_model(run, dims=site.train.dims, num_classes=site.train.num_classes)
    load_state_arrays(model, arrays, source=f"global head received by {site.name}")
    return model


def run_local_round(
    incoming: Mapping[str, np.ndarray],
    *,
    run: RunSettings,
    site_settings: SiteSettings,
    config: Mapping[str, Any],
    privacy: PrivacySettings | None = None,
    run_id: int = 0,
) -> RoundOutcome:
    """Train the received global head on this site's data for the run's local epochs.

    With sample-level DP requested (``privacy.requested``), training is DP-SGD through Opacus,
    charged to the site's persistent privacy ledger; the site declines the round if it would
    exceed its budget. Training loss is then kept at the site (it is not covered by the guarantee).
    """
    import torch

    torch.set_num_threads(1)
    site = load_site(site_settings, run)
    require_task_classes(site, config)
    model = _load_global(run, site, incoming)
    metrics: dict[str, float | int] = {}
    if run.report_eval:
        metrics.update(quick_metrics(model, site.test))
    server_round = absolute_round(config.get(SERVER_ROUND, 0), config.get(ROUND_OFFSET, 0))
    mu = float(config.get(PROXIMAL_MU, 0.0))
    dp = privacy is not None and privacy.requested
    if dp and run.ntd_beta > 0:
        raise ConfigError(
            "run-config: ntd-beta > 0 (FedNTD) is not available with sample-level DP (dp-sgd) yet; "
            "set ntd-beta = 0 or turn DP-SGD off at this site"
        )
    teacher = mu > 0 or run.ntd_beta > 0  # FedProx's anchor, FedNTD's teacher: the global head
    reference = {k: v.clone() for k, v in model.state_dict().items()} if teacher else None
    train_config = run.train_config(
        proximal_mu=mu,
        seed=run.seed * 100_003 + server_round,
        first_round=server_round == 1,
        start_only=model.head.has_linear_path and not dp,
        started=bool(config.get(HEAD_STARTED, False)),
    )
    if dp:
        assert privacy is not None
        from client.privacy import ledger_path, require_sample_level_dp, train_head_private

        require_sample_level_dp(run.loss)
        private = train_head_private(
            model,
            site.train,
            train_config,
            privacy,
            ledger_path=ledger_path(site_settings.state_path),
            planned_rounds=run.num_server_rounds,
            run_id=run_id,
            server_round=server_round,
            reference=reference,
        )
        log.info(
            "round %d: DP-SGD with loss %s%s; epsilon %.4g (%s, delta %g) so far",
            server_round,
            private.objective,
            f" (auto: {private.objective_reason})" if private.objective_reason else "",
            private.epsilon_total,
            private.accountant.upper(),
            private.delta,
        )
        if private.declined:
            return RoundOutcome(
                arrays={}, declined=True, reason=private.reason, privacy=private.audit_record()
            )
        metrics.update(
            {NUM_EXAMPLES: int(private.num_examples), "train-seconds": float(private.seconds)}
        )
        metrics.update(private.metrics())
        return RoundOutcome(
            arrays=state_arrays(model), metrics=_finite(metrics), privacy=private.audit_record()
        )
    result = train_head(model, site.train, train_config, reference=reference)
    metrics.update(
        {
            NUM_EXAMPLES: int(result.num_examples),
            "train-loss": float(result.loss),
            "train-seconds": float(result.seconds),
        }
    )
    return RoundOutcome(arrays=state_arrays(model), metrics=_finite(metrics))


def evaluate_locally(
    incoming: Mapping[str, np.ndarray], *, run: RunSettings, site_settings: SiteSettings
) -> dict[str, float | int]:
    """Held-out metrics of the received head at this site (evaluate messages)."""
    site = load_site(site_settings, run)
    model = _load_global(run, site, incoming)
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(site.test)}
    metrics.update(quick_metrics(model, site.test, prefix=""))
    return _finite(metrics)


def start_product(
    incoming: Mapping[str, np.ndarray],
    *,
    run: RunSettings,
    site_settings: SiteSettings,
    config: Mapping[str, Any],
) -> RoundOutcome:
    """A closed-form start query (server/closed_form.py): sums over this site's training rows,
    returned in the image tower's linear path of an otherwise zero head (the head's arrays, so
    the reply has the shape of a train reply).

    With X~ = [X, 1] (image embeddings and a ones column) and Y the paired text embeddings:
    ``cross`` returns X~'Y, i.e. weight rows Y'X and bias Y'1; ``gram`` returns X~'X~ P for the
    direction P = (weight, bias) the received head's image linear path holds. Both are
    differences of the squared-error gradient of that linear path at two heads: what a
    gradient (FedSGD) round reveals, not rows.
    """
    import torch

    torch.set_num_threads(1)
    site = load_site(site_settings, run)
    model = _load_global(run, site, incoming)
    towers = model.head.towers()
    data = site.train
    if set(towers) != {"image", "text"} or data.image is None or data.text is None:
        raise ValueError("the closed-form start needs image-text pairs and a two-tower head")
    image = towers["image"]
    if image.linear is None:
        raise ValueError("the closed-form start needs a head with a linear path (head 'aligned')")
    x = np.asarray(data.image, dtype=np.float64)
    y = np.asarray(data.text, dtype=np.float64)
    out_dim = image.linear.weight.shape[0]
    if y.shape[1] > out_dim:
        raise ValueError(
            f"the closed-form start maps images to the {y.shape[1]}-d text space, wider than "
            f"the head's {out_dim}-d output"
        )
    kind = config.get(START_QUERY)
    weight = np.zeros((out_dim, x.shape[1]))
    bias = np.zeros(out_dim)
    if kind == START_CROSS:
        weight[: y.shape[1]] = y.T @ x
        bias[: y.shape[1]] = y.sum(axis=0)
    elif kind == START_GRAM:
        p_weight = image.linear.weight.detach().numpy().astype(np.float64)
        p_bias = image.linear.bias.detach().numpy().astype(np.float64)
        z = x @ p_weight.T + p_bias  # X~ P, one row per training row
        weight = z.T @ x
        bias = z.sum(axis=0)
    else:
        raise ValueError(f"unknown closed-form start query {kind!r}")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        image.linear.weight.copy_(torch.from_numpy(weight))
        image.linear.bias.copy_(torch.from_numpy(bias))
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(x)}
    if kind == START_CROSS:
        metrics[SUM_SQUARES] = float((x * x).sum())
    return RoundOutcome(arrays=state_arrays(model), metrics=_finite(metrics))


def _finite(metrics: Mapping[str, float | int]) -> dict[str, float | int]:
    return {k: v for k, v in metrics.items() if math.isfinite(float(v))}


def execute(request: Mapping[str, Any]) -> dict[str, Any]:
    """Run one ClientApp request (in the ClientApp process or in the site worker).

    ``request``: op ("train"/"evaluate"/"query"), incoming (head arrays), run and site (the raw run-config
    and node-config), config (the message's config record), run_id. Errors propagate.
    """
    run = RunSettings.from_run_config(request["run"])
    site_settings = SiteSettings.from_node_config(request["site"])
    if request["op"] == "evaluate":
        return {
            "metrics": evaluate_locally(request["incoming"], run=run, site_settings=site_settings)
        }
    privacy = PrivacySettings.merge(request["run"], request["site"])
    if request["op"] == "query":
        if privacy.requested:  # the sums are not private: a site that requires DP sends none
            return {
                "declined": True,
                "reason": "this site trains only with sample-level DP; the closed-form start's "
                "sums are not private",
            }
        start = start_product(
            request["incoming"], run=run, site_settings=site_settings, config=request["config"]
        )
        return {"arrays": start.arrays, "metrics": start.metrics}
    outcome = run_local_round(
        request["incoming"],
        run=run,
        site_settings=site_settings,
        config=request["config"],
        privacy=privacy,
        run_id=int(request.get("run_id", 0)),
    )
    return {
        "arrays": outcome.arrays,
        "metrics": outcome.metrics,
        "declined": outcome.declined,
        "reason": outcome.reason,
        "privacy": outcome.privacy,
    }
