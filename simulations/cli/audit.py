"""`fedembed audit`: summarise and verify a site's egress audit log."""

from __future__ import annotations

import argparse
from typing import Any

from simulations.cli.paths import user_path


def cmd_audit(args: argparse.Namespace) -> int:
    """Summarise a site's egress audit log and verify that only head arrays and scalars left."""
    from pathlib import Path

    from client.audit import AUDIT_FILE, verify_audit_log
    from common.errors import FedEmbedError

    path = Path(args.site_dir)
    path = path / AUDIT_FILE if path.is_dir() else path
    if not path.exists():
        raise FedEmbedError(f"no audit log at {path} (a site's state-dir holds {AUDIT_FILE})")
    summary = verify_audit_log(path)
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
    if summary.ok:
        print(
            "verified: every reply carried only float32 head arrays and scalar metrics"
            + (
                ", or SecAgg+ protocol payloads (masked head updates, public keys, key shares)"
                if summary.secagg_replies
                else ""
            )
        )
        return 0
    print(f"{len(summary.violations)} violation(s):")
    for violation in summary.violations:
        print(f"  {violation}")
    return 1


def register_audit(sub: Any) -> None:
    p = sub.add_parser("audit", help="summarise and verify a site's egress audit log")
    p.add_argument("site_dir", type=user_path, help="the site's state-dir (or its audit.jsonl)")
    p.set_defaults(func=cmd_audit)
