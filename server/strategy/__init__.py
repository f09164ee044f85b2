"""Flower strategies for fedembed: Flower's own aggregation, plus update validation and per-round accounting.

Every reply is classified per site before anything is aggregated:

- aggregated: a valid update that went into the global head;
- rejected: the reply broke the update contract (keys, shapes, dtypes, finite values, norm bound,
  records, metrics) and was dropped without being decoded further than needed;
- declined: the site said no (common/wire.py DECLINED_ERROR_CODE, e.g. its privacy budget is spent);
- failed: the site's ClientApp raised (an error reply from the site);
- dropped: no reply within the round timeout, or Flower reports the node unavailable (dead).

A round in which nothing reaches the global head counts against run-config ``max-empty-rounds``
(``EmptyRounds``): one too many in a row raises EmptyRoundError, naming each site's outcome, and
the ServerApp fails the run (no final head).

Sites name themselves (client/identity.py): a ``site`` ConfigRecord ``{"name": ...}`` beside the
update, and a ``[site NAME]`` prefix on error reasons. Node ids change when a SuperNode restarts;
names do not, so history and logs show both.

Modules: ``contract`` (what a valid reply is), ``rounds`` (per-round bookkeeping), ``wrapper`` (the
strategy around Flower's), ``factory`` (the strategy a run-config names), ``state`` (the server
optimiser's state that a checkpoint keeps, so a resumed run continues as an uninterrupted one).
"""

from server.strategy.contract import UpdateCheck, classify_error, metric_problem, site_name
from server.strategy.factory import BASES, build_strategy, strategy_kwargs
from server.strategy.rounds import (
    OUTCOME_KINDS,
    Accounting,
    EmptyRoundError,
    EmptyRounds,
    RoundLog,
    RunFailed,
    metrics_mean,
    require_trained,
    round_counts,
)
from server.strategy.wrapper import FedEmbedStrategy

__all__ = [
    "BASES",
    "OUTCOME_KINDS",
    "Accounting",
    "EmptyRoundError",
    "EmptyRounds",
    "FedEmbedStrategy",
    "RoundLog",
    "RunFailed",
    "UpdateCheck",
    "build_strategy",
    "classify_error",
    "metric_problem",
    "metrics_mean",
    "require_trained",
    "round_counts",
    "site_name",
    "strategy_kwargs",
]
