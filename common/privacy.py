"""A site's sample-level DP settings (the ``dp-*`` keys of run-config and node-config) and the loss rule.

Pure configuration, shared by the site (client/privacy/ trains with it) and by the checks the CLI
and the coordinator make before a run starts (common/preflight.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import ConfigError, PrivacyError
from common.registries import AUTO_LOSS, loss_info, sample_dp_losses

LEDGER_SCOPES: tuple[str, ...] = ("site", "run")
# Accountants of a site's epsilon (client/privacy/ledger.py): the one named governs calibration,
# budget decisions and the reported ``dp-epsilon``; the other's number is reported beside it.
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
# What DP-SGD moves in a head with affine paths (client/privacy/subspace.py): "prompts" only along
# the span of the class prompts' frozen embeddings (public task metadata), "full" every coordinate.
UPDATE_SPACES: tuple[str, ...] = ("prompts", "full")
DP_LR = 0.01
"""DP-SGD's learning rate (AdamW), apart from the run's ``lr``: under noise the best step is larger
(docs/results/privacy/: zero-shot AUROC at epsilon 3, lr 0.002 vs 0.01)."""

_KEYS: dict[str, str] = {
    "dp-noise-multiplier": "noise_multiplier",
    "dp-target-epsilon": "target_epsilon",
    "dp-delta": "delta",
    "dp-max-grad-norm": "max_grad_norm",
    "dp-max-epsilon": "max_epsilon",
    "dp-poisson": "poisson",
    "dp-ledger-scope": "ledger_scope",
    "dp-accountant": "accountant",
    "dp-update-space": "update_space",
    "dp-lr": "lr",
}
_MECHANISM = ("noise_multiplier", "target_epsilon")
_REQUEST = (*_MECHANISM, "max_epsilon")  # what ``PrivacySettings.requested`` looks at
_NODE_ONLY = ("dp-ledger-scope",)
_UNSET = ("", "none", "null")
_TEXT = (
    "ledger_scope",
    "accountant",
    "update_space",
)  # string-valued settings (the others are numbers or flags)


@dataclass
class PrivacySettings:
    """A site's sample-level DP-SGD settings (Opacus DP-SGD, PLD or RDP accounting).

    Give either ``noise_multiplier`` (sigma) or ``target_epsilon`` (what this run's planned rounds
    may cost together at ``delta``; sigma is then derived). ``max_epsilon`` is the site's budget at
    ``delta``: the ledger's total (all entries of ``ledger_scope``) never exceeds it; a round that
    would is declined. ``ledger_scope``: "site" (default, safe) counts everything this state dir
    ever spent, across federation runs; "run" counts only the current run's entries, i.e. the site
    treats each federation as spending a fresh budget (its own decision: node-config only).
    ``accountant``: "pld" (default: dp-accounting's privacy loss distributions, pessimistic
    estimate, a valid and tighter upper bound; RDP's where PLD is not computed or not tighter) or
    "rdp" (Opacus' RDP); it calibrates sigma, decides the budget and gives ``dp-epsilon``.
    ``poisson=False`` trains on shuffled fixed-size batches: both accountants assume Poisson
    sampling, so the reported epsilon is then only Opacus' usual approximation.
    ``update_space``: "prompts" (default) moves a head's affine paths only along the span of the
    class prompts' frozen embeddings when the data has prompts (client/privacy/subspace.py);
    "full" trains every coordinate of them. ``lr``: DP-SGD's learning rate (the run's ``lr`` is
    the non-private training's).
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    max_epsilon: float | None = None
    poisson: bool = True
    ledger_scope: str = "site"
    accountant: str = "pld"
    update_space: str = "prompts"
    lr: float = DP_LR

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError("privacy: give dp-noise-multiplier or dp-target-epsilon, not both")
        _check_positive("dp-noise-multiplier", self.noise_multiplier)
        _check_positive("dp-target-epsilon", self.target_epsilon)
        _check_positive("dp-max-grad-norm", self.max_grad_norm)
        _check_positive("dp-lr", self.lr)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy: dp-delta must be in (0, 1), got {self.delta!r}")
        if self.max_epsilon is not None and self.max_epsilon < 0:
            raise ConfigError(f"privacy: dp-max-epsilon must be >= 0, got {self.max_epsilon!r}")
        if self.ledger_scope not in LEDGER_SCOPES:
            raise ConfigError(
                f"privacy: dp-ledger-scope must be one of {list(LEDGER_SCOPES)}, "
                f"got {self.ledger_scope!r}"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"privacy: dp-accountant must be one of {list(ACCOUNTANTS)}, "
                f"got {self.accountant!r}"
            )
        if self.update_space not in UPDATE_SPACES:
            raise ConfigError(
                f"privacy: dp-update-space must be one of {list(UPDATE_SPACES)}, "
                f"got {self.update_space!r}"
            )

    @property
    def enabled(self) -> bool:
        """True when a DP mechanism is configured (a noise multiplier or a target epsilon)."""
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @property
    def requested(self) -> bool:
        """True when training must be private: a mechanism, or a site budget, is configured."""
        return any(getattr(self, name) is not None for name in _REQUEST)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> PrivacySettings:
        """Settings from the ``dp-*`` keys of a run-config or node-config (other keys are ignored).

        Unset optional values: missing, ``""``/``"none"``; ``dp-noise-multiplier = 0`` and
        ``dp-target-epsilon = 0`` also mean "off" (a zero sigma gives no privacy at all), while
        ``dp-max-epsilon = 0`` is a real, zero budget. An unknown ``dp-*`` key is an error.
        """
        return cls(**_parse(values, source="config"))

    @classmethod
    def merge(
        cls, run_values: Mapping[str, Any], node_values: Mapping[str, Any]
    ) -> PrivacySettings:
        """The site's effective settings: the node-config wins over the run-config.

        Every ``dp-*`` value the node sets replaces the run's. The mechanism is replaced as a
        whole: a node that sets a noise multiplier or a target epsilon drops both of the run's.
        Unset node values keep the run's (so a node cannot switch DP off by leaving a key empty).
        ``dp-ledger-scope`` is the site's own choice and is refused in the run-config: the
        consortium must not be able to reset a site's cumulative budget.
        """
        for key in _NODE_ONLY:
            if key in run_values:
                raise ConfigError(
                    f"run-config: '{key}' is a site's own setting; set it in the node-config"
                )
        run = _parse(run_values, source="run-config")
        node = _parse(node_values, source="node-config")
        if any(name in node for name in _MECHANISM):
            run = {k: v for k, v in run.items() if k not in _MECHANISM}
        return cls(**{**run, **node})

    def request_keys(self) -> dict[str, Any]:
        """The set ``dp-*`` values that make training private (a mechanism or a budget)."""
        return {k: v for k, v in self.to_config().items() if _KEYS[k] in _REQUEST}

    def to_config(self) -> dict[str, Any]:
        """The settings as ``dp-*`` keys (unset values omitted)."""
        names = {v: k for k, v in _KEYS.items()}
        return {names[k]: v for k, v in asdict(self).items() if v is not None}


def _check_positive(key: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"privacy: {key} must be a finite number > 0, got {value!r}")


def _parse(values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The set ``dp-*`` values of one mapping as PrivacySettings field names -> typed values."""
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if not str(key).startswith("dp-"):
            continue
        if key not in _KEYS:
            raise ConfigError(
                f"{source}: unknown privacy key '{key}'; valid: {', '.join(sorted(_KEYS))}"
            )
        name = _KEYS[key]
        value = _convert(name, raw, key=key, source=source)
        if value is not None:
            out[name] = value
    return out


def _convert(name: str, raw: Any, *, key: str, source: str) -> Any:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in _UNSET):
        return None
    try:
        if name == "poisson":
            if isinstance(raw, str):
                if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(raw)
                return raw.lower() in {"true", "1", "yes"}
            return bool(raw)
        if name in _TEXT:
            return str(raw)
        if isinstance(raw, bool):
            raise ValueError(raw)
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: '{key}' = {raw!r} is not valid") from exc
    if name in _MECHANISM and value == 0.0:
        return None
    return value


def require_sample_level_dp(loss: str) -> None:
    """Raise PrivacyError unless ``loss`` is valid for DP-SGD: per-example decomposable, or
    ``auto``, which then chooses a per-example objective (``registries.choose_loss``)."""
    info = loss_info(loss)
    if info.per_example or info.auto:
        return
    raise PrivacyError(
        f"sample-level DP (DP-SGD) is refused for loss '{loss}': it uses in-batch negatives, so "
        "removing one example changes the other examples' loss terms; Opacus' per-sample "
        "clipping then does not bound the sensitivity and the epsilon it would report is not a "
        "valid guarantee. Losses valid under sample-level DP: "
        f"{', '.join(sample_dp_loss_choices())} (auto chooses the best the data supports); or "
        "client-level DP (Flower's clipping + noise of the whole site update) "
        "with any loss"
    )


def sample_dp_loss_choices() -> tuple[str, ...]:
    """The losses a run may name under sample-level DP: ``auto`` and the per-example ones."""
    return (AUTO_LOSS, *sample_dp_losses())
