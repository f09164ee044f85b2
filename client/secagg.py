"""The site's side of secure aggregation: Flower's ``secaggplus_mod`` around the site's usual local round.

Under ``secure-aggregation`` the server runs Flower's legacy SecAgg+ workflow (server/secagg.py), which
sends four "train" messages per round in Flower's legacy FitIns/FitRes layout, each with a
``secaggplus_configs`` record naming the protocol stage. ``secaggplus_mod`` answers the key-exchange
stages itself; in the "collect masked vectors" stage it calls the handler below, which runs the same
local round as a normal run (client/training.py, via the site worker). The site's head update
(trained head minus the head it received) is then quantized and masked, so only the masked update
leaves the site; the server adds the mean update to the global head. Updates, not heads, are masked
because SecAgg+ quantizes values in [-secagg-clipping-range, secagg-clipping-range]: updates are
small and bounded, while a head can hold large values (InfoNCE's logit scale). Under client-level
DP, Flower's legacy ``fixedclipping_mod`` clips the update, then the site adds its share of the
Gaussian noise (std sigma * C / sqrt(min-sites)) before masking: the shares sum to the central
mechanism's noise, so the server only ever unmasks a noisy sum (distributed DP).

The head travels as a list in the server's key order (``head-keys`` in the fit config), with 0-d
parameters as shape (1,) so that clipping and masking cover them (see common/dp_clipping.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.clipping import requested_clipping_norm
from client.egress import declined_reply
from common.config import RunSettings, SiteSettings
from common.errors import ConfigError
from common.wire import (
    HEAD_KEYS,
    HEAD_SHAPES,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    ROUND_OFFSET,
    SERVER_ROUND,
    TASK_CLASSES,
)

log = logging.getLogger(__name__)

# incoming head arrays + the round's config -> the local round's result (client/training.py execute)
LocalRound = Callable[[dict[str, np.ndarray], dict[str, Any]], dict[str, Any]]


class SiteDeclined(Exception):
    """The site declined the round (its sample-level privacy budget); it drops out of SecAgg+."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def secagg_train(
    msg: Message, context: Context, *, site: SiteSettings, local_round: LocalRound
) -> Message:
    """Answer one SecAgg+ stage (a decline becomes the site's decline reply)."""
    run = RunSettings.from_run_config(dict(context.run_config))
    clip_norm = requested_clipping_norm(msg)

    def fit(message: Message, ctx: Context) -> Message:
        return _fit(message, run=run, site=site, local_round=local_round)

    def update(message: Message, ctx: Context) -> Message:
        return site_update(message, ctx, fit, run=run, site=site, clipping_norm=clip_norm)

    try:
        return secaggplus_mod(msg, context, update)
    except SiteDeclined as declined:
        return declined_reply(msg, declined.reason)


def site_update(
    message: Message,
    context: Context,
    fit: Callable[[Message, Context], Message],
    *,
    run: RunSettings,
    site: SiteSettings,
    clipping_norm: float | None,
) -> Message:
    """What ``secaggplus_mod`` masks: the trained head's update over the received head; under
    client-level DP clipped to ``clipping_norm`` (Flower's ``fixedclipping_mod``) plus this site's
    share of the Gaussian noise."""
    if clipping_norm is None:
        return _as_update(fit(message, context), message, run=run, site=site)
    clipped = fixedclipping_mod(message, context, fit)
    noisy = _add_noise_share(clipped, message, std=noise_share_std(run, clipping_norm))
    return _as_update(noisy, message, run=run, site=site)


def noise_share_std(run: RunSettings, clipping_norm: float) -> float:
    """Each site's Gaussian noise std under SecAgg+ with client-level DP: sigma * C / sqrt(m).

    The m = ``min-sites`` shares sum to noise of std sigma * C on the sum of m clipped updates,
    exactly the central mechanism's, so the server that unmasks the sum only ever sees it noisy.
    """
    return run.client_dp_noise_multiplier * clipping_norm / math.sqrt(run.min_sites)


def _add_noise_share(reply: Message, received: Message, *, std: float) -> Message:
    """The clipped fit reply with this site's share of the Gaussian noise added (fresh OS entropy)."""
    if reply.has_error():
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    rng = np.random.default_rng()  # seeded from the OS, never from the run's seed
    noisy = [
        (a + rng.normal(0.0, std, size=a.shape)).astype(np.float32)
        for a in parameters_to_ndarrays(fitres.parameters)
    ]
    fitres.parameters = ndarrays_to_parameters(noisy)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=received)


def _fit(
    message: Message, *, run: RunSettings, site: SiteSettings, local_round: LocalRound
) -> Message:
    """NumPyClient-style fit: the site's normal local round on the head the server sent."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fitins.config)
    names: list[str] = json.loads(str(config[HEAD_KEYS]))
    shapes: dict[str, list[int]] = json.loads(str(config[HEAD_SHAPES]))
    received = parameters_to_ndarrays(fitins.parameters)
    if len(received) != len(names):
        raise ConfigError(
            f"site {site.name}: the server sent {len(received)} arrays for {len(names)} head keys"
        )
    incoming = {n: a.reshape(shapes[n]) for n, a in zip(names, received, strict=True)}
    round_config: dict[str, Any] = {
        SERVER_ROUND: int(config[SERVER_ROUND]),
        ROUND_OFFSET: 0,
        PROXIMAL_MU: float(config.get(PROXIMAL_MU, 0.0)),
    }
    if TASK_CLASSES in config:
        round_config[TASK_CLASSES] = str(config[TASK_CLASSES])
    result = local_round(incoming, round_config)
    if result.get("declined"):
        raise SiteDeclined(str(result.get("reason", "")))
    trained: dict[str, np.ndarray] = result["arrays"]
    if list(trained) != names:
        raise ConfigError(f"site {site.name}: the trained head's keys differ from the server's")
    metrics = dict(result["metrics"])
    examples = int(metrics.get(NUM_EXAMPLES, 0))
    # SecAgg+ weighs each masked head by num_examples / max_weight; under client-level DP the noise
    # is calibrated to the plain mean, so every site weighs 1 (server/secagg.py sets max_weight 1).
    weight = 1 if run.client_dp != "off" else max(1, min(examples, int(run.secagg_max_weight)))
    if run.client_dp == "off" and examples > run.secagg_max_weight:
        log.warning(
            "site %s: %d training examples exceed secagg-max-weight %g; weighing it %d",
            site.name,
            examples,
            run.secagg_max_weight,
            weight,
        )
    # Sent as received: 0-d parameters as shape (1,). Flower 1.41 neither clips (fixedclipping_mod)
    # nor un-offsets/rescales (SecAggPlusWorkflow.unmask_stage) a 0-d array: both scale in place,
    # which a numpy scalar ignores.
    parameters = [np.asarray(trained[n], dtype=np.float32).reshape(shapes[n] or [1]) for n in names]
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(parameters),
        num_examples=weight,
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def _as_update(
    reply: Message, received: Message, *, run: RunSettings, site: SiteSettings
) -> Message:
    """The reply with the trained (and clipped) head replaced by its update over the received head.

    SecAgg+ clips values to [-clipping-range, clipping-range] before quantizing them: an update
    that would be silently altered is refused (the site then drops out of the round).
    """
    if reply.has_error():
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    start = parameters_to_ndarrays(
        compat.recorddict_to_fitins(received.content, keep_input=True).parameters
    )
    trained = parameters_to_ndarrays(fitres.parameters)
    if [t.shape for t in trained] != [s.shape for s in start]:
        raise ConfigError(
            f"site {site.name}: the trained head's shapes differ from the received head's"
        )
    update = [(t - s).astype(np.float32) for t, s in zip(trained, start, strict=True)]
    bound = run.secagg_clipping_range
    for index, array in enumerate(update):
        peak = float(np.abs(array).max()) if array.size else 0.0
        if not peak <= bound:
            raise ConfigError(
                f"site {site.name}: the update of head array {index} reaches {peak:.4g}, outside "
                f"secagg-clipping-range {bound:g}; raise secagg-clipping-range in the run-config"
            )
    fitres.parameters = ndarrays_to_parameters(update)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=received)
