"""The egress audit verifier: every normal and SecAgg+ reply is checked against the head's exact
arrays and the wire contract's metric names, and each violation is named by line, round and reply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.audit import audit_path, record_egress, verify_audit_log
from client.egress import audit_reply
from client.privacy import PrivateRoundResult
from client.training import execute
from common.config import RunSettings, SiteSettings
from common.digest import reply_payload
from common.flower import metric_record, record_from_arrays
from common.wire import SAMPLE_DP_METRICS, allowed_metrics
from tests.client_site import in_process_node_config, load_client
from tests.flower_messages import message_metadata
from tests.tiny_config import tiny_run_config

HEAD: dict[str, tuple[int, ...]] = {"proj.weight": (4, 3), "proj.bias": (4,), "scale": ()}
HEAD_RECORD = [{"name": k, "shape": list(v), "dtype": "float32"} for k, v in HEAD.items()]
METRICS = {"num-examples": 30, "train-loss": 0.5, "train-seconds": 1.5, "eval-R@5": 0.25}


def _head(dtype: Any = np.float32) -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype=dtype) for k, s in HEAD.items()}


def _record(
    root: Path,
    *,
    arrays: dict[str, np.ndarray] | None = None,
    metrics: dict[str, Any] | None = None,
    message_type: str = "train",
    head: list[dict[str, Any]] | None = HEAD_RECORD,
    run_id: int = 1,
    server_round: int = 1,
    **extra: Any,
) -> None:
    record_egress(
        root,
        run_id=run_id,
        server_round=server_round,
        message_type=message_type,
        site="site-a",
        arrays=_head() if arrays is None else arrays,
        metrics=METRICS if metrics is None else metrics,
        node_id=7,
        head=head,
        **extra,
    )


def _violations(root: Path, **kwargs: Any) -> list[str]:
    return verify_audit_log(audit_path(root), **kwargs).violations


def test_a_clean_train_and_evaluate_reply_pass(tmp_path: Path) -> None:
    _record(tmp_path)
    _record(tmp_path, arrays={}, metrics={"num-examples": 9, "R@1": 0.1}, message_type="evaluate")
    _record(tmp_path, arrays={}, metrics={}, declined=True)
    summary = verify_audit_log(audit_path(tmp_path))
    assert summary.ok and summary.entries == 3 and summary.declined == 1, summary.violations
    assert verify_audit_log(audit_path(tmp_path), allowed_arrays=HEAD).ok


PATIENTS = np.ones((500, 384), dtype=np.float32)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"arrays": {**_head(), "patient_embeddings": PATIENTS}},
            "array patient_embeddings 500x384 float32 is not a head parameter",
        ),
        (
            {"arrays": {**_head(), "proj.weight": np.zeros((4, 3), np.float64)}},
            "array proj.weight has dtype float64, want float32",
        ),
        (
            {"arrays": {**_head(), "proj.weight": np.zeros((3, 4), np.float32)}},
            "array proj.weight has shape [3, 4], the head has [4, 3]",
        ),
        (
            {"arrays": {k: v for k, v in _head().items() if k != "proj.bias"}},
            "head array(s) proj.bias missing from the reply",
        ),
        (
            {"message_type": "evaluate", "metrics": {"num-examples": 9}},
            "an evaluate reply carried arrays (proj.weight 4x3 float32",
        ),
        (
            {"metrics": {**METRICS, "train-loss": [0.1] * 500}},
            "metric 'train-loss' is not a scalar (a list of 500 values)",
        ),
        (
            {"metrics": {**METRICS, "patient-count": 3}},
            "metric 'patient-count' is not an allowed train-reply metric",
        ),
        (
            {
                "arrays": {},
                "message_type": "evaluate",
                "metrics": {"num-examples": 9, "train-loss": 1},
            },
            "metric 'train-loss' is not an allowed evaluate-reply metric",
        ),
        ({"metrics": {**METRICS, "train-loss": float("nan")}}, "metric 'train-loss' is not finite"),
        ({"extra": {"record:notes": "{}"}}, "carried record:notes"),
    ],
    ids=[
        "extra-array",
        "float64",
        "wrong-shape",
        "missing-array",
        "arrays-in-evaluate",
        "non-scalar-metric",
        "unknown-metric",
        "train-metric-in-evaluate",
        "non-finite-metric",
        "extra-record",
    ],
)
@pytest.mark.parametrize("head_from", ["recorded", "given"])
def test_each_kind_of_normal_reply_violation_is_named(
    tmp_path: Path, change: dict[str, Any], problem: str, head_from: str
) -> None:
    _record(tmp_path)  # line 1: clean
    _record(tmp_path, server_round=2, **change)  # line 2: the violation
    given = {"allowed_arrays": HEAD} if head_from == "given" else {}
    violations = _violations(tmp_path, **given)
    message_type = change.get("message_type", "train")
    where = f"line 2 (run 1, round 2, {message_type} reply)"
    assert violations and all(v.startswith(where) for v in violations), violations
    assert any(problem in v for v in violations), violations


def test_the_given_head_applies_to_its_runs_and_the_recorded_head_to_the_others(
    tmp_path: Path,
) -> None:
    other = {"w": (2, 2)}
    other_record = [{"name": "w", "shape": [2, 2], "dtype": "float32"}]
    _record(tmp_path, run_id=1)
    _record(tmp_path, run_id=2, arrays={"w": np.zeros((2, 2), np.float32)}, head=other_record)
    assert _violations(tmp_path, allowed_arrays=HEAD, run_ids={1}) == []
    # the same head for every line: run 2's reply is not the given head's
    violations = _violations(tmp_path, allowed_arrays=HEAD)
    assert any(
        "line 2" in v and "array w 2x2 float32 is not a head parameter" in v for v in violations
    )
    # a given head unlike the one the coordinator sent is named too
    assert any(
        "line 1" in v and "is not the given head" in v
        for v in _violations(tmp_path, allowed_arrays=other)
    )


def test_a_line_without_a_head_to_check_against_is_unchecked(tmp_path: Path) -> None:
    _record(tmp_path, head=None)  # a log written before lines recorded the head
    _record(tmp_path, head=None, arrays={}, message_type="evaluate", metrics={"num-examples": 3})
    summary = verify_audit_log(audit_path(tmp_path))
    assert summary.unchecked == [1] and not summary.ok
    assert "no head to check them against" in summary.violations[0]
    assert verify_audit_log(audit_path(tmp_path), allowed_arrays=HEAD).ok


# ---------------------------------------------------------------- SecAgg+ replies

MASKED_SHAPES = [(1,), (4, 3), (4,), (1,)]  # the weight factor, then the head (0-d as (1,))


def _masked(shapes: list[tuple[int, ...]], dtype: Any = np.int64) -> list[bytes]:
    return [ndarray_to_bytes(np.zeros(s, dtype=dtype)) for s in shapes]


def _collect_reply(
    masked: list[bytes], *, metrics: dict[str, Any] | None = None, unmasked: bool = False
) -> RecordDict:
    """A collect-masked-vectors reply as Flower's secaggplus_mod builds it."""
    content = RecordDict(
        {
            RECORD_KEY_CONFIGS: ConfigRecord({"masked_params": masked}),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
            "fitres.metrics": ConfigRecord(
                {"num-examples": 30, "train-seconds": 1.0} if metrics is None else metrics
            ),
            "fitres.num_examples": MetricRecord({"num_examples": 30}),
            "fitres.parameters": ArrayRecord(),
        }
    )
    if unmasked:
        content["fitres.parameters"] = record_from_arrays({"0": np.ones((4, 3), np.float32)})
    return content


def _record_secagg(root: Path, content: RecordDict, *, head: Any = HEAD_RECORD) -> None:
    payload = reply_payload(content, secagg=True)
    assert payload.fields is not None
    _record(
        root,
        arrays=payload.arrays,
        metrics=payload.metrics,
        protocol=("collect_masked_vectors", payload.fields),
        head=head,
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            _collect_reply(_masked(MASKED_SHAPES), unmasked=True),
            "carried unmasked arrays (fitres.parameters/0 4x3 float32)",
        ),
        (_collect_reply(_masked(MASKED_SHAPES, np.float64)), "masked array 0 has dtype float64"),
        (
            _collect_reply(_masked([(1,), (3, 4), (4,), (1,)])),
            "masked arrays have shapes [[1], [3, 4], [4], [1]], the head gives",
        ),
        (
            _collect_reply(_masked([*MASKED_SHAPES, (500, 384)])),
            "masked arrays have shapes",
        ),
        (
            _collect_reply(_masked(MASKED_SHAPES), metrics={"num-examples": 30, "patients": 4}),
            "metric 'patients' is not an allowed train-reply metric",
        ),
        (
            _collect_reply(_masked(MASKED_SHAPES), metrics={"train-loss": [0.1, 0.2]}),
            "field metric:train-loss (other:list), which is not a payload",
        ),
    ],
    ids=[
        "unmasked-array",
        "float-masked",
        "wrong-shape",
        "extra-masked-array",
        "unknown-metric",
        "non-scalar-metric",
    ],
)
def test_each_kind_of_secagg_reply_violation_is_named(
    tmp_path: Path, content: RecordDict, problem: str
) -> None:
    _record_secagg(tmp_path, _collect_reply(_masked(MASKED_SHAPES)))
    assert verify_audit_log(audit_path(tmp_path)).ok  # the head recorded in the line
    _record_secagg(tmp_path, content)
    violations = _violations(tmp_path)
    where = "line 2 (run 1, round 1, train reply, SecAgg+ collect_masked_vectors)"
    assert violations and all(v.startswith(where) for v in violations), violations
    assert any(problem in v for v in violations), violations


def test_masked_arrays_without_a_head_are_unchecked(tmp_path: Path) -> None:
    _record_secagg(tmp_path, _collect_reply(_masked([*MASKED_SHAPES, (500, 384)])), head=None)
    summary = verify_audit_log(audit_path(tmp_path))
    assert summary.unchecked == [1]
    assert not verify_audit_log(audit_path(tmp_path), allowed_arrays=HEAD).ok


# ---------------------------------------------------------------- what the site logs


def test_the_site_logs_every_record_of_a_reply_and_the_head_it_answered(tmp_path: Path) -> None:
    """``audit_reply`` (the one call site) logs arrays of any record and non-scalar metrics, so a
    reply that would smuggle data out in another record is in the log, and flagged."""
    site = SiteSettings.from_node_config({"site-name": "site-a", "state-dir": str(tmp_path)})
    context = Context(run_id=4, node_id=9, node_config={}, state=RecordDict(), run_config={})
    sent = {k: np.ones(s, np.float32) for k, s in HEAD.items()}
    msg = Message(  # type: ignore[call-overload]
        metadata=message_metadata(dst_node_id=9),
        content=RecordDict(
            {
                "arrays": record_from_arrays(sent),
                "config": ConfigRecord({"server-round": 2, "round-offset": 3}),
            }
        ),
    )
    reply = Message(
        RecordDict(
            {
                "arrays": record_from_arrays(sent),
                "metrics": metric_record({"num-examples": 5, "train-seconds": 1.0}),
                "leak": record_from_arrays({"patient_embeddings": PATIENTS}),
                "more": MetricRecord({"ids": [1.0, 2.0, 3.0]}),
            }
        ),
        reply_to=msg,
    )
    audit_reply(context, site, msg, reply)
    (entry,) = [json.loads(line) for line in audit_path(tmp_path).read_text().splitlines()]
    assert entry["round"] == 5 and entry["node_id"] == 9 and entry["run_id"] == 4
    assert entry["head"] == [
        {"name": k, "shape": list(s), "dtype": "float32"} for k, s in HEAD.items()
    ]
    assert [a["name"] for a in entry["arrays"]] == [*HEAD, "leak/patient_embeddings"]
    assert entry["metrics"]["more/ids"] == [1.0, 2.0, 3.0]
    violations = verify_audit_log(audit_path(tmp_path)).violations
    assert any(
        "array leak/patient_embeddings 500x384 float32 is not a head" in v for v in violations
    )
    assert any("metric 'more/ids' is not a scalar (a list of 3 values)" in v for v in violations)


def test_every_metric_a_site_sends_is_in_the_wire_contract(
    tmp_path: Path, tiny_model_dirs: dict[str, Path]
) -> None:
    """The producers (client/training.py, common/evaluation.py, client/privacy) against
    common/wire.py ``allowed_metrics``: a new metric must be added to the contract, or the audit
    of every site would flag it."""
    run_config = {k.replace("_", "-"): v for k, v in RunSettings().to_dict().items()}
    run_config.update(tiny_run_config(tiny_model_dirs, **{"dataset-n": 80, "report-eval": True}))
    node_config = in_process_node_config(tmp_path)
    _, _, initial = load_client(run_config, node_config)
    request = {"incoming": initial, "run": run_config, "site": node_config, "run_id": 1}
    trained = execute({**request, "op": "train", "config": {"server-round": 1}})
    evaluated = execute({**request, "op": "evaluate", "config": {}})
    assert {"num-examples", "train-loss", "eval-R@5"} <= set(trained["metrics"])
    assert set(trained["metrics"]) <= allowed_metrics("train")
    assert {"num-examples", "R@5"} <= set(evaluated["metrics"]) <= allowed_metrics("evaluate")
    private = PrivateRoundResult(
        loss=0.1,
        num_examples=8,
        steps=2,
        samples_seen=16,
        seconds=0.1,
        epsilon_round=0.5,
        epsilon_total=1.0,
        delta=1e-5,
        noise_multiplier=1.0,
        sample_rate=0.1,
        epsilon_total_rdp=1.0,
        epsilon_total_pld=0.9,
    )
    assert set(private.metrics()) == SAMPLE_DP_METRICS
    assert allowed_metrics("train", secagg=True) >= SAMPLE_DP_METRICS


def test_a_malformed_line_is_named_not_a_crash(tmp_path: Path) -> None:
    _record(tmp_path)
    with audit_path(tmp_path).open("a") as log:
        log.write('{"run_id": 1, "message_type": "train", "head": [{"name": "w"}]}\n')
        log.write("[1, 2]\n")
        log.write('{"run_id": 1, "message_ty\n')  # a write cut by a crash
    summary = verify_audit_log(audit_path(tmp_path))
    assert summary.entries == 2 and summary.runs == [1]
    assert summary.violations == [
        "line 2: malformed entry (KeyError: 'shape')",
        "line 3: not a JSON object",
        "line 4: not valid JSON (truncated write?)",
    ]
