"""Client-level differential privacy of the global head, for any loss: Flower's fixed-clipping DP wrappers.

With ``client-dp`` on, each round releases ``mean(clipped updates of the m sampled sites) +
N(0, (sigma * C / m)^2)``: Flower's ``DifferentialPrivacyClientSideFixedClipping`` (sites clip with
``fixedclipping_mod``, see client/clipping.py) or ``DifferentialPrivacyServerSideFixedClipping`` (the
server clips) around FedAvg (or FedProx, whose aggregation is FedAvg's). Flower's ``RdpAccountant``
composes every released round, and the run's history records the federation's (epsilon, delta).

What the guarantee assumes, and how this module makes it hold:

- Neighbouring federations differ by one site's whole data (add/remove one site); the number m of
  sites per round (= ``min-sites``) is public. No credit is taken for sampling (Flower's fixed-clipping
  accounting supports only ``no-amplification``): each released round is one Gaussian mechanism with
  noise multiplier sigma on a sum of sensitivity C, whatever the total number of sites.
- FedAvg must weight sites equally (the noise is calibrated to the plain mean of m clipped updates).
  FedAvg weights by ``num-examples``; here it weights by ``WEIGHT_KEY``, which the server sets to 1 on
  every train reply (federated evaluation stays example-weighted).
- Exactly m valid updates per released round: every reply is validated (server/strategy/contract.py) BEFORE
  Flower's wrapper sees it (clipping a malformed update would crash or mis-clip), and Flower's strict
  accounted mode then releases nothing in a round with fewer than m valid updates (the global head
  stays unchanged and no privacy is spent). Each round samples exactly m of the connected sites.
- Client-side clipping is checked: an update above the clipping norm (plus float32 slack) is rejected.
- The noise comes from numpy's global generator (Flower's code); it is reseeded from ``os.urandom``
  before every release, so no seed set elsewhere in the process makes the noise reproducible.

Not covered: per-site metrics in train/evaluate replies (the server is trusted with them, as with the
individual updates in central DP), and anything the history reveals about failed or rejected sites.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyAccountant,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from common.config import RunSettings
from common.dp_clipping import lift_scalars, record_shapes, restore_shapes
from common.errors import ConfigError
from common.wire import NUM_EXAMPLES
from server.strategy import BASES, strategy_kwargs

WEIGHT_KEY = "client-dp-weight"  # FedAvg's weight under client-level DP, set by the server
ACCOUNTING = "rdp (Flower RdpAccountant): add/remove one site, no sampling amplification"
# Clipping runs in float32, so the norm the server measures can exceed C by rounding (relative
# ~1e-7 of the head's norm). An honest site stays within this slack; one that skipped clipping does not.
CLIP_RELATIVE_SLACK = 1e-4
CLIP_ABSOLUTE_SLACK = 1e-5


class _FedEmbedDp(DifferentialPrivacyFixedClippingBase):
    """What fedembed adds to Flower's wrappers: equal FedAvg weights and fresh noise entropy."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        weighted = [_with_weight(reply, lambda _: 1.0) for reply in replies]
        np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
        return super().aggregate_train(server_round, weighted)  # type: ignore[safe-super]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        weighted = [_with_weight(reply, lambda m: m.get(NUM_EXAMPLES)) for reply in replies]
        return super().aggregate_evaluate(server_round, weighted)


class ClientSideDp(_FedEmbedDp, DifferentialPrivacyClientSideFixedClipping):
    """Sites clip their update (client/clipping.py); the server adds the noise and accounts."""


class ServerSideDp(_FedEmbedDp, DifferentialPrivacyServerSideFixedClipping):
    """The server clips every update, adds the noise and accounts (scalar parameters included:
    Flower's clipping skips 0-d arrays, see common/dp_clipping.py)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shapes = record_shapes(self.current_arrays)
        self.current_arrays = lift_scalars(self.current_arrays)
        arrays, metrics = super().aggregate_train(server_round, [_lifted(r) for r in replies])
        return (None if arrays is None else restore_shapes(arrays, shapes)), metrics


class ClientDp:
    """One run's client-level DP: the Flower strategy to aggregate with and the per-round privacy report.

    ``history`` holds the rounds already trained when a run resumes: their releases are charged again,
    so epsilon keeps growing across restarts of the coordinator.
    """

    def __init__(self, run: RunSettings, *, history: Sequence[Mapping[str, Any]] = ()) -> None:
        if run.client_dp == "off":
            raise ConfigError("run-config: client-dp is off")
        self.mode = run.client_dp
        self.noise_multiplier = run.client_dp_noise_multiplier
        self.clipping_norm = run.client_dp_clipping_norm
        self.delta = run.client_dp_delta
        self.sites_per_round = run.min_sites
        self.accountant = _rdp_accountant(
            PrivacyConfig(
                target_delta=self.delta,
                population_size=self.sites_per_round,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        self._replay(history)
        self._releases = self.accountant.num_releases
        wrapper = ClientSideDp if self.mode == "client-side" else ServerSideDp
        self.strategy: DifferentialPrivacyFixedClippingBase = wrapper(
            _equal_weight_fedavg(run),
            self.noise_multiplier,
            self.clipping_norm,
            self.sites_per_round,
            accountant=self.accountant,
        )

    @property
    def update_norm_bound(self) -> float:
        """The largest update norm the server accepts (replaces ``max-update-norm``).

        Client-side: the clipping norm (with float32 slack): a larger update was not clipped.
        Server-side: no bound, the server clips every update to the clipping norm itself.
        """
        if self.mode == "client-side":
            return self.clipping_norm * (1 + CLIP_RELATIVE_SLACK) + CLIP_ABSOLUTE_SLACK
        return math.inf

    @property
    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise added to each coordinate of the mean update."""
        return self.noise_multiplier * self.clipping_norm / self.sites_per_round

    def round_record(self) -> dict[str, Any]:
        """The privacy of the federation after the round just aggregated (call once per round)."""
        released = self.accountant.num_releases > self._releases
        self._releases = self.accountant.num_releases
        spent = self.accountant.get_privacy_spent()
        return {
            "mode": self.mode,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "sites_per_round": self.sites_per_round,
            "noise_std": self.noise_std,
            "released": released,
            "releases": spent.num_releases,
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "accounting": ACCOUNTING,
        }

    def _replay(self, history: Sequence[Mapping[str, Any]]) -> None:
        for entry in history:
            record = entry.get("client_dp")
            if not isinstance(record, Mapping):
                raise ConfigError(
                    f"run-config: client-dp is on, but round {entry.get('round')} of the resumed run "
                    "was trained without it; no guarantee can cover that round: use a new run-dir"
                )
            if record.get("released"):
                # Without amplification a release costs what its noise multiplier says, whatever
                # the sample size it had.
                self.accountant.compose(
                    GaussianPrivacyEvent(
                        noise_multiplier=float(record["noise_multiplier"]),
                        sample_size=self.sites_per_round,
                        population_size=self.sites_per_round,
                    )
                )


def client_dp(run: RunSettings, *, history: Sequence[Mapping[str, Any]] = ()) -> ClientDp | None:
    """The run's client-level DP, or None when ``client-dp`` is off."""
    return None if run.client_dp == "off" else ClientDp(run, history=history)


def _equal_weight_fedavg(run: RunSettings) -> FedAvg:
    """``run.strategy`` (FedAvg or FedProx) weighting sites by ``WEIGHT_KEY`` and training exactly
    ``min-sites`` sites per round, drawn at random among the connected ones."""
    base = BASES[run.strategy]
    size = run.min_sites

    class ExactSample(base):  # type: ignore[valid-type, misc]
        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            return random.sample(messages, size) if len(messages) > size else messages

    strategy: FedAvg = ExactSample(**{**strategy_kwargs(run), "weighted_by_key": WEIGHT_KEY})
    return strategy


def _lifted(reply: Message) -> Message:
    if not reply.has_error():
        for name, record in list(reply.content.array_records.items()):
            reply.content[name] = lift_scalars(record)
    return reply


def _with_weight(reply: Message, weight: Callable[[MetricRecord], Any]) -> Message:
    """``reply`` with FedAvg's weight ``weight(metrics)`` under ``WEIGHT_KEY`` (replies Flower would
    refuse anyway, errors or several metric records, are left alone)."""
    records = reply.content.metric_records if not reply.has_error() else {}
    if len(records) == 1:
        metrics = next(iter(records.values()))
        value = weight(metrics)
        if value is not None:
            metrics[WEIGHT_KEY] = value
    return reply


def _rdp_accountant(config: PrivacyConfig) -> PrivacyAccountant:
    from flwr.serverapp import RdpAccountant  # needs flwr[dp] (dp-accounting)

    return RdpAccountant(config)
