"""`fedembed audit` through the CLI: a reply carrying anything but the head fails with a line naming
it; the head comes from the log, --head or --run; --run cross-checks the coordinator's receipts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.audit import audit_path, record_egress
from common.tensorfile import write_tensorfile
from server.receipts import receipts_path
from simulations.cli.app import main

HEAD = {"proj.weight": np.zeros((4, 3), np.float32), "proj.bias": np.zeros(4, np.float32)}
HEAD_RECORD = [{"name": k, "shape": list(v.shape), "dtype": "float32"} for k, v in HEAD.items()]
PATIENTS = np.ones((500, 384), dtype=np.float32)
RUN_ID = 3


def _line(site: Path, arrays: dict[str, np.ndarray], *, head: Any = HEAD_RECORD, **kw: Any) -> str:
    entry = record_egress(
        site,
        run_id=RUN_ID,
        server_round=kw.pop("server_round", 1),
        message_type="train",
        site="hospital-a",
        arrays=arrays,
        metrics={"num-examples": 12, "train-loss": 0.4},
        node_id=8,
        head=head,
        **kw,
    )
    return str(entry["sha256"])


def _run_dir(root: Path, receipts: list[dict[str, Any]] | None) -> Path:
    run = root / "run"
    write_tensorfile(run / "final" / "head.safetensors", HEAD, key="fedembed", document={})
    (run / "run.json").write_text(json.dumps({"flower_run_id": RUN_ID}))
    if receipts is not None:
        receipts_path(run).write_text("".join(json.dumps(r) + "\n" for r in receipts))
    return run


def _receipt(sha256: str, server_round: int = 1) -> dict[str, Any]:
    return {
        "run_id": RUN_ID,
        "round": server_round,
        "node_id": 8,
        "site": "hospital-a",
        "message_type": "train",
        "stage": None,
        "sha256": sha256,
        "error": None,
    }


def _audit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_patient_embeddings_fail_the_audit_with_a_line_naming_the_array(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's log: an extra 500x384 float32 array named patient_embeddings left the site."""
    site = tmp_path / "state"
    _line(site, dict(HEAD))
    _line(site, {**HEAD, "patient_embeddings": PATIENTS}, server_round=2)
    named = "line 2 (run 3, round 2, train reply): array patient_embeddings 500x384 float32 is not a head parameter"
    run = _run_dir(tmp_path, receipts=None)
    for extra in ([], ["--head", str(run / "final")], ["--run", str(run)]):
        code, out, _ = _audit([str(site), *extra], capsys)
        assert code == 1, out
        assert named in out and "1 violation(s):" in out and "verified" not in out, out


def test_a_log_that_records_no_head_needs_one_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "state"
    _line(
        site, {**HEAD, "patient_embeddings": PATIENTS}, head=None
    )  # a log before heads were logged
    code, out, err = _audit([str(site)], capsys)
    assert code == 2 and out == ""
    assert err.startswith("fedembed: error:") and len(err.strip().splitlines()) == 1
    assert "line(s) 1 carry arrays but record no head" in err and "--run" in err and "--head" in err
    code, out, _ = _audit([str(site), "--head", str(_run_dir(tmp_path, None) / "final")], capsys)
    assert code == 1 and "array patient_embeddings 500x384 float32 is not a head parameter" in out


def test_the_cli_entry_point_exits_non_zero_naming_the_array(tmp_path: Path) -> None:
    """The same through a fresh interpreter, as an operator runs it."""
    site = tmp_path / "state"
    _line(site, {**HEAD, "patient_embeddings": PATIENTS})
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli.app", "audit", str(site)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "array patient_embeddings 500x384 float32 is not a head parameter" in result.stdout


def test_run_receipts_confirm_or_contradict_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "state"
    digests = [_line(site, dict(HEAD), server_round=r) for r in (1, 2)]
    run = _run_dir(tmp_path, [_receipt(d, r) for r, d in zip((1, 2), digests, strict=True)])
    code, out, _ = _audit([str(site), "--run", str(run)], capsys)
    assert code == 0, out
    assert "2 replies received with the digest the site logged; 0 with no receipt" in out
    assert "the coordinator received what the site logged" in out
    assert f"head checked against: {run / 'final' / 'head.safetensors'}" in out

    tampered = _run_dir(tmp_path, [_receipt(digests[0], 1), _receipt("f" * 64, 2)])
    code, out, _ = _audit([str(site), "--run", str(tampered)], capsys)
    assert code == 1, out
    assert "line 2 (run 3, round 2, train reply): the site logged sha256" in out
    assert "the reply that arrived is not the one logged" in out


@pytest.mark.parametrize(
    ("option", "expected"),
    [("--head", "no head at"), ("--run", "no run directory at")],
)
def test_a_missing_head_or_run_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, expected: str
) -> None:
    _line(tmp_path / "state", dict(HEAD))
    code, _, err = _audit([str(tmp_path / "state"), option, str(tmp_path / "nowhere")], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_a_clean_log_is_verified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _line(tmp_path / "state", dict(HEAD))
    code, out, _ = _audit([str(audit_path(tmp_path / "state"))], capsys)
    assert code == 0 and "verified: every reply carried exactly the head's float32 arrays" in out
    assert "head checked against: the head the coordinator sent" in out


def test_secagg_masked_arrays_match_a_head_file_whatever_its_name_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A head file lists its arrays sorted by name (safetensors), not in the head's order; the
    masked arrays (in the head's order) are checked against its shapes, not its order."""
    from flwr.common import ndarray_to_bytes

    site = tmp_path / "state"

    def collect(shapes: list[tuple[int, ...]]) -> None:
        masked = [ndarray_to_bytes(np.zeros(s, np.int64)) for s in shapes]
        fields = {"masked_params": masked, "status.code": 0, "status.message": "Success"}
        _line(site, {}, head=None, protocol=("collect_masked_vectors", fields))

    collect([(1,), (4, 3), (4,)])
    head = _run_dir(tmp_path, None) / "final"
    assert _audit([str(site), "--head", str(head)], capsys)[0] == 0
    collect([(1,), (4, 3), (4,), (500, 384)])
    code, out, _ = _audit([str(site), "--head", str(head)], capsys)
    assert (
        code == 1 and "line 2 (run 3, round 1, train reply, SecAgg+ collect_masked_vectors)" in out
    )
    assert "masked arrays have shapes [[1], [4, 3], [4], [500, 384]]" in out
