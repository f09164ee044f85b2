"""Sample-level DP-SGD at a site (Opacus): ``ledger`` (the persistent spend; its epsilon by RDP and
by PLD, ``dp-accountant`` naming the one that governs), ``budget`` (what a round costs and whether the site agrees) and ``dp_sgd`` (the private
training loop).

The settings (``dp-*`` keys, PrivacySettings) and the loss rule live in common/privacy.py.
"""

from client.privacy.budget import RoundPlan, plan_round
from client.privacy.dp_sgd import (
    GRAD_SAMPLE_MODES,
    PrivateObjective,
    PrivateRoundResult,
    train_head_private,
)
from client.privacy.ledger import (
    LEDGER_FILE,
    LedgerEntry,
    PrivacyLedger,
    Spend,
    account,
    ledger_path,
    pld_epsilon,
    rdp_epsilon,
)
from common.privacy import PrivacySettings, require_sample_level_dp

__all__ = [
    "GRAD_SAMPLE_MODES",
    "LEDGER_FILE",
    "LedgerEntry",
    "PrivacyLedger",
    "PrivacySettings",
    "PrivateObjective",
    "PrivateRoundResult",
    "RoundPlan",
    "Spend",
    "account",
    "ledger_path",
    "plan_round",
    "pld_epsilon",
    "rdp_epsilon",
    "require_sample_level_dp",
    "train_head_private",
]
