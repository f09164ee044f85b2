"""`fedembed audit`: summarise and verify a site's egress audit log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from simulations.cli.paths import user_path

HEAD_FILE = "head.safetensors"


def cmd_audit(args: argparse.Namespace) -> int:
    """Summarise a site's egress audit log; verify that only the head's arrays and allowed scalar
    metrics left (exit 1 naming each violation), and with ``--run`` that the coordinator received
    exactly what the site logged."""
    from client.audit import AUDIT_FILE, verify_audit_log
    from common.errors import FedEmbedError

    path = Path(args.site_dir)
    path = path / AUDIT_FILE if path.is_dir() else path
    if not path.exists():
        raise FedEmbedError(f"no audit log at {path} (a site's state-dir holds {AUDIT_FILE})")
    head: dict[str, tuple[int, ...]] | None = None
    run_ids: set[int] | None = None
    receipts: list[dict[str, Any]] | None = None
    source = "the head the coordinator sent, recorded in each line"
    if args.head is not None:
        head, source = head_shapes(args.head), str(args.head)
    if args.run is not None:
        run_head, run_source, run_ids, receipts = _run_files(Path(args.run))
        if head is None:
            head, source = run_head, run_source
    summary = verify_audit_log(path, allowed_arrays=head, run_ids=run_ids, receipts=receipts)
    if summary.unchecked and head is None:
        lines = ", ".join(str(n) for n in summary.unchecked[:5])
        raise FedEmbedError(
            f"{path}: line(s) {lines} carry arrays but record no head to check them against "
            "(written before the log recorded the head); pass --run <the coordinator's run dir> "
            "or --head <a head directory such as <run-dir>/final, or its head.safetensors>"
        )
    plain = summary.total_bytes - summary.secagg_bytes
    print(
        f"{path}: {summary.entries} replies left this site in {len(summary.runs)} run(s): "
        f"{plain:,} bytes of head weights and metrics"
        + (
            f", {summary.secagg_bytes:,} bytes in {summary.secagg_replies} SecAgg+ protocol replies"
            if summary.secagg_replies
            else ""
        )
    )
    spent = summary.epsilon_spent
    print(
        f"declined rounds: {summary.declined}; epsilon spent: "
        f"{spent if spent is not None else 'n/a (no sample-level DP)'}"
    )
    print(f"head checked against: {source}")
    if receipts is not None:
        print(
            f"coordinator receipts ({args.run}): {summary.confirmed} replies received with the "
            f"digest the site logged; {len(summary.unconfirmed)} with no receipt"
        )
        for note in summary.unconfirmed:
            print(f"  note: {note}")
    if summary.ok:
        print(
            "verified: every reply carried exactly the head's float32 arrays (names, shapes) and "
            "allowed finite scalar metrics"
            + (
                ", or SecAgg+ protocol payloads (masked head updates, public keys, key shares)"
                if summary.secagg_replies
                else ""
            )
            + (
                "; the coordinator received what the site logged"
                if receipts is not None and summary.confirmed
                else ""
            )
        )
        return 0
    print(f"{len(summary.violations)} violation(s):")
    for violation in summary.violations:
        print(f"  {violation}")
    return 1


def head_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The head's array names and shapes, in order, from a head file (a run's final/ head or a
    checkpoint): a directory holding head.safetensors, or the .safetensors file itself.

    Every array must be float32 (what sites send); one line of error otherwise.
    """
    from safetensors import SafetensorError, safe_open

    from common.errors import FedEmbedError

    file = Path(path)
    file = file / HEAD_FILE if file.is_dir() else file
    if not file.exists():
        raise FedEmbedError(f"no head at {file} (give a run's final/ directory or a .safetensors)")
    try:
        with safe_open(str(file), framework="numpy") as handle:
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise FedEmbedError(f"{file}: not a head file ({type(exc).__name__}: {exc})") from None
    if not arrays:
        raise FedEmbedError(f"{file}: holds no arrays")
    odd = [f"{k} ({a.dtype})" for k, a in arrays.items() if str(a.dtype) != "float32"]
    if odd:
        raise FedEmbedError(f"{file}: head arrays {', '.join(odd)} are not float32")
    return {name: tuple(int(d) for d in a.shape) for name, a in arrays.items()}


def _run_files(
    run_dir: Path,
) -> tuple[dict[str, tuple[int, ...]], str, set[int], list[dict[str, Any]] | None]:
    """A coordinator run directory's head (final/, else its newest checkpoint), Flower run ids
    (run.json and the receipts) and receipts (None when the run recorded none)."""
    from common.errors import FedEmbedError
    from server.receipts import read_receipts, receipts_path

    if not run_dir.is_dir():
        raise FedEmbedError(f"no run directory at {run_dir}")
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"), reverse=True)
    candidates = [run_dir / "final" / HEAD_FILE, *checkpoints]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise FedEmbedError(
            f"{run_dir}: no final/{HEAD_FILE} and no checkpoints/round-*.safetensors "
            "(is this a coordinator's run-dir?)"
        )
    receipts = read_receipts(run_dir)
    run_ids = {int(r["run_id"]) for r in receipts if "run_id" in r}
    info = run_dir / "run.json"
    if info.exists():
        try:
            run_ids.add(int(json.loads(info.read_text(encoding="utf-8"))["flower_run_id"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise FedEmbedError(f"{info}: no readable flower_run_id ({exc})") from None
    if not receipts_path(run_dir).exists():
        print(
            f"note: {run_dir} holds no coordinator receipts ({receipts_path(run_dir).name}; runs "
            "before receipts were recorded): the replies' digests are not cross-checked"
        )
        return head_shapes(found), str(found), run_ids, None
    return head_shapes(found), str(found), run_ids, receipts


def register_audit(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="summarise and verify a site's egress audit log",
        description=(
            "Check every reply in a site's audit log: a train reply carries exactly the head's "
            "float32 arrays (names, shapes), an evaluate reply none, metrics are allowed names "
            "with finite scalar values, SecAgg+ replies only their stage's payloads. The head is "
            "the one the coordinator sent (recorded in each line), or --head / --run's. Exit 1 "
            "naming each violation."
        ),
    )
    p.add_argument("site_dir", type=user_path, help="the site's state-dir (or its audit.jsonl)")
    p.add_argument(
        "--run",
        type=user_path,
        default=None,
        help="the coordinator's run-dir: check that run's replies against its head and its "
        "receipts (replies.jsonl: the digest of every reply the coordinator received)",
    )
    p.add_argument(
        "--head",
        type=user_path,
        default=None,
        help="a head directory (e.g. <run-dir>/final) or .safetensors: check every reply against it",
    )
    p.set_defaults(func=cmd_audit)
