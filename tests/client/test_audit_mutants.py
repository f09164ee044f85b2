"""The audit log's bookkeeping, pinned where mutation testing found it unchecked
(docs/results/mutation.md): what one line records, the summary's totals, and lines that are not
entries at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from client.audit import audit_path, record_egress, verify_audit_log

HEAD: dict[str, tuple[int, ...]] = {"w": (2, 3), "b": (2,)}
HEAD_RECORD = [{"name": k, "shape": list(v), "dtype": "float32"} for k, v in HEAD.items()]
METRICS = {"num-examples": 30, "train-loss": 0.5}


def _arrays() -> dict[str, np.ndarray]:
    return {k: np.ones(s, np.float32) for k, s in HEAD.items()}


def _record(root: Path, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "run_id": 3,
        "server_round": 2,
        "message_type": "train",
        "site": "site-a",
        "arrays": _arrays(),
        "metrics": METRICS,
        "node_id": 7,
        "head": HEAD_RECORD,
        **changes,
    }
    return record_egress(root, **values)


def test_a_line_records_each_array_its_bytes_and_the_reply_it_answered(tmp_path: Path) -> None:
    entry = _record(tmp_path, timing={"train": 1}, privacy={"dp-epsilon": 0.5})
    line = json.loads(audit_path(tmp_path).read_text().splitlines()[0])
    assert line == entry
    assert (entry["run_id"], entry["round"], entry["node_id"], entry["site"]) == (3, 2, 7, "site-a")
    assert entry["arrays"] == [
        {"name": "w", "shape": [2, 3], "dtype": "float32", "bytes": 24},
        {"name": "b", "shape": [2], "dtype": "float32", "bytes": 8},
    ]
    assert entry["total_bytes"] == 32 and entry["declined"] is False
    assert entry["metrics"] == {"num-examples": 30.0, "train-loss": 0.5}
    assert entry["timing"] == {"train": 1.0} and entry["privacy"] == {"dp-epsilon": 0.5}
    assert entry["head"] == HEAD_RECORD and len(entry["sha256"]) == 64
    assert "stage" not in entry and "secagg" not in entry


def test_metrics_are_logged_as_floats_lists_of_floats_or_short_text(tmp_path: Path) -> None:
    entry = _record(tmp_path, metrics={"a": 2, "b": [1, 2.5], "c": True, "d": "x" * 500})
    assert entry["metrics"]["a"] == 2.0 and isinstance(entry["metrics"]["a"], float)
    assert entry["metrics"]["b"] == [1.0, 2.5]
    assert entry["metrics"]["c"] == "True"
    assert entry["metrics"]["d"] == repr("x" * 500)[:200]


def test_the_summary_counts_lines_bytes_declines_and_the_largest_epsilon(tmp_path: Path) -> None:
    _record(tmp_path, privacy={"dp-epsilon": 0.5})
    _record(tmp_path, server_round=3, privacy={"dp-epsilon": 1.25})
    _record(tmp_path, server_round=4, arrays={}, metrics={}, declined=True, run_id=5)
    summary = verify_audit_log(audit_path(tmp_path))
    assert summary.entries == 3 and summary.runs == [3, 5]
    assert summary.total_bytes == 64 and summary.declined == 1
    assert summary.epsilon_spent == 1.25 and summary.secagg_replies == 0
    assert summary.ok, summary.violations


def test_lines_that_are_not_entries_are_named_and_blank_lines_skipped(tmp_path: Path) -> None:
    _record(tmp_path)
    with open(audit_path(tmp_path), "a") as handle:
        handle.write("\n[1, 2]\n{cut")
    summary = verify_audit_log(audit_path(tmp_path))
    assert summary.entries == 1
    assert summary.violations == [
        "line 3: not a JSON object",
        "line 4: not valid JSON (truncated write?)",
    ]


def test_an_unknown_message_type_is_named_where_it_is(tmp_path: Path) -> None:
    _record(tmp_path, message_type="system")
    assert verify_audit_log(audit_path(tmp_path)).violations == [
        "line 1 (run 3, round 2, system reply): unknown message type 'system'"
    ]


# --- what the verifier says, message by message (raw lines give exact control over each field) ---


def _write(root: Path, *entries: dict[str, Any]) -> Path:
    path = audit_path(root)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return path


def _line(**changes: Any) -> dict[str, Any]:
    """A raw train-reply line of run 3, round 2 carrying the head's arrays."""
    entry: dict[str, Any] = {
        "run_id": 3,
        "round": 2,
        "message_type": "train",
        "site": "site-a",
        "arrays": [
            {"name": k, "shape": list(v), "dtype": "float32", "bytes": 4} for k, v in HEAD.items()
        ],
        "metrics": {"num-examples": 30.0},
        "total_bytes": 32,
        "declined": False,
        "head": HEAD_RECORD,
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()
WHERE = "line 1 (run 3, round 2, train reply)"


def _secagg(stage: str, fields: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    record = {"protocol": "secagg+", "stage": stage, "fields": fields}
    return _line(**{"arrays": [], "metrics": {}, "secagg": record, **changes})


def test_a_line_without_a_run_id_counts_as_run_minus_one(tmp_path: Path) -> None:
    path = _write(tmp_path, _line(run_id=_DROP, head=_DROP, total_bytes=_DROP))
    summary = verify_audit_log(path, allowed_arrays=HEAD, run_ids=[-1])
    assert summary.runs == [-1] and summary.total_bytes == 0
    assert summary.ok, summary.violations


def test_the_given_head_applies_only_to_the_given_runs(tmp_path: Path) -> None:
    path = _write(tmp_path, _line(head=_DROP))
    assert verify_audit_log(path, allowed_arrays=HEAD, run_ids=[3]).ok
    summary = verify_audit_log(path, allowed_arrays=HEAD, run_ids=[4])
    assert summary.unchecked == [1]
    assert summary.violations == [
        f"{WHERE}: carries arrays, but no head to check them against (the line records none): "
        "give the run's head"
    ]


def test_declines_secagg_replies_and_epsilon_are_summed_over_lines(tmp_path: Path) -> None:
    setup = [{"name": "pk1", "kind": "bytes", "count": 1, "bytes": 3}]
    path = _write(
        tmp_path,
        _line(arrays=[], metrics={}, declined=True, total_bytes=0),
        _secagg("setup", setup, total_bytes=5, privacy={"dp-epsilon": 0.25}),
        _secagg("setup", setup, total_bytes=7),
        _line(),
    )
    summary = verify_audit_log(path)
    assert summary.declined == 1 and summary.secagg_replies == 2 and summary.secagg_bytes == 12
    assert summary.total_bytes == 44 and summary.epsilon_spent == 0.25
    assert summary.ok, summary.violations


def test_a_bad_line_in_the_middle_does_not_stop_the_check(tmp_path: Path) -> None:
    path = audit_path(tmp_path)
    path.write_text('{cut\n"text"\n' + json.dumps(_line(round=9, message_type="system")) + "\n")
    summary = verify_audit_log(path)
    assert summary.entries == 1
    assert summary.violations == [
        "line 1: not valid JSON (truncated write?)",
        "line 2: not a JSON object",
        "line 3 (run 3, round 9, system reply): unknown message type 'system'",
    ]


def test_a_recorded_head_not_float32_or_not_the_given_head_is_named(tmp_path: Path) -> None:
    head = [
        {"name": "w", "shape": [2, 3], "dtype": "float64"},
        {"name": "b", "shape": [3], "dtype": "float32"},
    ]
    path = _write(tmp_path, _line(head=head))
    assert verify_audit_log(path, allowed_arrays=HEAD).violations == [
        f"{WHERE}: the coordinator sent head array w as float64, not float32",
        f"{WHERE}: the head the coordinator sent (w [2, 3], b [3]) is not the given head "
        "(w [2, 3], b [2])",
    ]


def test_a_declined_line_needs_no_head_but_must_carry_nothing(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _line(head=_DROP, arrays=[], metrics={}, declined=True),
        _line(head=_DROP, metrics={}, declined=True),
        _line(head=_DROP, arrays=[], declined=True),
    )
    summary = verify_audit_log(path)
    assert summary.unchecked == []
    assert summary.violations == [
        f"line {n} (run 3, round 2, train reply): a declined round's line records a payload"
        for n in (2, 3)
    ]


def test_an_evaluate_reply_with_arrays_names_each(tmp_path: Path) -> None:
    arrays = [{"name": "w", "shape": [2, 3], "dtype": "float32"}, {"name": "s", "dtype": "int8"}]
    path = _write(tmp_path, _line(message_type="evaluate", arrays=arrays))
    assert verify_audit_log(path).violations == [
        "line 1 (run 3, round 2, evaluate reply): an evaluate reply carried arrays "
        "(w 2x3 float32, s scalar int8); it may carry none"
    ]


def test_metric_violations_name_the_allowed_metrics_and_the_value(tmp_path: Path) -> None:
    from common.wire import allowed_metrics

    allowed = ", ".join(sorted(allowed_metrics("train")))
    long_text = "y" * 200
    metrics = {"num-examples": "ten", "train-loss": [1.0, 2.0], "bogus": 1.0, "eval": long_text}
    path = _write(tmp_path, _line(metrics=metrics))
    assert verify_audit_log(path, allowed_arrays=HEAD).violations == [
        f"{WHERE}: metric 'num-examples' is not a scalar ('ten')",
        f"{WHERE}: metric 'train-loss' is not a scalar (a list of 2 values)",
        f"{WHERE}: metric 'bogus' is not an allowed train-reply metric (allowed: {allowed})",
        f"{WHERE}: metric 'eval' is not an allowed train-reply metric (allowed: {allowed})",
        f"{WHERE}: metric 'eval' is not a scalar ({repr(long_text)[:80]})",
    ]


def test_array_violations_name_every_stray_wrong_and_missing_array(tmp_path: Path) -> None:
    arrays = [
        {"name": "x", "shape": [1], "dtype": "float32"},
        {"name": "y", "shape": [], "dtype": "float32"},
        {"name": "w", "dtype": "float32"},
    ]
    path = _write(tmp_path, _line(arrays=arrays))
    assert verify_audit_log(path).violations == [
        f"{WHERE}: array x 1 float32 is not a head parameter (the head has w, b)",
        f"{WHERE}: array y scalar float32 is not a head parameter (the head has w, b)",
        f"{WHERE}: array w has shape None, the head has [2, 3]",
        f"{WHERE}: head array(s) b missing from the reply",
    ]
    path = _write(tmp_path, _line(arrays=[]))
    assert verify_audit_log(path).violations == [
        f"{WHERE}: head array(s) w, b missing from the reply"
    ]


def test_a_secagg_line_without_masked_arrays_or_fields_needs_no_head(tmp_path: Path) -> None:
    bare = _secagg("setup", [], head=_DROP)
    del bare["secagg"]["fields"]
    path = _write(
        tmp_path,
        _secagg("setup", [{"name": "pk1", "kind": "bytes", "count": 1}], head=_DROP),
        bare,
    )
    summary = verify_audit_log(path)
    assert summary.unchecked == [] and summary.ok, summary.violations


def test_secagg_violations_name_the_stage_status_and_unmasked_arrays(tmp_path: Path) -> None:
    stage_where = "line {} (run 3, round 2, train reply, SecAgg+ {})"
    arrays = [{"name": "w", "shape": [2, 3], "dtype": "float32"}, {"name": "b", "dtype": "int8"}]
    status: list[dict[str, Any]] = [
        {"name": "status.code", "kind": "int", "value": 3},
        {"name": "status.message", "kind": "str", "value": "Failed"},
    ]
    wrong_protocol = _secagg("setup", [])
    wrong_protocol["secagg"]["protocol"] = "other"
    path = _write(
        tmp_path,
        wrong_protocol,
        _secagg("setup", [], arrays=arrays),
        _secagg("collect_masked_vectors", status),
    )
    where3 = stage_where.format(3, "collect_masked_vectors")
    assert verify_audit_log(path).violations == [
        f"{stage_where.format(1, 'setup')}: unknown secure-aggregation stage 'setup'",
        f"{stage_where.format(2, 'setup')}: a SecAgg+ setup reply carried unmasked arrays "
        "(w 2x3 float32, b scalar int8)",
        f"{where3}: SecAgg+ reply status code 3",
        f"{where3}: SecAgg+ reply status message is not 'Success'",
    ]


def test_masked_arrays_may_be_unsigned_and_their_shapes_are_checked(tmp_path: Path) -> None:
    where = "line 1 (run 3, round 2, train reply, SecAgg+ collect_masked_vectors)"
    arrays = [{"shape": [1], "dtype": "uint64"}, {"shape": [2], "dtype": "int64"}, {}]
    masked = [{"name": "masked_params", "kind": "masked-arrays", "count": 3, "arrays": arrays}]
    path = _write(tmp_path, _secagg("collect_masked_vectors", masked))
    assert verify_audit_log(path).violations == [
        f"{where}: masked array 2 has dtype None, want an integer dtype",
        f"{where}: masked arrays have shapes [[1], [2], []], the head gives [[1], [2, 3], [2]]",
    ]


# --- what record_egress logs for protocol replies ---


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_protocol_fields_are_described_kind_count_and_bytes(tmp_path: Path) -> None:
    from common.digest import payload_digest

    masked = [_npy(np.zeros(1, np.int64)), _npy(np.zeros((2, 3), np.uint32))]
    fields: dict[str, Any] = {
        "pk1": b"abc",
        "ctxts": [b"ab", b"cde"],
        "dsts": [4, 5],
        "status.code": 0,
        "status.message": "Success",
        "masked_params": masked,
        "odd": [1.5],
    }
    entry = _record(tmp_path, arrays={}, protocol=("share_keys", fields))
    described = entry["secagg"]["fields"]
    assert described == [
        {"name": "pk1", "count": 1, "kind": "bytes", "bytes": 3},
        {"name": "ctxts", "count": 2, "kind": "bytes-list", "bytes": 5},
        {"name": "dsts", "count": 2, "kind": "int-list", "bytes": 16},
        {"name": "status.code", "count": 1, "kind": "int", "value": 0, "bytes": 8},
        {"name": "status.message", "count": 1, "kind": "str", "value": "Success", "bytes": 7},
        {
            "name": "masked_params",
            "count": 2,
            "kind": "masked-arrays",
            "arrays": [{"shape": [1], "dtype": "int64"}, {"shape": [2, 3], "dtype": "uint32"}],
            "bytes": sum(len(v) for v in masked),
        },
        {"name": "odd", "count": 1, "kind": "other:list", "bytes": 8},
    ]
    assert entry["stage"] == "share_keys" and entry["secagg"]["stage"] == "share_keys"
    assert entry["total_bytes"] == sum(f["bytes"] for f in described)
    assert entry["sha256"] == payload_digest({}, fields)
    assert entry["sha256"] != payload_digest({}, None)


def test_the_total_counts_arrays_and_protocol_bytes(tmp_path: Path) -> None:
    entry = _record(tmp_path, protocol=("setup", {"pk1": b"abcd", "pk2": b"ef"}))
    assert entry["total_bytes"] == 32 + 6


def test_masked_params_that_are_pickles_are_refused(tmp_path: Path) -> None:
    import pytest

    pickled = _npy(np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        _record(
            tmp_path, arrays={}, protocol=("collect_masked_vectors", {"masked_params": pickled})
        )


def test_extra_records_are_digested_and_a_declined_stage_is_recorded(tmp_path: Path) -> None:
    from common.digest import payload_digest

    extra = {"note": "free text"}
    entry = _record(tmp_path, extra=extra, stage="share_keys")
    assert entry["sha256"] == payload_digest(_arrays(), extra)
    assert entry["sha256"] != payload_digest(_arrays(), None)
    assert entry["stage"] == "share_keys" and "secagg" not in entry
    assert entry["extra_records"] == extra and isinstance(entry["time"], float)
    line = audit_path(tmp_path).read_text(encoding="utf-8").splitlines()[0]
    assert line == json.dumps(entry, sort_keys=True)


# --- the cross-check against the coordinator's receipts ---


def _receipt(entry: dict[str, Any], **changes: Any) -> dict[str, Any]:
    receipt: dict[str, Any] = {
        "run_id": entry["run_id"],
        "node_id": entry["node_id"],
        "round": entry["round"],
        "message_type": entry["message_type"],
        "site": entry["site"],
        "sha256": entry["sha256"],
    }
    if "stage" in entry:
        receipt["stage"] = entry["stage"]
    receipt.update(changes)
    return {k: v for k, v in receipt.items() if v is not _DROP}


def test_replies_the_coordinator_received_as_logged_are_confirmed(tmp_path: Path) -> None:
    first = _record(tmp_path)
    second = _record(tmp_path, server_round=3)
    other_run = _record(tmp_path, run_id=9, node_id=None)
    summary = verify_audit_log(audit_path(tmp_path), receipts=[_receipt(first), _receipt(second)])
    assert summary.confirmed == 2 and summary.unconfirmed == [] and summary.runs == [3, 9]
    assert summary.ok, summary.violations
    assert "node_id" not in other_run


def test_a_reply_that_arrived_different_from_the_log_is_named(tmp_path: Path) -> None:
    first = _record(tmp_path)
    second = _record(tmp_path, server_round=3)
    receipts = [
        _receipt(first, sha256="f" * 64),
        _receipt(second, sha256=_DROP, undecodable="bad npy"),
    ]
    summary = verify_audit_log(audit_path(tmp_path), receipts=receipts)
    assert summary.confirmed == 0
    assert summary.violations == [
        f"{WHERE}: the site logged sha256 {first['sha256'][:16]}..., the coordinator received "
        f"{'f' * 16}...: the reply that arrived is not the one logged",
        f"line 2 (run 3, round 3, train reply): the site logged sha256 {second['sha256'][:16]}..., "
        "the coordinator received undecodable: bad npy...: the reply that arrived is not the one "
        "logged",
    ]


def test_a_reply_without_a_receipt_is_unconfirmed_not_a_violation(tmp_path: Path) -> None:
    first = _record(tmp_path)
    _record(tmp_path, server_round=3)
    _record(tmp_path, server_round=4, stage="setup")
    summary = verify_audit_log(audit_path(tmp_path), receipts=[_receipt(first)])
    assert summary.confirmed == 1 and summary.ok, summary.violations
    assert summary.unconfirmed == [
        f"line {n} (run 3, round {n + 1}, train reply): no coordinator receipt (the reply was "
        "not pulled before the round's deadline)"
        for n in (2, 3)
    ]


def test_a_line_of_a_covered_run_without_a_node_id_is_named(tmp_path: Path) -> None:
    first = _record(tmp_path)
    _record(tmp_path, server_round=3, node_id=None)
    summary = verify_audit_log(audit_path(tmp_path), receipts=[_receipt(first)])
    assert summary.confirmed == 1
    assert summary.violations == [
        "line 2 (run 3, round 3, train reply): the line records no node id, so it cannot be "
        "matched to the coordinator's receipts"
    ]


def test_a_declined_line_matches_its_receipt_without_a_digest(tmp_path: Path) -> None:
    declined = _record(tmp_path, arrays={}, metrics={}, declined=True)
    receipt = _receipt(declined, sha256=_DROP, error=4001)
    summary = verify_audit_log(audit_path(tmp_path), receipts=[receipt])
    assert summary.confirmed == 0 and summary.unconfirmed == []
    assert summary.ok, summary.violations


def test_receipts_of_this_site_the_log_lacks_are_named(tmp_path: Path) -> None:
    first = _record(tmp_path)
    receipts = [
        _receipt(first),
        _receipt(first, round=5),  # same node: ours
        _receipt(first, round=6, node_id=8, stage="setup"),  # another node, our site name
        _receipt(first, round=7, node_id=8, site="site-b"),  # neither: not ours
        _receipt(first, round=8, error=2),  # an error reply: the site logs none
        _receipt(first, round=9, error=4001, sha256=_DROP),  # a decline it did not log
        {"site": "site-a"},  # nothing but the site: every default
    ]
    summary = verify_audit_log(audit_path(tmp_path), receipts=receipts)
    assert summary.confirmed == 1
    tail = "from this site (node {}) that the audit log does not record"
    assert summary.violations == [
        "the coordinator received a train reply of run 3, round 5 " + tail.format(7),
        "the coordinator received a train reply (SecAgg+ setup) of run 3, round 6 "
        + tail.format(8),
        "the coordinator received a train reply of run 3, round 9 " + tail.format(7),
        "the coordinator received a None reply of run -1, round -1 " + tail.format(-1),
    ]


def test_a_stage_is_part_of_what_a_receipt_matches(tmp_path: Path) -> None:
    setup = _record(tmp_path, arrays={}, protocol=("setup", {"pk1": b"a", "pk2": b"b"}))
    summary = verify_audit_log(audit_path(tmp_path), receipts=[_receipt(setup, stage=_DROP)])
    assert summary.confirmed == 0
    assert summary.unconfirmed == [
        "line 1 (run 3, round 2, train reply, SecAgg+ setup): no coordinator receipt (the reply "
        "was not pulled before the round's deadline)"
    ]
    assert summary.violations == [
        "the coordinator received a train reply of run 3, round 2 "
        "from this site (node 7) that the audit log does not record"
    ]
    summary = verify_audit_log(audit_path(tmp_path), receipts=[_receipt(setup)])
    assert summary.confirmed == 1 and summary.ok, summary.violations


def test_receipt_keys_read_every_field_of_a_log_line_and_a_receipt(tmp_path: Path) -> None:
    entry = _record(
        tmp_path,
        run_id=4,
        node_id=11,
        server_round=6,
        message_type="evaluate",
        arrays={},
        metrics={"num-examples": 3},
    )
    for field_name, wrong in (
        ("run_id", 5),
        ("node_id", 12),
        ("round", 7),
        ("message_type", "train"),
        ("stage", "setup"),
    ):
        receipts = [_receipt(entry), _receipt(entry, **{field_name: wrong, "sha256": "0" * 64})]
        summary = verify_audit_log(audit_path(tmp_path), receipts=receipts)
        assert summary.confirmed == 1, field_name
        assert len(summary.violations) == 1, (field_name, summary.violations)


def test_receipts_and_lines_without_a_run_id_match_as_run_minus_one(tmp_path: Path) -> None:
    path = _write(tmp_path, _line(run_id=_DROP, node_id=7, sha256="a" * 64))
    receipt = {"node_id": 7, "round": 2, "message_type": "train", "sha256": "a" * 64}
    summary = verify_audit_log(path, receipts=[receipt])
    assert summary.confirmed == 1 and summary.runs == [-1]
    assert summary.ok, summary.violations


def test_lines_after_an_uncovered_unmatchable_or_declined_line_are_still_checked(
    tmp_path: Path,
) -> None:
    _record(tmp_path, run_id=9)  # a run the receipts do not cover
    _record(tmp_path, server_round=5, node_id=None)  # cannot be matched: named
    _record(tmp_path, server_round=6, arrays={}, metrics={}, declined=True)
    last = _record(tmp_path)
    receipts = [_receipt(last)]
    summary = verify_audit_log(audit_path(tmp_path), receipts=receipts)
    assert summary.confirmed == 1
    assert summary.violations == [
        "line 2 (run 3, round 5, train reply): the line records no node id, so it cannot be "
        "matched to the coordinator's receipts"
    ]


def test_a_line_whose_round_or_node_id_is_not_an_integer_is_malformed(tmp_path: Path) -> None:
    """Found by the mutation run: such a line passed unchecked, and crashed the receipt check."""
    path = audit_path(tmp_path)
    good = _record(tmp_path)
    bad = [{**good, "round": "two"}, {**good, "node_id": 7.5}, {**good, "run_id": True}]
    path.write_text("".join(json.dumps(line) + "\n" for line in bad))
    for receipts in (None, [_receipt(good), {**_receipt(good), "round": "two"}]):
        summary = verify_audit_log(path, receipts=receipts)
        assert summary.violations[:3] == [
            "line 1: malformed entry (ValueError: round 'two' is not an integer)",
            "line 2: malformed entry (ValueError: node_id 7.5 is not an integer)",
            "line 3: malformed entry (ValueError: run_id True is not an integer)",
        ]
        if receipts is not None:
            assert summary.violations[3] == (
                "coordinator receipt 2: malformed (invalid literal for int() with base 10: 'two')"
            )


def test_a_start_query_reply_is_held_to_the_head_and_the_start_metrics(tmp_path: Path) -> None:
    """The closed-form start's query replies (server/closed_form.py): exactly the head's arrays,
    float32, and only the start's scalars; anything else is named."""
    good = _line(message_type="query", metrics={"num-examples": 30, "image-sum-squares": 2.0})
    extra = {"name": "patient_embeddings", "shape": [500, 3], "dtype": "float32", "bytes": 6000}
    bad = _line(
        message_type="query",
        arrays=[*_line()["arrays"][:1], extra],
        metrics={"num-examples": 30, "train-loss": 0.5},
    )
    where = "line 2 (run 3, round 2, query reply)"
    summary = verify_audit_log(_write(tmp_path, good, bad), allowed_arrays=HEAD)
    assert summary.violations == [
        f"{where}: array patient_embeddings 500x3 float32 is not a head parameter (the head has w, b)",
        f"{where}: head array(s) b missing from the reply",
        f"{where}: metric 'train-loss' is not an allowed query-reply metric "
        "(allowed: image-sum-squares, num-examples)",
    ]


def test_a_malformed_receipt_is_named_and_the_receipts_after_it_are_still_read(
    tmp_path: Path,
) -> None:
    first = _record(tmp_path)
    receipts = [_receipt(first, node_id="seven"), _receipt(first)]
    summary = verify_audit_log(audit_path(tmp_path), receipts=receipts)
    assert summary.confirmed == 1, summary.violations
    assert len(summary.violations) == 1
    assert summary.violations[0].startswith("coordinator receipt 1: malformed")


def test_a_start_query_reply_without_a_recorded_head_cannot_pass_unchecked(
    tmp_path: Path,
) -> None:
    """A query reply carries arrays, so a line that records no head is unchecked, like a train
    reply's (with the run's head given, it is checked against it)."""
    path = _write(tmp_path, _line(message_type="query", head=_DROP, metrics={"num-examples": 3}))
    summary = verify_audit_log(path)
    assert summary.unchecked == [1]
    assert verify_audit_log(path, allowed_arrays=HEAD).ok
