"""Sample-level epsilon recomputed independently of the site's code, for tests.

Reads a site's privacy ledger file as raw JSON (never through ``client.privacy``) and composes each
recorded entry as ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` with Google's
dp-accounting library, whose RDP and PLD accountants share no code with Opacus (the site's RDP).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

# dp-accounting's default discretization (1e-4) is tighter but takes seconds per composition.
PLD_INTERVAL = 1e-3


@dataclass(frozen=True)
class ReferenceEpsilon:
    rdp: float
    pld: float


def ledger_entries(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The raw entries of a ledger file (oldest first)."""
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    entries = document["entries"]
    assert isinstance(entries, list)
    return entries


def composed_event(entries: list[dict[str, Any]]) -> dp_accounting.DpEvent:
    """One Poisson-subsampled Gaussian event per entry, self-composed ``steps`` times."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    float(entry["sample_rate"]),
                    dp_accounting.GaussianDpEvent(float(entry["noise_multiplier"])),
                ),
                int(entry["steps"]),
            )
            for entry in entries
        ]
    )


def reference_epsilon(
    entries: list[dict[str, Any]], delta: float, *, pld: bool = True
) -> ReferenceEpsilon:
    """Epsilon at ``delta`` of ``entries`` by dp-accounting's RDP and (``pld``) PLD accountants."""
    event = composed_event(entries)
    rdp_accountant = RdpAccountant()
    rdp_accountant.compose(event)
    pld_epsilon = float("nan")
    if pld:
        pld_accountant = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
        pld_accountant.compose(event)
        pld_epsilon = float(pld_accountant.get_epsilon(delta))
    return ReferenceEpsilon(rdp=float(rdp_accountant.get_epsilon(delta)), pld=pld_epsilon)


def ledger_reference_epsilon(
    path: str | os.PathLike[str], delta: float, *, run_id: int | None = None, pld: bool = True
) -> ReferenceEpsilon:
    """The reference epsilons of a ledger file's entries (only run ``run_id``'s when given)."""
    entries = [e for e in ledger_entries(path) if run_id is None or int(e["run_id"]) == run_id]
    return reference_epsilon(entries, delta, pld=pld)
