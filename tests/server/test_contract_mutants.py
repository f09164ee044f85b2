"""The server's update contract at its edges, each pinned by a mutant that survived the older tests
(docs/results/mutation.md): the update-norm bound measured from the global head, the size limit and
the metrics limits at their exact boundaries, a payload whose bytes contradict its description,
and the exact reason a site's reply is refused or classified with."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.flower import arrays_from_record, metric_record, record_from_arrays
from common.wire import NODE_UNAVAILABLE_CODE
from server.strategy.contract import (
    MAX_METRICS,
    MAX_REASON,
    NPY_HEADER_SLACK,
    UpdateCheck,
    classify_error,
    short_reason,
)
from tests.flower_messages import message_metadata

SHAPES = {"head.w": (4, 3), "head.b": (4,), "loss.logit_scale": ()}
BOUND = 50.0
CHECK = UpdateCheck(shapes=SHAPES, max_update_norm=BOUND)


def _filled(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def _incoming(node: int) -> Message:
    metadata = message_metadata(dst_node_id=node, src_node_id=0, message_id=f"m{node}")
    return Message(metadata=metadata, content=RecordDict())  # type: ignore[call-overload]


def _reply(content: RecordDict, node: int = 3) -> Message:
    return Message(content=content, reply_to=_incoming(node))


def _update(arrays: dict[str, np.ndarray], **metrics: Any) -> Message:
    values = {"num-examples": 10, **metrics}
    return _reply(
        RecordDict({"arrays": record_from_arrays(arrays), "metrics": metric_record(values)})
    )


def _error(code: int, reason: str, node: int = 3) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=_incoming(node))


# ---- the update-norm bound: the distance from the global head, in either direction, inclusive


def test_an_update_equal_to_a_large_global_head_is_within_the_bound() -> None:
    global_arrays = _filled(40.0)  # |global| = 40 * sqrt(17) > BOUND: only the difference counts
    assert CHECK.problems(_update(_filled(40.0)), global_arrays) == []


def test_an_update_far_below_the_global_head_is_rejected() -> None:
    problems = CHECK.problems(_update(_filled(-100.0)), _filled(0.0))
    assert problems == [f"update norm {100 * np.sqrt(17):.3g} exceeds the bound {BOUND:.3g}"]


def test_an_update_exactly_at_the_norm_bound_is_accepted() -> None:
    arrays = {**_filled(0.0), "loss.logit_scale": np.array(BOUND, np.float32)}
    assert CHECK.problems(_update(arrays), _filled(0.0)) == []


# ---- sizes and shapes declared, then decoded


def _padded(array: np.ndarray, size: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    return data + b"\0" * (size - len(data))


@pytest.mark.parametrize("extra", [0, 1])
def test_the_byte_limit_is_four_bytes_per_value_plus_the_header_slack(extra: int) -> None:
    reply = _update(_filled(0.5))
    limit = 4 * 12 + NPY_HEADER_SLACK  # head.w is (4, 3) float32
    array = reply.content.array_records["arrays"]["head.w"]
    array.data = _padded(np.full((4, 3), 0.5, np.float32), limit + extra)
    expected = [] if extra == 0 else [f"head.w: {limit + 1} bytes for a (4, 3) float32 array"]
    assert CHECK.problems(reply, _filled(0.0)) == expected


def test_a_payload_whose_bytes_contradict_its_declared_dtype_is_rejected() -> None:
    reply = _update(_filled(0.5))
    array = reply.content.array_records["arrays"]["head.w"]
    array.data = _padded(np.full((4, 3), 0.5, np.float64), 0)  # declared float32 (4, 3)
    assert CHECK.problems(reply, _filled(0.0)) == ["head.w: payload holds float64 (4, 3)"]


def test_an_undecodable_payload_is_named_by_its_error() -> None:
    reply = _update(_filled(0.5))
    reply.content.array_records["arrays"]["head.b"].data = b"not an npy file"
    try:
        arrays_from_record(reply.content.array_records["arrays"])
    except Exception as exc:
        expected = f"undecodable update: {type(exc).__name__}: {short_reason(str(exc))}"
    else:
        pytest.fail("garbage bytes decoded")
    assert CHECK.problems(reply, _filled(0.0)) == [expected]
    assert "NoneType" not in expected and not expected.endswith(": None")


# ---- which records a reply may carry, and how a refusal names them


def test_a_reply_without_metrics_is_refused_for_its_records() -> None:
    reply = _reply(RecordDict({"arrays": record_from_arrays(_filled(0.5))}))
    assert CHECK.problems(reply, None) == [
        "unexpected records ['arrays'] (want 'arrays' and 'metrics')"
    ]


def test_unexpected_records_are_listed_five_at_most() -> None:
    extra = {f"r{i}": ArrayRecord() for i in range(6)}
    content = RecordDict(
        {"arrays": record_from_arrays(_filled(0.5)), "metrics": metric_record({}), **extra}
    )
    names = sorted(["arrays", "metrics", *extra])[:5]
    assert CHECK.problems(_reply(content), None) == [
        f"unexpected records {names} (want 'arrays' and 'metrics')"
    ]


def test_unexpected_config_records_are_listed_five_at_most() -> None:
    extra = {f"c{i}": ConfigRecord({"x": 1}) for i in range(6)}
    content = RecordDict(
        {
            "arrays": record_from_arrays(_filled(0.5)),
            "metrics": metric_record({"num-examples": 1}),
            **extra,
        }
    )
    names = sorted(extra)[:5]
    assert CHECK.problems(_reply(content), None) == [f"unexpected config records {names}"]


def test_differing_head_keys_are_listed_three_at_most_each_way() -> None:
    check = UpdateCheck(shapes={f"k{i}": (1,) for i in range(4)}, max_update_norm=BOUND)
    arrays = {f"x{i}": np.zeros(1, np.float32) for i in range(4)}
    assert check.problems(_update(arrays), None) == [
        "head keys differ (missing ['k0', 'k1', 'k2'], unexpected ['x0', 'x1', 'x2'])"
    ]


def test_head_keys_in_another_order_are_refused_by_name() -> None:
    arrays = dict(reversed(list(_filled(0.5).items())))
    assert CHECK.problems(_update(arrays), None) == [
        "head keys are in another order than the global head's"
    ]


# ---- metrics at their limits


def test_exactly_max_metrics_are_accepted() -> None:
    metrics = {f"m{i}": 1.0 for i in range(MAX_METRICS - 1)}  # + num-examples = MAX_METRICS
    assert CHECK.problems(_update(_filled(0.5), **metrics), None) == []


def test_one_example_is_a_positive_count() -> None:
    reply = _reply(
        RecordDict(
            {
                "arrays": record_from_arrays(_filled(0.5)),
                "metrics": metric_record({"num-examples": 1}),
            }
        )
    )
    assert CHECK.problems(reply, None) == []


@pytest.mark.parametrize(
    ("value", "what"), [([1.0, 2.0], "is not a scalar"), (float("inf"), "is not finite")]
)
def test_a_bad_metric_is_named_by_its_first_40_characters(value: Any, what: str) -> None:
    key = "k" * 39 + "XYZ"
    content = RecordDict(
        {
            "arrays": record_from_arrays(_filled(0.5)),
            "metrics": MetricRecord({"num-examples": 5, key: value}),
        }
    )
    assert CHECK.problems(_reply(content), None) == [f"metric '{key[:40]}' {what}"]


# ---- error replies: their reason, shortened, and their outcome


def test_a_site_error_is_refused_with_its_reason_without_the_site_prefix() -> None:
    problems = CHECK.problems(_error(2, "[site beta] ValueError: boom"), None)
    assert problems == ["site error: ValueError: boom"]


def test_short_reason_drops_only_the_first_site_prefix_and_joins_lines() -> None:
    assert short_reason("[site a] relayed\nfrom [site b] boom") == "relayed from [site b] boom"


def test_short_reason_keeps_max_reason_characters_and_cuts_one_more() -> None:
    exact = "x" * MAX_REASON
    assert short_reason(exact) == exact
    longer = "y" * (MAX_REASON + 1)
    assert short_reason(longer) == "y" * (MAX_REASON - 3) + "..."


def test_node_unavailable_is_a_drop_from_any_node_and_the_superlink_only_drops() -> None:
    assert classify_error(_error(NODE_UNAVAILABLE_CODE, "gone", node=14)) == (
        "dropped",
        "node unavailable: gone",
    )
    assert classify_error(_error(2, "timeout", node=1)) == ("dropped", "node unavailable: timeout")
    assert classify_error(_error(2, "[site g] boom", node=14)) == ("failed", "boom")
