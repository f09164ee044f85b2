"""The server optimiser's own state (FedAdam/FedYogi moments, FedAvgM momentum), kept with each checkpoint.

These strategies carry state from round to round beside the global head. A resumed run that
restored only the head would restart them from zero (and FedAdam's bias correction from round 1):
it would not continue as the uninterrupted run would have. ``optimizer_state`` names the state's
arrays (``m_t/<head key>``, ``v_t/<head key>``, ``momentum/<head key>``); ``restore_optimizer_state``
puts them back. Strategies without state (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, and
client-level DP) give and take an empty mapping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

_MOMENTS = ("m_t", "v_t")
_MOMENTUM = "momentum"


class RunFedAdam(FedAdam):
    """Flower's FedAdam counting rounds from the run's start: its bias correction (which depends on
    the round) continues across a resume instead of restarting at round 1."""

    round_offset = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round + self.round_offset, replies)


def optimizer_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The arrays of ``strategy``'s server-side optimiser state after its last round (empty if none)."""
    state: dict[str, np.ndarray] = {}
    if isinstance(strategy, FedOpt):
        for part in _MOMENTS:
            for key, value in (getattr(strategy, part) or {}).items():
                state[f"{part}/{key}"] = np.asarray(value)
    elif isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        keys = list(strategy.current_arrays.keys()) if strategy.current_arrays is not None else []
        for key, value in zip(keys, strategy.momentum_vector, strict=True):
            state[f"{_MOMENTUM}/{key}"] = np.asarray(value)
    return state


def restore_optimizer_state(
    strategy: Strategy, state: Mapping[str, np.ndarray], head_keys: Sequence[str]
) -> None:
    """Put back what :func:`optimizer_state` gave (``head_keys``: the head's arrays, in order)."""
    if isinstance(strategy, FedOpt):
        for part in _MOMENTS:
            values = {
                k: np.asarray(state[f"{part}/{k}"]) for k in head_keys if f"{part}/{k}" in state
            }
            setattr(strategy, part, values or None)
    elif isinstance(strategy, FedAvgM):
        momentum = [state.get(f"{_MOMENTUM}/{k}") for k in head_keys]
        present = [np.asarray(v) for v in momentum if v is not None]
        strategy.momentum_vector = present if len(present) == len(head_keys) else None


def has_optimizer_state(strategy: Strategy) -> bool:
    """Whether ``strategy`` keeps state beside the head from one round to the next."""
    if isinstance(strategy, FedAvgM):
        return strategy.server_momentum > 0
    return isinstance(strategy, FedOpt)
