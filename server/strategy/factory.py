"""Flower's strategy named by the run-config, wrapped (server/strategy/wrapper.py)."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunSettings
from common.wire import NUM_EXAMPLES
from server.strategy.contract import UpdateCheck
from server.strategy.rounds import Accounting, EmptyRounds
from server.strategy.state import RunFedAdam
from server.strategy.wrapper import FedEmbedStrategy

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": RunFedAdam,  # Flower's FedAdam; its bias correction counts the run's rounds
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def build_strategy(
    run: RunSettings,
    *,
    check: UpdateCheck,
    accounting: Accounting,
    round_offset: int = 0,
    aggregator: Strategy | None = None,
) -> FedEmbedStrategy:
    """Flower's strategy named by ``run.strategy``, wrapped to validate, account and skip evaluation.

    ``aggregator`` replaces that strategy (server/privacy.py passes Flower's client-level DP wrapper
    around FedAvg): every reply is still validated here first, and only valid ones reach it.
    """
    inner = aggregator if aggregator is not None else BASES[run.strategy](**strategy_kwargs(run))
    if isinstance(inner, RunFedAdam):
        inner.round_offset = round_offset
    return FedEmbedStrategy(
        inner,
        check=check,
        accounting=accounting,
        round_offset=round_offset,
        evaluate_every=run.eval_every,
        last_round=run.num_server_rounds,
        min_available=run.min_sites,
        empty_rounds=EmptyRounds(run.max_empty_rounds),
    )


def strategy_kwargs(run: RunSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "fraction_train": run.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": run.min_sites,
        "min_evaluate_nodes": run.min_sites,
        "min_available_nodes": run.min_sites,
        "weighted_by_key": NUM_EXAMPLES,
    }
    if run.strategy == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    elif run.strategy == "fedavgm":
        kwargs["server_momentum"] = run.server_momentum
    elif run.strategy in ("fedadam", "fedyogi"):
        kwargs["eta"] = run.server_lr
    elif run.strategy == "fedtrimmedavg":
        kwargs["beta"] = run.trim_beta
    elif run.strategy == "krum":
        kwargs["num_malicious_nodes"] = max(0, (run.min_sites - 3) // 2)
    return kwargs
