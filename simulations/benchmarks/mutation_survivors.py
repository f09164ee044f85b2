"""Surviving mutants that may stay, each with the reason (read by simulations/benchmarks/mutation.py).

A mutant is matched by its module, its function and its diff (the original and the mutated source
lines, as the report shows them), not by mutmut's number, which shifts when a function is edited.
``kind`` is ``equivalent`` (no input can tell the mutant from the original) or ``logging-only``
(the mutation changes only a message printed or logged, never a decision or a stored value).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Justified:
    module: str
    function: str
    removed: str
    added: str
    kind: str
    reason: str


_CK = "server/checkpoints.py"
_LEDGER = "client/privacy/ledger.py"
_BUDGET = "client/privacy/budget.py"
_AFTER = (
    " (added after this run; verified: it fails against this mutant under MUTANT_UNDER_TEST "
    "in the run's mutants/ copy, and passes without it)"
)
_TIE = (
    "differs only when the epsilon equals the bound plus the 1e-9 slack bit for bit, a float tie "
    "no input can be built to hit"
)
_LOCALE = (
    "the locale's encoding, which is UTF-8 wherever the tests and the images run (Python "
    "coerces the C locale to UTF-8); it would differ only under a non-UTF-8 locale"
)
_MKDIR = "target.mkdir(parents=True, exist_ok=True)"
_START_PRINT = (
    'print(f"[fedembed] an earlier run in {self.root} was moved to {archived}", flush=True)'
)
_FINAL_PRINT = 'print(f"[fedembed] final head exported to {path}", flush=True)'
_READ = 'for line in self.history.read_text(encoding="utf-8").splitlines():'
_REWRITE = (
    'atomic_write_text(self.history, "".join(json.dumps(e, sort_keys=True) + "\\n" for e in kept))'
)

_AUDIT = "client/audit.py"
_AUDIT_OPEN = 'with open(path, encoding="utf-8") as handle:'
_NPY_LOAD = "masked = [np.load(io.BytesIO(v), allow_pickle=False) for v in items]"
_MASKED_DTYPE = 'if not str(a.get("dtype", "")).startswith(("int", "uint"))'

_DIGEST_LINE = (
    'digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode("utf-8"))'
)

_PARENTS = (
    "archive_previous runs only when history.jsonl or checkpoints/ exists inside the run dir, so "
    "the run dir and its parent (the archive's parent) exist: parents= never matters"
)
_EXIST_OK = (
    "exist_ok matters only when the same run dir is archived twice within one second; "
    "there the original fails too (os.replace onto the earlier archive's non-empty checkpoints/ "
    "raises, after overwriting its history.jsonl), so no test can prefer it. Reported to the lead: "
    "the archive name should be unique (e.g. a counter suffix)"
)
_FLUSH = "flush= changes when the message reaches the terminal, not what it says or what is stored"
_SORTED = (
    "truncate_history rewrites lines that append_history (the only writer of history.jsonl) wrote "
    "with sorted keys; json.loads keeps that order, so sorting again changes no byte"
)

JUSTIFIED: tuple[Justified, ...] = (
    *(
        Justified(_CK, "RunStore.archive_previous", _MKDIR, added, "equivalent", _PARENTS)
        for added in (
            "target.mkdir(parents=None, exist_ok=True)",
            "target.mkdir(exist_ok=True)",
            "target.mkdir(parents=False, exist_ok=True)",
        )
    ),
    *(
        Justified(_CK, "RunStore.archive_previous", _MKDIR, added, "finding", _EXIST_OK)
        for added in (
            "target.mkdir(parents=True, exist_ok=None)",
            "target.mkdir(parents=True, )",
            "target.mkdir(parents=True, exist_ok=False)",
        )
    ),
    *(
        Justified(
            _CK,
            "RunStore.start_fresh",
            _START_PRINT,
            _START_PRINT.replace(flush, to),
            "logging-only",
            _FLUSH,
        )
        for flush, to in (
            (", flush=True", ", flush=None"),
            ("flush=True", ""),
            ("flush=True", "flush=False"),
        )
    ),
    *(
        Justified(
            _CK,
            "RunStore.export_final",
            _FINAL_PRINT,
            _FINAL_PRINT.replace(flush, to),
            "logging-only",
            _FLUSH,
        )
        for flush, to in (
            (", flush=True", ", flush=None"),
            ("flush=True", ""),
            ("flush=True", "flush=False"),
        )
    ),
    Justified(
        _CK,
        "RunStore.read_history",
        _READ,
        _READ.replace('"utf-8"', '"UTF-8"'),
        "equivalent",
        "the same codec under another spelling",
    ),
    Justified(
        _CK,
        "RunStore.read_history",
        _READ,
        _READ.replace('"utf-8"', "None"),
        "equivalent",
        _LOCALE,
    ),
    *(
        Justified(
            _CK,
            "RunStore.truncate_history",
            _REWRITE,
            _REWRITE.replace(old, new),
            "equivalent",
            _SORTED,
        )
        for old, new in (
            ("sort_keys=True", "sort_keys=None"),
            ("sort_keys=True", ""),
            ("sort_keys=True", "sort_keys=False"),
        )
    ),
    Justified(
        _CK,
        "arrays_digest",
        _DIGEST_LINE,
        _DIGEST_LINE.replace('"utf-8"', '"UTF-8"'),
        "equivalent",
        "the same codec under another spelling",
    ),
    Justified(
        _CK,
        "RunStore.load_server_state",
        "return self.load_checkpoint(path, server_round).arrays",
        "return self.load_checkpoint(path, None).arrays",
        "equivalent",
        "the round only fills Checkpoint.round, and load_server_state returns the arrays alone",
    ),
    Justified(
        _LEDGER,
        "pld_epsilon",
        'best = float("inf")',
        'best = float("INF")',
        "equivalent",
        "float() reads infinity in any letter case",
    ),
    Justified(
        _LEDGER,
        "pld_epsilon",
        "if best < rdp:",
        "if best <= rdp:",
        "equivalent",
        "differs only when a PLD estimate equals the RDP epsilon bit for bit (a float tie no "
        "input can be built to hit); either way the result is a valid upper bound <= RDP's",
    ),
    Justified(
        _LEDGER,
        "PrivacyLedger.entries",
        'document = json.loads(self.path.read_text(encoding="utf-8"))',
        "document = json.loads(self.path.read_text(encoding=None))",
        "equivalent",
        _LOCALE,
    ),
    Justified(
        _LEDGER,
        "rdp_epsilon",
        "accountant.history = [entry for entry in history if entry[2] > 0]",
        "accountant.history = [entry for entry in history if entry[2] >= 0]",
        "equivalent",
        "a (sigma, q, 0) entry adds steps x RDP = 0 at every order: the epsilon is the same",
    ),
    Justified(
        _LEDGER,
        "PrivacyLedger.entries",
        'document = json.loads(self.path.read_text(encoding="utf-8"))',
        'document = json.loads(self.path.read_text(encoding="UTF-8"))',
        "equivalent",
        "the same codec under another spelling",
    ),
    *(
        Justified(
            _LEDGER,
            "PrivacyLedger.entries",
            '"from a backup (deleting it would reset the site\'s privacy budget)"',
            added,
            "killed-by-new-test",
            "test_a_ledger_of_another_version_is_refused (its message check was widened after "
            "this run; it fails against this mutant under MUTANT_UNDER_TEST and passes without)",
        )
        for added in (
            '"XXfrom a backup (deleting it would reset the site\'s privacy budget)XX"',
            '"FROM A BACKUP (DELETING IT WOULD RESET THE SITE\'S PRIVACY BUDGET)"',
        )
    ),
    Justified(
        _BUDGET,
        "plan_round",
        '"privacy: DP is not configured (dp-noise-multiplier or dp-target-epsilon)"',
        '"XXprivacy: DP is not configured (dp-noise-multiplier or dp-target-epsilon)XX"',
        "killed-by-new-test",
        "test_privacy_that_is_not_configured_is_refused" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        '"training must be private (dp-max-epsilon is set) but neither dp-noise-multiplier nor "',
        '"XXtraining must be private (dp-max-epsilon is set) but neither dp-noise-multiplier nor XX"',
        "killed-by-new-test",
        "test_privacy_that_is_not_configured_is_refused" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        '"training must be private (dp-max-epsilon is set) but neither dp-noise-multiplier nor "',
        '"TRAINING MUST BE PRIVATE (DP-MAX-EPSILON IS SET) BUT NEITHER DP-NOISE-MULTIPLIER NOR "',
        "killed-by-new-test",
        "test_privacy_that_is_not_configured_is_refused" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        '"dp-target-epsilon is configured: refusing to train without noise"',
        '"XXdp-target-epsilon is configured: refusing to train without noiseXX"',
        "killed-by-new-test",
        "test_privacy_that_is_not_configured_is_refused" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'raise DataError("private training needs at least one labelled example")',
        "raise DataError(None)",
        "killed-by-new-test",
        "test_one_row_and_one_planned_round_are_enough" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'raise DataError("private training needs at least one labelled example")',
        'raise DataError("XXprivate training needs at least one labelled exampleXX")',
        "killed-by-new-test",
        "test_one_row_and_one_planned_round_are_enough" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'raise DataError("private training needs at least one labelled example")',
        'raise DataError("PRIVATE TRAINING NEEDS AT LEAST ONE LABELLED EXAMPLE")',
        "killed-by-new-test",
        "test_one_row_and_one_planned_round_are_enough" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        '"allows releasing an example outright; use a smaller dp-delta"',
        '"XXallows releasing an example outright; use a smaller dp-deltaXX"',
        "killed-by-new-test",
        "test_a_delta_of_exactly_one_over_n_is_refused" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        '"allows releasing an example outright; use a smaller dp-delta"',
        '"ALLOWS RELEASING AN EXAMPLE OUTRIGHT; USE A SMALLER DP-DELTA"',
        "killed-by-new-test",
        "test_a_delta_of_exactly_one_over_n_is_refused" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'scope_run = run_id if privacy.ledger_scope == "run" else None',
        "scope_run = None",
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'scope_run = run_id if privacy.ledger_scope == "run" else None',
        'scope_run = run_id if (privacy.ledger_scope == "run") and False else None',
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'scope_run = run_id if privacy.ledger_scope == "run" else None',
        'scope_run = run_id if privacy.ledger_scope != "run" else None',
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'scope_run = run_id if privacy.ledger_scope == "run" else None',
        'scope_run = run_id if privacy.ledger_scope == "XXrunXX" else None',
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'scope_run = run_id if privacy.ledger_scope == "run" else None',
        'scope_run = run_id if privacy.ledger_scope == "RUN" else None',
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        "history = ledger.history(scope=privacy.ledger_scope, run_id=scope_run)",
        "history = ledger.history(scope=privacy.ledger_scope, run_id=None)",
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        "history = ledger.history(scope=privacy.ledger_scope, run_id=scope_run)",
        "history = ledger.history(scope=privacy.ledger_scope, )",
        "killed-by-new-test",
        "test_the_run_scope_budget_ignores_other_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'run_history = ledger.history(scope="run", run_id=run_id) + this_round',
        "run_history = ledger.history(run_id=run_id) + this_round",
        "killed-by-new-test",
        "test_a_target_epsilon_counts_only_this_runs_spend" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "_calibrated_sigma",
        'raise ConfigError("privacy: dp-target-epsilon needs at least one training step per round")',
        'raise ConfigError("XXprivacy: dp-target-epsilon needs at least one training step per roundXX")',
        "killed-by-new-test",
        "test_a_target_epsilon_needs_a_training_step" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "_calibrated_sigma",
        'f"dp-target-epsilon {privacy.target_epsilon:g} is unreachable for {total_steps} steps " / f"at sample rate {sample_rate:.4g} ({exc}); raise it or train fewer rounds/epochs"',
        "None",
        "killed-by-new-test",
        "test_an_unreachable_target_epsilon_is_refused_naming_the_round" + _AFTER,
    ),
    Justified(
        _BUDGET,
        "plan_round",
        'scope_run = run_id if privacy.ledger_scope == "run" else None',
        'scope_run = run_id if (privacy.ledger_scope == "run") or True else None',
        "equivalent",
        "with the 'site' scope PrivacyLedger.history ignores run_id, so passing it changes nothing",
    ),
    *(
        Justified(_BUDGET, "plan_round", removed, added, "equivalent", _TIE)
        for removed, added in (
            (
                "if limit is not None and plan.epsilon_after > limit + _EPSILON_SLACK:",
                "if limit is not None and plan.epsilon_after >= limit + _EPSILON_SLACK:",
            ),
            (
                "if run_after > privacy.target_epsilon + _EPSILON_SLACK:",
                "if run_after >= privacy.target_epsilon + _EPSILON_SLACK:",
            ),
        )
    ),
    Justified(
        _BUDGET,
        "plan_round",
        "if run_after > privacy.target_epsilon + _EPSILON_SLACK:",
        "if run_after > privacy.target_epsilon - _EPSILON_SLACK:",
        "equivalent",
        "differs only for a run epsilon within 1e-9 of dp-target-epsilon; sigma is calibrated "
        "(Opacus, tolerance 0.01) so that the planned rounds reach at most the target, and the "
        "target cannot be given together with a sigma to place it exactly",
    ),
    *(
        Justified(
            _BUDGET,
            "plan_round",
            'run_history = ledger.history(scope="run", run_id=run_id) + this_round',
            added,
            "equivalent",
            "PrivacyLedger.history filters by run_id for every scope but 'site'",
        )
        for added in (
            "run_history = ledger.history(scope=None, run_id=run_id) + this_round",
            'run_history = ledger.history(scope="XXrunXX", run_id=run_id) + this_round',
            'run_history = ledger.history(scope="RUN", run_id=run_id) + this_round',
        )
    ),
    *(
        Justified(
            _BUDGET,
            "_calibrated_sigma",
            'warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")',
            added,
            "logging-only",
            "only which of Opacus' warnings the sigma search prints; the sigma is the same",
        )
        for added in (
            'warnings.filterwarnings("ignore", )',
            'warnings.filterwarnings("ignore", message="XXOptimal order is the largest alphaXX")',
            'warnings.filterwarnings("ignore", message="optimal order is the largest alpha")',
            'warnings.filterwarnings("ignore", message="OPTIMAL ORDER IS THE LARGEST ALPHA")',
        )
    ),
    Justified(
        _BUDGET,
        "_calibrated_sigma",
        'accountant="rdp", / )',
        ")",
        "equivalent",
        "Opacus' get_noise_multiplier defaults to accountant='rdp'",
    ),
    Justified(
        _AUDIT,
        "_describe_field",
        _NPY_LOAD,
        "masked = [np.load(io.BytesIO(v), allow_pickle=None) for v in items]",
        "equivalent",
        "numpy.load refuses pickles when allow_pickle is falsy (if not allow_pickle): None "
        "refuses them exactly as False does (tests/client/test_audit_mutants.py checks the refusal)",
    ),
    Justified(
        _AUDIT,
        "_describe_field",
        _NPY_LOAD,
        "masked = [np.load(io.BytesIO(v), ) for v in items]",
        "equivalent",
        "numpy.load's allow_pickle defaults to False",
    ),
    *(
        Justified(_AUDIT, "verify_audit_log", _AUDIT_OPEN, added, "equivalent", _LOCALE)
        for added in ("with open(path, encoding=None) as handle:", "with open(path, ) as handle:")
    ),
    Justified(
        _AUDIT,
        "verify_audit_log",
        _AUDIT_OPEN,
        'with open(path, encoding="UTF-8") as handle:',
        "equivalent",
        "codec names are looked up case-insensitively: 'UTF-8' is the same codec as 'utf-8'",
    ),
    *(
        Justified(
            _AUDIT,
            "_masked_violations",
            _MASKED_DTYPE,
            added,
            "equivalent",
            "the default is used only when a masked array records no dtype; '', 'None' and "
            "'XXXX' all fail the int/uint prefix test, and the message prints the recorded value "
            "(None), not the default",
        )
        for added in (
            'if not str(a.get("dtype", None)).startswith(("int", "uint"))',
            'if not str(a.get("dtype", )).startswith(("int", "uint"))',
            'if not str(a.get("dtype", "XXXX")).startswith(("int", "uint"))',
        )
    ),
)
