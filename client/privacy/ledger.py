"""A site's persistent privacy ledger: every round's DP-SGD spend, and its epsilon.

Two accountants read the same (noise multiplier, sample rate, steps) history, both valid upper
bounds on epsilon at delta: RDP (Opacus) and PLD (dp-accounting's privacy loss distributions,
pessimistic estimate), which is tighter. The site's ``dp-accountant`` names the one that governs
(calibrates sigma, decides the budget, gives ``dp-epsilon``); both totals are always reported.
Where PLD is not computed (``PLD_MAX_*``) or not below RDP, RDP's governs, and ``account`` says so.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from common.atomic import atomic_write_json
from common.errors import PrivacyError
from common.privacy import ACCOUNTANTS

LEDGER_FILE = "privacy-ledger.json"
LEDGER_VERSION = 1
# PLD is computed only where it is meaningful and cheap: a history of at most this many distinct
# (sigma, q) mechanisms whose RDP epsilon is at most PLD_MAX_RDP_EPSILON (beyond that the guarantee
# is void anyway, and the loss distribution's support, i.e. memory and time, grows without bound).
PLD_MAX_RDP_EPSILON = 64.0
PLD_MAX_MECHANISMS = 32
# dp-accounting's value_discretization_interval: the coarse one first (fast); its pessimistic
# rounding adds up over very many small steps (e.g. q = 0.001, 1e5 steps), so when it does not
# come out below RDP the fine one is tried too. Every pass is an upper bound: the smallest is kept.
PLD_DISCRETIZATIONS = (1e-3, 1e-4)


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of a composition of (noise multiplier, sample rate, steps) entries."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [entry for entry in history if entry[2] > 0]
    return float(accountant.get_epsilon(delta=delta))


def pld_epsilon(
    history: list[tuple[float, float, int]], delta: float, *, rdp: float | None = None
) -> float | None:
    """Epsilon at ``delta`` of the same composition by privacy loss distributions (dp-accounting).

    Each (sigma, q, steps) entry is ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)``;
    entries with the same (sigma, q) are merged first (composition commutes). The pessimistic
    estimate is an upper bound on epsilon like RDP's, and usually tighter (``PLD_DISCRETIZATIONS``).
    None when not computed: more than ``PLD_MAX_MECHANISMS`` distinct mechanisms, or an RDP epsilon
    (``rdp``, computed when not given) above ``PLD_MAX_RDP_EPSILON``.
    """
    return _pld(history, delta, rdp)[0]


def _pld(
    history: list[tuple[float, float, int]], delta: float, rdp: float | None
) -> tuple[float | None, str]:
    """``pld_epsilon`` and, when it is None, why it was not computed."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    if not merged:
        return 0.0, ""
    if len(merged) > PLD_MAX_MECHANISMS:
        return None, (
            f"{len(merged)} distinct (sigma, q) mechanisms > PLD_MAX_MECHANISMS "
            f"{PLD_MAX_MECHANISMS}"
        )
    if rdp is None:
        rdp = rdp_epsilon(history, delta)
    if not rdp <= PLD_MAX_RDP_EPSILON:
        return None, f"RDP epsilon {rdp:.4g} > PLD_MAX_RDP_EPSILON {PLD_MAX_RDP_EPSILON:g}"
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for (sigma, q), steps in merged.items()
        ]
    )
    best = float("inf")
    for interval in PLD_DISCRETIZATIONS:
        accountant = PLDAccountant(value_discretization_interval=interval)
        accountant.compose(event)
        best = min(best, float(accountant.get_epsilon(delta)))
        if best < rdp:
            break
    return best, ""


@dataclass(frozen=True)
class Spend:
    """A composition's epsilon at delta by both accountants, and the one whose number governs."""

    rdp: float
    pld: float | None  # None: not computed (``pld_epsilon``)
    accountant: str  # governs: the setting's, or "rdp" where PLD is not computed or not tighter
    note: str = ""  # why the setting's accountant does not govern ("" when it does)

    @property
    def epsilon(self) -> float:
        """The governing epsilon: what is calibrated to, checked against budgets and reported."""
        if self.accountant == "pld":
            assert self.pld is not None
            return self.pld
        return self.rdp


def account(history: list[tuple[float, float, int]], delta: float, accountant: str) -> Spend:
    """Epsilon at ``delta`` of ``history`` by RDP and PLD; ``accountant`` (ACCOUNTANTS) governs.

    With "pld", RDP's number governs instead where PLD is not computed (``pld_epsilon``'s limits)
    or is not below RDP's (both are valid upper bounds: the smaller is), and ``note`` says so.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    rdp = rdp_epsilon(history, delta)
    pld, why = _pld(history, delta, rdp)
    if accountant == "rdp":
        return Spend(rdp=rdp, pld=pld, accountant="rdp")
    if pld is None:
        return Spend(rdp, None, "rdp", f"PLD not computed ({why}): RDP's epsilon governs")
    if pld > rdp:
        return Spend(rdp, pld, "rdp", "PLD's estimate is not below RDP's: RDP's epsilon governs")
    return Spend(rdp=rdp, pld=pld, accountant="pld")


def ledger_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where a site keeps its privacy ledger (one per site state dir)."""
    return Path(state_dir) / LEDGER_FILE


@dataclass(frozen=True)
class LedgerEntry:
    """One round's privacy spend (written before the round trains: a crash can only over-count)."""

    run_id: int
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    poisson: bool
    num_examples: int
    delta: float
    epsilon_total: float  # the scope's RDP total at ``delta`` once this entry counts (for auditors)
    utc: str
    # the same total by PLD (``pld_epsilon``); None: not computed (or a ledger written before it)
    epsilon_total_pld: float | None = None
    # whose total governed this round's budget decision (``Spend``); entries written before the
    # setting existed were all decided by RDP
    accountant: str = "rdp"
    accountant_note: str = ""  # why the site's dp-accountant did not govern ("" when it did)


class PrivacyLedger:
    """The site's DP-SGD history in a JSON file, read afresh by every (possibly new) process.

    The file is never reset or repaired automatically: an unreadable ledger raises PrivacyError,
    because starting over would silently forget what the site has already spent.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def entries(self) -> list[LedgerEntry]:
        """All recorded spends, oldest first (an absent file is an empty ledger)."""
        if not self.path.exists():
            return []
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            if document.get("version") != LEDGER_VERSION:
                raise ValueError(f"version {document.get('version')!r} != {LEDGER_VERSION}")
            entries = [LedgerEntry(**item) for item in document["entries"]]
            for entry in entries:
                if not (entry.noise_multiplier > 0 and 0 < entry.sample_rate <= 1):
                    raise ValueError(f"invalid entry {entry}")
                if not (isinstance(entry.steps, int) and entry.steps >= 0):
                    raise ValueError(f"invalid entry {entry}")
                if entry.accountant not in ACCOUNTANTS:
                    raise ValueError(f"invalid entry {entry}")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PrivacyError(
                f"privacy ledger {self.path} is unreadable ({exc}); refusing to train: restore it "
                "from a backup (deleting it would reset the site's privacy budget)"
            ) from exc
        return entries

    def history(
        self, *, scope: str = "site", run_id: int | None = None
    ) -> list[tuple[float, float, int]]:
        """The (sigma, q, steps) of the entries in ``scope`` ("run" needs ``run_id``): the raw
        history both accountants compose."""
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.entries()
            if scope == "site" or e.run_id == run_id
        ]

    def epsilon(self, delta: float, *, scope: str = "site", run_id: int | None = None) -> float:
        """Epsilon at ``delta`` spent so far in ``scope`` by RDP."""
        return rdp_epsilon(self.history(scope=scope, run_id=run_id), delta)

    def epsilon_pld(
        self, delta: float, *, scope: str = "site", run_id: int | None = None
    ) -> float | None:
        """The same spend by PLD (``pld_epsilon``: tighter; None when not computed)."""
        return pld_epsilon(self.history(scope=scope, run_id=run_id), delta)

    def spend(
        self, delta: float, accountant: str, *, scope: str = "site", run_id: int | None = None
    ) -> Spend:
        """The spend so far in ``scope`` by both accountants, ``accountant`` governing."""
        return account(self.history(scope=scope, run_id=run_id), delta, accountant)

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry`` (atomic rewrite of the file)."""
        entries = [*self.entries(), entry]
        atomic_write_json(
            self.path, {"version": LEDGER_VERSION, "entries": [asdict(e) for e in entries]}
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock (POSIX) so a budget check and its spend are one step across processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: one training process per site
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
