"""Server-side update validation and aggregation, called in-process with real Flower messages."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from common.config import RunSettings
from common.flower import arrays_from_record, metric_record, record_from_arrays
from server.strategy import Accounting, UpdateCheck, build_strategy, metrics_mean

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
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
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


def test_all_updates_rejected_leaves_the_global_head_unchanged() -> None:
    accounting = Accounting()
    accounting.global_arrays = _global()
    strategy = build_strategy(RunSettings(), check=CHECK, accounting=accounting)
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, {"bad": np.zeros(1, np.float32)})])
    assert arrays is None and metrics is None


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
