"""Secure aggregation run mode (SecAgg+): Flower's legacy SecAgg+ workflow, so the server learns only the sum.

With ``secure-aggregation = true`` the ServerApp hands over to Flower's ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` fit step (Flower 1.41 offers SecAgg+ only in its legacy ServerApp API). Each
round is four message exchanges with the sampled sites: public keys, encrypted key shares, the sites'
masked head updates (quantized to integers and masked with pairwise and private masks), and the
shares the server needs to remove the masks of the sum. The server sees no individual update, only
the example-weighted mean, which it adds to the global head (= FedAvg); only head arrays are ever
masked and sent (client/secagg.py).

Each round trains exactly ``min-sites`` sites (drawn at random among the connected ones), so the
protocol's number of shares and reconstruction threshold are fixed by the run-config. With
``client-dp = client-side`` sites clip their update (Flower's legacy ``fixedclipping_mod``), every
site weighs 1, and each site adds its share of the Gaussian noise before masking (std sigma * C /
sqrt(min-sites); the shares sum to the central mechanism's noise std sigma * C on the sum), so the
server only ever unmasks a noisy sum (distributed DP). The server accounts with Flower's RDP
accountant (server/privacy.py): a round where fewer than ``min-sites`` sites' updates (and so noise
shares) were summed releases nothing.

Limits: the guarantee assumes the sites follow the protocol (if k of m sites skip their noise share,
the effective noise multiplier falls to sigma * sqrt((m - k) / m)); site metrics and weights travel
in the clear as in normal runs; and Flower 1.41 derives masks from 32-bit seeds
(``numpy.random.RandomState``), far below cryptographic strength. Resuming a run is not supported in this mode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import GaussianPrivacyEvent, Grid

from common.config import RunSettings
from common.flower import record_nbytes
from common.wire import HEAD_KEYS, HEAD_SHAPES, PROXIMAL_MU, SERVER_ROUND
from server.checkpoints import RunStore
from server.history import write_round
from server.privacy import ClientDp, client_dp
from server.receipts import ReceiptGrid
from server.strategy import Accounting, EmptyRounds, RoundLog, classify_error, require_trained

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32  # Flower's default mask modulus


def secagg_protocol(run: RunSettings) -> dict[str, Any]:
    """The SecAgg+ parameters of ``run`` (as recorded in run.json and the history)."""
    return {
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow)",
        "sites_per_round": run.min_sites,
        "num_shares": run.secagg_shares,
        "reconstruction_threshold": run.secagg_threshold,
        "clipping_range": run.secagg_clipping_range,
        "quantization_range": run.secagg_quantization_range,
        "modulus_range": MODULUS_RANGE,
        "max_weight": 1.0 if run.client_dp != "off" else run.secagg_max_weight,
    }


def secagg_workflow(run: RunSettings) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow for exactly ``min-sites`` sites per round.

    Shares: ``1.0`` (Flower: every sampled site) when they equal the sites per round, else the
    (odd) number. The threshold is passed as a fraction of the shares, which Flower turns back into
    the same integer without its "threshold < shares" rule for integer pairs.
    """
    protocol = secagg_protocol(run)
    shares = run.secagg_shares
    return SecAggPlusWorkflow(
        num_shares=1.0 if shares == run.min_sites else shares,
        reconstruction_threshold=run.secagg_threshold / shares,
        max_weight=protocol["max_weight"],
        clipping_range=run.secagg_clipping_range,
        quantization_range=run.secagg_quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=run.round_timeout,
    )


class ProtocolGrid(ReceiptGrid):
    """``ReceiptGrid`` that also counts each round's protocol bytes per site and records site errors
    (as ``"<stage>: <reason>"``) in the round's RoundLog; receipts go to ``run_dir`` if given."""

    def __init__(
        self,
        grid: Grid,
        *,
        poll_interval: float,
        first_round_timeout: float | None = None,
        run_dir: Path | None = None,
        run_id: int = 0,
    ) -> None:
        super().__init__(
            grid,
            run_dir=run_dir,
            run_id=run_id,
            poll_interval=poll_interval,
            first_round_timeout=first_round_timeout,
        )
        self.accounting = Accounting()  # names: node id -> the name the site gave

    def round_log(self, server_round: int) -> RoundLog:
        return self.accounting.current(server_round)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stages: dict[int, str] = {}
        for message in messages:
            node = message.metadata.dst_node_id
            traffic = self.round_log(int(message.metadata.group_id or 0))
            traffic.bytes_sent[node] = traffic.bytes_sent.get(node, 0) + content_nbytes(
                message.content
            )
            configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
            stages[node] = str(configs.get(Key.STAGE, "")) if configs is not None else ""
        replies = list(super().send_and_receive(messages, timeout=timeout))
        # A SuperLink-generated error (dead node) comes from node 1: map replies to their target.
        target = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered: set[int] = set()
        for reply in replies:
            node = target.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            traffic = self.round_log(int(reply.metadata.group_id or 0))
            self.accounting.learn_name(node, reply)
            if node in self.accounting.names:
                traffic.names[node] = self.accounting.names[node]
            if reply.has_error():
                kind, reason = classify_error(reply)
                getattr(traffic, kind)[node] = f"{stages.get(node, '?')}: {reason}"
            else:
                traffic.bytes_received[node] = traffic.bytes_received.get(node, 0) + content_nbytes(
                    reply.content
                )
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in answered:
                traffic = self.round_log(int(message.metadata.group_id or 0))
                traffic.dropped[node] = (
                    f"{stages.get(node, '?')}: no reply within the round timeout"
                )
        return replies


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays (npy bytes), bytes/str values, 8 per number."""
    total = sum(record_nbytes(record) for record in content.array_records.values())
    for config in content.config_records.values():
        total += sum(_value_nbytes(value) for value in config.values())
    for metrics in content.metric_records.values():
        total += sum(_value_nbytes(value) for value in metrics.values())
    return total


def _value_nbytes(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_nbytes(item) for item in value)
    return 8


class HeadCodec:
    """The head as SecAgg+ carries it: a list in key order, 0-d parameters as shape (1,)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}

    def encode(self, arrays: Mapping[str, np.ndarray]) -> Parameters:
        return ndarrays_to_parameters(
            [
                np.asarray(arrays[n], dtype=np.float32).reshape(s or (1,))
                for n, s in self.shapes.items()
            ]
        )

    def decode(self, ndarrays: NDArrays) -> dict[str, np.ndarray]:
        if len(ndarrays) != len(self.shapes):
            raise ValueError(f"{len(ndarrays)} aggregated arrays for {len(self.shapes)} head keys")
        return {
            name: np.asarray(a, dtype=np.float32).reshape(shape)
            for (name, shape), a in zip(self.shapes.items(), ndarrays, strict=True)
        }

    def fit_config(self) -> dict[str, Scalar]:
        return {
            HEAD_KEYS: json.dumps(list(self.shapes)),
            HEAD_SHAPES: json.dumps({n: list(s) for n, s in self.shapes.items()}),
        }


class SecAggFedAvg(FedAvg):
    """Flower's legacy FedAvg sampling exactly ``min-sites`` sites, with the round's fit config,
    recording each round's summed sites and metrics for the history. Sites send their update, so
    the aggregate (their weighted mean update) is added to the round's global head."""

    def __init__(
        self,
        run: RunSettings,
        codec: HeadCodec,
        *,
        task_config: Mapping[str, Scalar] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=run.min_sites,
            min_evaluate_clients=run.min_sites,
            min_available_clients=run.min_sites,
            on_fit_config_fn=self._fit_config,
            **kwargs,
        )
        self.codec = codec
        self.task_config = dict(task_config or {})  # server/model.task_config: declared classes
        self.proximal_mu = run.proximal_mu if run.strategy == "fedprox" else 0.0
        self.summed: dict[int, dict[int, dict[str, float]]] = {}
        self.released: dict[int, bool] = {}  # round -> its aggregate replaced the global head
        self.current: NDArrays = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.current = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        return self.min_fit_clients, self.min_available_clients

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {
            SERVER_ROUND: server_round,
            **self.codec.fit_config(),
            **self.task_config,
        }
        if self.proximal_mu > 0:
            config[PROXIMAL_MU] = self.proximal_mu
        return config

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.summed[server_round] = {
            proxy.node_id: {
                **{k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)},
                "secagg-weight": float(res.num_examples),
            }
            for proxy, res in results
        }
        mean_update, metrics = super().aggregate_fit(server_round, results, failures)
        self.released[server_round] = mean_update is not None
        if mean_update is None:
            return None, metrics
        head = [
            (g + u).astype(np.float32)
            for g, u in zip(self.current, parameters_to_ndarrays(mean_update), strict=True)
        ]
        return ndarrays_to_parameters(head), metrics


class StrictClientSideDp(DifferentialPrivacyClientSideFixedClipping):
    """Flower's legacy client-side fixed-clipping wrapper (it asks sites to clip) for distributed
    noise: sites add the noise before masking, so this only checks that exactly ``min-sites`` noise
    shares were summed (else nothing is released) and charges each release to ``dp``."""

    def __init__(self, strategy: SecAggFedAvg, dp: ClientDp) -> None:
        super().__init__(strategy, dp.noise_multiplier, dp.clipping_norm, dp.sites_per_round)
        self.fedavg = strategy
        self.dp = dp

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        aggregated, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if aggregated is None or len(results) != self.num_sampled_clients:
            self.fedavg.released[server_round] = False
            log.warning(
                "round %d: %d of %d sites summed; nothing released (no privacy spent)",
                server_round,
                len(results),
                self.num_sampled_clients,
            )
            return None, {}
        # No noise is added here: each site added its share (client/secagg.py noise_share_std)
        # before masking, so ``aggregated`` is already the noisy mean the central mechanism releases.
        self.dp.accountant.compose(
            GaussianPrivacyEvent(
                noise_multiplier=self.noise_multiplier,
                sample_size=self.num_sampled_clients,
                population_size=self.num_sampled_clients,
            )
        )
        return aggregated, metrics


def run_secure_federation(
    grid: Grid, context: Context, run: RunSettings, *, data_spec: Mapping[str, Any]
) -> Path:
    """Train the global head with SecAgg+ for ``run.num_server_rounds`` rounds; return the run dir."""
    from common.artifacts import state_arrays
    from server.model import ServerEvaluator, initial_model, task_config

    store = RunStore(run.run_path)
    model, task = initial_model(run)
    arrays = state_arrays(model)
    codec = HeadCodec(arrays)
    protocol = secagg_protocol(run)
    meta = {"model": model.describe(), "run": run.to_dict(), "task": task, "data": dict(data_spec)}
    store.start_fresh(arrays, meta)
    store.write_run_info(
        {
            "flower_run_id": context.run_id,
            "started_round": 0,
            "secure_aggregation": protocol,
            **meta,
        }
    )
    evaluator = ServerEvaluator(run) if run.server_eval else None
    protocol_grid = ProtocolGrid(
        grid,
        poll_interval=run.reply_poll_interval,
        first_round_timeout=run.first_round_timeout or None,
        run_dir=store.root,  # a receipt (digest) of every protocol reply: <run-dir>/replies.jsonl
        run_id=context.run_id,
    )
    dp = client_dp(run)
    empty_rounds = EmptyRounds(run.max_empty_rounds)

    def evaluate_fn(
        server_round: int, ndarrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Log the round (Flower's workflow calls this after every round, even a halted one),
        stop the run after too many empty rounds, else checkpoint the head."""
        if server_round == 0:
            return None
        entry = protocol_grid.round_log(server_round)
        updated = fedavg.released.get(server_round, False)
        summed = fedavg.summed.get(server_round, {})
        entry.sampled = sorted(entry.bytes_sent)
        entry.sites = sorted(summed)
        entry.site_metrics = {node: dict(m) for node, m in summed.items()}
        entry.head_updated = updated
        current = codec.decode(ndarrays)
        server_metrics = evaluator.evaluate(current) if evaluator else {}
        write_round(  # history before checkpoint, as in server/app.py
            store,
            entry,
            server_metrics,
            dp.round_record() if dp else None,
            extra={"secure_aggregation": protocol},
            note=" (securely summed)",
        )
        reasons = entry.shortfalls()
        if not updated and summed:
            reasons.append(
                f"{len(summed)} site(s) summed, but the sum was not released "
                f"(client-dp releases only the sum of all {run.min_sites} sites' noise shares)"
            )
        empty_rounds.record(server_round, updated=updated, reasons=reasons)
        store.save_checkpoint(server_round, current, meta)
        return None

    fedavg = SecAggFedAvg(
        run,
        codec,
        task_config=task_config(task),
        initial_parameters=codec.encode(arrays),
        evaluate_fn=evaluate_fn,
    )
    strategy = StrictClientSideDp(fedavg, dp) if dp else fedavg
    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=run.num_server_rounds, round_timeout=run.round_timeout),
        strategy=strategy,
    )
    print(
        f"[fedembed] secure aggregation (SecAgg+): {run.min_sites} sites per round, "
        f"{protocol['num_shares']} shares, threshold {protocol['reconstruction_threshold']}",
        flush=True,
    )
    DefaultWorkflow(fit_workflow=secagg_workflow(run))(protocol_grid, legacy)
    final = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
    )
    require_trained(store.read_history())
    store.export_final(
        model,
        codec.decode(final),
        {**meta, "rounds": run.num_server_rounds, "secure_aggregation": protocol},
    )
    return store.root
