"""Server-side update validation and aggregation, called in-process with real Flower messages."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.identity import site_identity_mod
from client.worker import WorkerFailed
from common.config import RunSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays
from common.wire import DECLINED_ERROR_CODE, SITE_RECORD
from server.strategy import (
    Accounting,
    EmptyRoundError,
    RunFailed,
    UpdateCheck,
    build_strategy,
    metrics_mean,
    require_trained,
    round_counts,
    site_name,
)
from tests.flower_messages import message_metadata

SHAPES = {"head.w": (4, 3), "head.b": (4,), "loss.logit_scale": ()}


def _global() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _reply(
    node: int,
    arrays: dict[str, np.ndarray],
    *,
    examples: float = 10,
    extra: RecordDict | None = None,
) -> Message:
    metadata = message_metadata(dst_node_id=node, src_node_id=0, message_id=f"m{node}")
    incoming = Message(metadata=metadata, content=RecordDict())  # type: ignore[call-overload]
    content = extra or RecordDict(
        {
            "arrays": record_from_arrays(arrays),
            "metrics": metric_record({"num-examples": examples, "train-loss": 1.0}),
        }
    )
    return Message(content=content, reply_to=incoming)


def _filled(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


CHECK = UpdateCheck(shapes=SHAPES, max_update_norm=50.0)


def test_valid_update_passes() -> None:
    assert CHECK.problems(_reply(1, _filled(1.0)), _global()) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda a: {**a, "head.extra": np.zeros(2, np.float32)}, "unexpected"),
        (lambda a: {k: v for k, v in a.items() if k != "head.b"}, "missing"),
        (lambda a: {**a, "head.w": np.zeros((3, 4), np.float32)}, "shape"),
        (lambda a: {**a, "head.w": np.zeros((4, 3), np.float64)}, "dtype"),
        (lambda a: {**a, "head.b": np.array([np.nan, 0, 0, 0], np.float32)}, "NaN"),
        (lambda a: {**a, "head.w": np.full((4, 3), 100.0, np.float32)}, "update norm"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason(mutate: object, expected: str) -> None:
    reply = _reply(1, mutate(_filled(1.0)))  # type: ignore[operator]
    problems = CHECK.problems(reply, _global())
    assert problems and expected in " ".join(problems)


def test_zero_or_missing_example_count_is_rejected() -> None:
    assert "num-examples" in " ".join(
        CHECK.problems(_reply(1, _filled(1.0), examples=0), _global())
    )


def test_extra_records_are_rejected() -> None:
    content = RecordDict(
        {
            "arrays": record_from_arrays(_filled(1.0)),
            "metrics": metric_record({"num-examples": 5}),
            "config": ConfigRecord({"leak": "patient 123"}),
        }
    )
    assert CHECK.problems(_reply(1, {}, extra=content), _global())


def test_aggregation_skips_a_poisoned_site_and_logs_it() -> None:
    run = RunSettings(min_sites=2)
    accounting = Accounting()
    accounting.global_arrays = _global()
    strategy = build_strategy(run, check=CHECK, accounting=accounting)
    replies = [
        _reply(1, _filled(1.0), examples=10),
        _reply(2, _filled(3.0), examples=30),
        _reply(3, {**_filled(1.0), "head.w": np.full((4, 3), np.inf, np.float32)}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    merged = arrays_from_record(arrays)
    np.testing.assert_allclose(merged["head.w"], 2.5)  # (10*1 + 30*3) / 40; site 3 excluded
    entry = accounting.rounds[1]
    assert (
        sorted(entry.sites) == [1, 2] and 3 in entry.rejected and "NaN or inf" in entry.rejected[3]
    )
    raw = sum(v.nbytes for v in _filled(1.0).values())
    assert (
        raw <= entry.bytes_received[1] <= raw + 160 * len(SHAPES)
    )  # serialized arrays: data + npy header


def test_all_updates_rejected_leaves_the_global_head_unchanged_or_stops_the_run() -> None:
    bad = {"bad": np.zeros(1, np.float32)}
    accounting = Accounting()
    accounting.global_arrays = _global()
    tolerant = build_strategy(RunSettings(max_empty_rounds=1), check=CHECK, accounting=accounting)
    arrays, metrics = tolerant.aggregate_train(1, [_reply(1, bad)])
    assert arrays is None and metrics is None and not accounting.rounds[1].head_updated
    strict = build_strategy(RunSettings(), check=CHECK, accounting=Accounting())
    with pytest.raises(EmptyRoundError, match=r"^round 1: no site's update was aggregated"):
        strict.aggregate_train(1, [_reply(1, bad)])


def test_fedmedian_resists_one_poisoned_but_valid_site() -> None:
    accounting = Accounting()
    accounting.global_arrays = _global()
    strategy = build_strategy(
        RunSettings(strategy="fedmedian", min_sites=3),
        check=UpdateCheck(shapes=SHAPES, max_update_norm=1e9),
        accounting=accounting,
    )
    honest = [_reply(i, _filled(1.0 + 0.01 * i)) for i in (1, 2)]
    poisoned = _reply(3, _filled(40.0))
    arrays, _ = strategy.aggregate_train(1, [*honest, poisoned])
    assert arrays is not None
    assert float(np.abs(arrays_from_record(arrays)["head.w"] - 1.0).max()) < 0.05


def test_example_weighted_metric_mean() -> None:
    site_metrics = {
        1: {"num-examples": 10.0, "eval-R@5": 0.2},
        2: {"num-examples": 30.0, "eval-R@5": 0.6},
    }
    assert metrics_mean(site_metrics)["eval-R@5"] == pytest.approx(0.5)


# ---------------------------------------------------------------- per-site outcomes and names


def _incoming(node: int, *, dst: int | None = None, message_type: str = "train") -> Message:
    """A message the server sent to ``node`` (id ``m<node>``), as the Grid leaves it after pushing."""
    metadata = message_metadata(
        dst_node_id=node if dst is None else dst,
        src_node_id=0,
        message_id=f"m{node}",
        message_type=message_type,
    )
    return Message(metadata=metadata, content=RecordDict())  # type: ignore[call-overload]


def _named(node: int, name: str, arrays: dict[str, np.ndarray], **metrics: float) -> Message:
    content = RecordDict(
        {
            "arrays": record_from_arrays(arrays),
            "metrics": metric_record({"num-examples": 10, **metrics}),
            SITE_RECORD: ConfigRecord({"name": name}),
        }
    )
    return Message(content=content, reply_to=_incoming(node))


class _Nodes(Grid):
    """The SuperLink's node list with liveness (``online_until``), all a strategy's sampling reads."""

    def __init__(self, online_until: dict[int, float]) -> None:
        self.online_until = online_until

    def get_node_ids(self) -> Iterable[int]:
        return list(self.online_until)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, online_until=t) for n, t in self.online_until.items()]

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not used by configure_train")

    set_run = create_message = push_messages = pull_messages = send_and_receive = _unused
    run = property(_unused)


@pytest.fixture
def serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets the identity of a ServerApp process; configure_train's messages need it."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _strategy(run: RunSettings | None = None) -> tuple[Any, Accounting]:
    accounting = Accounting()
    strategy = build_strategy(run or RunSettings(min_sites=2), check=CHECK, accounting=accounting)
    return strategy, accounting


def _configure(strategy: Any, server_round: int, grid: Grid) -> list[int]:
    sent = list(
        strategy.configure_train(server_round, record_from_arrays(_global()), ConfigRecord(), grid)
    )
    # The Grid gives pushed messages their ids; a unit test has to stand in for it.
    strategy._sent = [_incoming(m.metadata.dst_node_id) for m in sent]
    return [m.metadata.dst_node_id for m in sent]


@pytest.mark.usefixtures("serverapp_process")
def test_every_site_gets_a_named_outcome() -> None:
    strategy, accounting = _strategy()
    grid = _Nodes({11: 100.0, 12: 100.0, 13: 100.0, 14: 100.0, 15: 100.0})
    assert sorted(_configure(strategy, 1, grid)) == [11, 12, 13, 14, 15]
    declined = Message(
        Error(code=DECLINED_ERROR_CODE, reason="[site beta] site declined: privacy budget"),
        reply_to=_incoming(12),
    )
    crashed = Message(Error(code=2, reason="[site gamma] ValueError: boom"), reply_to=_incoming(13))
    dead = Message(  # Flower's own reply for a node that stopped heartbeating comes from node 1
        Error(code=5, reason="Node Unavailable"), reply_to=_incoming(14, dst=1)
    )
    arrays, _ = strategy.aggregate_train(
        1, [_named(11, "alpha", _filled(1.0)), declined, crashed, dead]
    )
    assert arrays is not None
    entry = accounting.rounds[1]
    assert entry.sites == [11]
    assert entry.declined == {12: "site declined: privacy budget"}
    assert entry.failed == {13: "ValueError: boom"}
    assert entry.dropped[14].startswith("node unavailable") and entry.dropped[15].startswith(
        "no reply"
    )
    assert entry.outcomes() == {
        "alpha": "aggregated",
        "beta": "declined: site declined: privacy budget",
        "gamma": "failed: ValueError: boom",
        "node 14": "dropped: node unavailable: Node Unavailable",
        "node 15": "dropped: no reply within the round timeout",
    }
    # Names persist across rounds: a site that dropped later is still named.
    _configure(strategy, 2, grid)
    strategy.aggregate_train(2, [_named(12, "beta", _filled(1.0))])
    assert accounting.rounds[2].outcomes()["alpha"] == "dropped: no reply within the round timeout"


@pytest.mark.usefixtures("serverapp_process")
def test_a_dropped_node_is_not_sampled_until_it_heartbeats_again() -> None:
    strategy, accounting = _strategy()
    grid = _Nodes({1_001: 50.0, 1_002: 50.0, 1_003: 50.0})
    _configure(strategy, 1, grid)
    strategy.aggregate_train(
        1, [_named(1_001, "a", _filled(1.0)), _named(1_002, "b", _filled(1.0))]
    )
    assert accounting.quarantine == {1_003: 50.0}
    # Round 2: no heartbeat from 1003 since (online_until unchanged): it is skipped, not waited for.
    assert sorted(_configure(strategy, 2, grid)) == [1_001, 1_002]
    assert 1_003 in accounting.rounds[2].skipped
    # A heartbeat moves online_until: the node is alive after all and is sampled again.
    grid.online_until[1_003] = 80.0
    assert sorted(_configure(strategy, 3, grid)) == [1_001, 1_002, 1_003]
    assert not accounting.quarantine


@pytest.mark.usefixtures("serverapp_process")
def test_quarantine_never_starves_sampling_below_min_sites() -> None:
    strategy, accounting = _strategy(RunSettings(min_sites=3))
    grid = _Nodes({1: 50.0, 2: 50.0, 3: 50.0})
    _configure(strategy, 1, grid)
    strategy.aggregate_train(1, [_named(1, "a", _filled(1.0)), _named(2, "b", _filled(1.0))])
    assert accounting.quarantine == {3: 50.0}
    assert sorted(_configure(strategy, 2, grid)) == [
        1,
        2,
        3,
    ]  # 2 left would block Flower's sampling


def test_site_record_must_be_exactly_a_name() -> None:
    good = _named(1, "site-0", _filled(1.0))
    assert CHECK.problems(good, _global()) == [] and site_name(good) == "site-0"
    for record in (
        ConfigRecord({"name": "x" * 200}),
        ConfigRecord({"name": "a b"}),
        ConfigRecord({"name": "ok", "note": "patient 123"}),
    ):
        content = RecordDict(
            {
                "arrays": record_from_arrays(_filled(1.0)),
                "metrics": metric_record({"num-examples": 5}),
                SITE_RECORD: record,
            }
        )
        reply = _reply(1, {}, extra=content)
        assert CHECK.problems(reply, _global()) and site_name(reply) is None


def test_oversized_payload_is_rejected_before_it_is_decoded() -> None:
    reply = _reply(1, _filled(1.0))
    array = reply.content.array_records["arrays"]["head.w"]
    array.data = array.data + b"\0" * 10_000_000  # declared (4, 3) float32, 10 MB of bytes
    problems = CHECK.problems(reply, _global())
    assert problems == [f"head.w: {len(array.data)} bytes for a (4, 3) float32 array"]


def test_garbage_bytes_are_rejected_not_raised() -> None:
    reply = _reply(1, _filled(1.0))
    reply.content.array_records["arrays"]["head.b"].data = b"not an npy file"
    assert "undecodable" in " ".join(CHECK.problems(reply, _global()))


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({f"m{i}": 1.0 for i in range(80)}, "metrics (at most"),
        ({"train-loss": [1.0, 2.0]}, "not a scalar"),
        ({"train-loss": float("nan")}, "not finite"),
    ],
)
def test_unusable_metrics_are_rejected(metrics: dict[str, Any], expected: str) -> None:
    content = RecordDict(
        {
            "arrays": record_from_arrays(_filled(1.0)),
            "metrics": MetricRecord({"num-examples": 5, **metrics}),
        }
    )
    assert expected in " ".join(CHECK.problems(_reply(1, {}, extra=content), _global()))


def test_different_metric_keys_do_not_crash_flowers_aggregation() -> None:
    """Flower's FedAvg raises InconsistentMessageReplies (killing the ServerApp) when replies carry
    different metric keys; the wrapper passes only the keys every valid reply has."""
    strategy, accounting = _strategy()
    replies = [
        _named(1, "a", _filled(1.0), **{"train-loss": 1.0}),
        _named(2, "b", _filled(3.0), **{"train-loss": 2.0, "surprise": 7.0}),
    ]
    accounting.global_arrays = _global()
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays_from_record(arrays)["head.w"], 2.0)
    assert set(metrics) == {"train-loss"}
    assert accounting.rounds[1].site_metrics[2]["surprise"] == 7.0  # still recorded per site


def test_invalid_evaluate_replies_are_ignored_and_recorded() -> None:
    strategy, accounting = _strategy(RunSettings(min_sites=2, num_server_rounds=1))

    def evaluate_reply(node: int, metrics: dict[str, Any]) -> Message:
        content = RecordDict({"metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=_incoming(node, message_type="evaluate"))

    replies = [
        evaluate_reply(1, {"num-examples": 10, "recall": 0.5}),
        evaluate_reply(2, {"num-examples": 30, "recall": 0.7, "extra": 1.0}),
        evaluate_reply(3, {"num-examples": 0, "recall": 0.9}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["recall"] == pytest.approx(0.65)
    assert set(accounting.rounds[1].evaluate_rejected) == {3}


def test_the_servers_classification_of_the_sites_decline_reply() -> None:
    from client.egress import declined_reply
    from server.strategy import classify_error

    msg = _incoming(2)
    assert classify_error(declined_reply(msg, "budget spent")) == (
        "declined",
        "site declined: budget spent",
    )


def test_identity_mod_names_replies_and_errors() -> None:
    context = Context(
        run_id=1, node_id=5, node_config={"site-name": "st-mary"}, state=RecordDict(), run_config={}
    )
    request = _incoming(5)

    def ok(msg: Message, ctx: Context) -> Message:
        content = RecordDict(
            {
                "arrays": record_from_arrays(_filled(1.0)),
                "metrics": metric_record({"num-examples": 3}),
            }
        )
        return Message(content=content, reply_to=msg)

    def declines(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=DECLINED_ERROR_CODE, reason="budget"), reply_to=msg)

    def raises(msg: Message, ctx: Context) -> Message:
        raise ValueError("disk full")

    named = site_identity_mod(request, context, ok)
    assert site_name(named) == "st-mary" and CHECK.problems(named, _global()) == []
    declined = site_identity_mod(request, context, declines)
    assert declined.error.code == DECLINED_ERROR_CODE and site_name(declined) == "st-mary"
    crashed = site_identity_mod(request, context, raises)
    assert str(crashed.error.reason) == "[site st-mary] ValueError: disk full"

    def worker_raises(msg: Message, ctx: Context) -> Message:  # the site worker's error, as is
        raise WorkerFailed("DataError", "m.csv line 5: image file not found (field 'image')")

    crashed = site_identity_mod(request, context, worker_raises)
    assert str(crashed.error.reason) == (
        "[site st-mary] DataError: m.csv line 5: image file not found (field 'image')"
    )


@pytest.mark.usefixtures("serverapp_process")
def test_fedavgm_carries_server_momentum_across_rounds() -> None:
    strategy, _ = _strategy(RunSettings(strategy="fedavgm", server_momentum=0.5, min_sites=2))
    grid = _Nodes({1: 100.0, 2: 100.0})
    merged = _global()
    for server_round, site_value in ((1, 1.0), (2, 2.0)):
        list(
            strategy.configure_train(server_round, record_from_arrays(merged), ConfigRecord(), grid)
        )
        strategy._sent = [_incoming(1), _incoming(2)]
        replies = [_named(n, f"s{n}", _filled(site_value)) for n in (1, 2)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None
        merged = arrays_from_record(arrays)
    # Round 1 step -1 -> 1.0; round 2: momentum 0.5 * -1 + -1 = -1.5 -> 2.5 (FedAvg would give 2.0).
    np.testing.assert_allclose(merged["head.w"], 2.5, rtol=1e-6)


def test_a_restarted_site_is_named_by_its_live_node() -> None:
    entry = Accounting().current(3)
    entry.names = {21: "site-2", 22: "site-2", 11: "site-1"}
    entry.sites = [22, 11]
    entry.skipped = {21: "missed the last deadline; no heartbeat since"}
    assert entry.outcomes() == {"site-2": "aggregated", "site-1": "aggregated"}
    assert entry.outcomes_by_node()[21].startswith("skipped: ")


# ---------------------------------------------------------------- rounds that aggregate nothing


def _failures(nodes: tuple[int, int, int]) -> list[Message]:
    """A declined, a crashed and a dead site (Flower's reply for it comes from node 1)."""
    declined, crashed, dead = nodes
    return [
        Message(
            Error(code=DECLINED_ERROR_CODE, reason="[site beta] site declined: privacy budget"),
            reply_to=_incoming(declined),
        ),
        Message(
            Error(code=2, reason="[site gamma] PrivacyError: sample-level DP is refused"),
            reply_to=_incoming(crashed),
        ),
        Message(Error(code=5, reason="Node Unavailable"), reply_to=_incoming(dead, dst=1)),
    ]


@pytest.mark.usefixtures("serverapp_process")
def test_a_round_that_aggregates_nothing_stops_the_run_naming_each_sites_reason() -> None:
    strategy, accounting = _strategy()
    grid = _Nodes({12: 100.0, 13: 100.0, 14: 100.0, 15: 100.0})
    _configure(strategy, 1, grid)
    with pytest.raises(EmptyRoundError) as stopped:
        strategy.aggregate_train(1, _failures((12, 13, 14)))
    assert isinstance(stopped.value, RunFailed) and stopped.value.server_round == 1
    assert str(stopped.value) == (
        "round 1: no site's update was aggregated, 1 round(s) in a row (max-empty-rounds = 0); "
        "the run stops: beta (node 12) declined: site declined: privacy budget; "
        "gamma (node 13) failed: PrivacyError: sample-level DP is refused; "
        "node 14 dropped: node unavailable: Node Unavailable; "
        "node 15 dropped: no reply within the round timeout"
    )
    entry = accounting.rounds[1]  # the round's record is complete for the history
    assert not entry.head_updated and entry.sites == []
    assert (len(entry.declined), len(entry.failed), len(entry.dropped)) == (1, 1, 2)


@pytest.mark.usefixtures("serverapp_process")
def test_max_empty_rounds_allows_that_many_empty_rounds_in_a_row() -> None:
    strategy, accounting = _strategy(RunSettings(min_sites=2, max_empty_rounds=1))
    grid = _Nodes({12: 100.0, 13: 100.0, 14: 100.0})
    _configure(strategy, 1, grid)
    assert strategy.aggregate_train(1, _failures((12, 13, 14))) == (None, None)
    accounting.quarantine.clear()
    _configure(strategy, 2, grid)
    arrays, _ = strategy.aggregate_train(2, [_named(12, "beta", _filled(1.0))])
    assert arrays is not None and accounting.rounds[2].head_updated  # the count starts again
    accounting.quarantine.clear()
    _configure(strategy, 3, grid)
    assert strategy.aggregate_train(3, _failures((12, 13, 14))) == (None, None)
    accounting.quarantine.clear()
    _configure(strategy, 4, grid)
    with pytest.raises(
        EmptyRoundError, match=r"^round 4: .* 2 round\(s\) in a row \(max-empty-rounds = 1\)"
    ):
        strategy.aggregate_train(4, _failures((12, 13, 14)))


def test_a_run_whose_rounds_were_all_empty_has_no_trained_head() -> None:
    empty = {"sites": [], "head_updated": False}
    with pytest.raises(RunFailed, match="none of the run's 2 round"):
        require_trained([empty, empty])
    require_trained([empty, {"sites": [3], "head_updated": True}])
    require_trained([{"sites": [3]}])  # a history written before head_updated existed
    with pytest.raises(RunFailed):
        require_trained([{"sites": [3], "head_updated": False}])  # client-dp released nothing


def test_the_round_line_counts_every_outcome() -> None:
    record = {
        "sites": [1],
        "rejected": {2: "x"},
        "declined": {},
        "failed": {3: "y", 4: "z"},
        "dropped": {5: "w"},
        "head_updated": True,
    }
    assert round_counts(record) == (
        "1 sites aggregated, 1 rejected, 0 declined, 2 failed, 1 dropped"
    )
    assert round_counts({"sites": [], "failed": {3: "y"}, "head_updated": False}) == (
        "0 sites aggregated (head unchanged), 0 rejected, 0 declined, 1 failed, 0 dropped"
    )


def test_every_registered_strategy_builds_its_flower_class() -> None:
    from common.config import CLIENT_DP_STRATEGIES
    from common.registries import STRATEGIES
    from server.strategy import BASES

    assert set(BASES) == set(STRATEGIES)
    for name in STRATEGIES:
        strategy, _ = _strategy(RunSettings(strategy=name, min_sites=3))
        assert type(strategy.inner) is BASES[name]
    assert set(CLIENT_DP_STRATEGIES) == {"fedavg", "fedprox"}
