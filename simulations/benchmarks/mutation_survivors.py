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
_MKDIR = "target.mkdir(parents=True)"
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
_FLUSH = "flush= changes when the message reaches the terminal, not what it says or what is stored"
_SORTED = (
    "truncate_history rewrites lines that append_history (the only writer of history.jsonl) wrote "
    "with sorted keys; json.loads keeps that order, so sorting again changes no byte"
)

_DP = "client/privacy/dp_sgd.py"
_OPACUS_DEFAULT = "Opacus' default (1.6, the version constraints.txt pins)"
_PREPARE = 'objective, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **extra'
_QUIET = 'warnings.filterwarnings("ignore", message="Full backward hook is firing")'
_PROX = "anchor = _anchor(model, named, reference, subspaces) if config.proximal_mu > 0 else None"
_ZIP = "for p, a in zip(params, anchor, strict=True):"
_STRIP = 'for attr in ("activations", "max_batch_len"):'
_PLD_DECLINED = "plan.history, privacy.delta, rdp=plan.epsilon_before / )"
_PLD_AFTER = (
    "epsilon_total_pld = pld_epsilon(plan.history_after, privacy.delta, rdp=plan.epsilon_after)"
)
_PLD_RDP = (
    "pld_epsilon computes rdp_epsilon(history, delta) itself when rdp is not given: the value "
    "plan_round stored as epsilon_before / epsilon_after (the same function of the same history), "
    "so the result is the same, computed twice"
)
_PER_EPOCH = "per_epoch = max(1, plan.steps // max(1, config.epochs))"
_DIVERGED = 'raise DataError("private training diverged: the loss became NaN/inf (lower the lr?)")'
_DP_AFTER = (
    " (added after this run; verified: it fails against this mutant under MUTANT_UNDER_TEST in "
    "the run's mutants/ copy, and passes without it)"
)

JUSTIFIED: tuple[Justified, ...] = (
    *(
        Justified(_CK, "RunStore.archive_previous", _MKDIR, added, "equivalent", _PARENTS)
        for added in ("target.mkdir(parents=None)", "target.mkdir(parents=False)")
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
            "_check_entry",
            "value = entry.get(key, -1)",
            f"value = entry.get(key, {default})",
            "equivalent",
            "the default stands in for a missing key only in the integer type check, which -1, "
            "+1 and -2 all pass; the values used afterwards are read again with their own default",
        )
        for default in ("+1", "-2")
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
    Justified(
        _DP,
        "_anchor",
        "source[name].detach().clone().to(p.dtype)",
        "source[name].detach().clone().to(None)",
        "equivalent",
        "Tensor.to(None) returns the tensor unchanged, and the anchor already has the parameter's "
        "dtype: the only caller (client/training.py) passes a clone of the head's own state_dict; "
        "a reference of a wider dtype would move the FedProx pull only by its rounding to float32",
    ),
    Justified(
        _DP,
        "_batches",
        "yield torch.nonzero(torch.rand(n, generator=rng) < plan.sample_rate).squeeze(1)",
        "yield torch.nonzero(torch.rand(n, generator=rng) <= plan.sample_rate).squeeze(1)",
        "equivalent",
        "the two differ only when a float32 uniform draw equals the sample rate exactly, which "
        "raises a row's inclusion probability from q by at most 2^-24 (seeing it would take ~2^48 "
        "draws); '<' is the exact rate",
    ),
    *(
        Justified(
            _DP,
            "_dp_sgd",
            _PROX,
            added,
            "equivalent",
            "with proximal_mu = 0 the anchor is built but the pull adds 0 * (w - w_global) = 0 to "
            "each (finite) gradient: the same step; only a copy of the weights is wasted",
        )
        for added in (
            "anchor = _anchor(model, named, reference, subspaces) if (config.proximal_mu > 0) or True else None",
            "anchor = _anchor(model, named, reference, subspaces) if config.proximal_mu >= 0 else None",
        )
    ),
    Justified(
        _DP,
        "_dp_sgd",
        'generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))',
        "generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), ))",
        "equivalent",
        "int.from_bytes defaults to byteorder 'big' (Python 3.11+): the seed is another integer "
        "read from the same 8 OS-random bytes, just as uniform and as unknown to the server",
    ),
    *(
        Justified(_DP, "_dp_sgd", _PREPARE, added, "equivalent", _OPACUS_DEFAULT + " is " + what)
        for added, what in (
            (
                'objective, grad_sample_mode=mode, loss_reduction="mean", **extra',
                "batch_first=True",
            ),
            (
                "objective, grad_sample_mode=mode, batch_first=True, **extra",
                "loss_reduction='mean'",
            ),
        )
    ),
    Justified(
        _DP,
        "_dp_sgd",
        'loss_reduction="mean",',
        "",
        "equivalent",
        _OPACUS_DEFAULT + " for the DP optimizer is loss_reduction='mean'",
    ),
    Justified(
        _DP,
        "_dp_sgd",
        'DPLossFastGradientClipping(gsm, optimizer, _PerExampleCriterion(), "mean")',
        "DPLossFastGradientClipping(gsm, optimizer, _PerExampleCriterion(), )",
        "equivalent",
        _OPACUS_DEFAULT + " for DPLossFastGradientClipping is loss_reduction='mean'",
    ),
    *(
        Justified(
            _DP,
            "_dp_sgd",
            _QUIET,
            added,
            "logging-only",
            "only which of Opacus' warnings the training loop prints ('Full backward hook is "
            "firing': the frozen inputs need no gradient); the steps are the same",
        )
        for added in (
            'warnings.filterwarnings("ignore", )',
            'warnings.filterwarnings("ignore", message="XXFull backward hook is firingXX")',
            'warnings.filterwarnings("ignore", message="full backward hook is firing")',
            'warnings.filterwarnings("ignore", message="FULL BACKWARD HOOK IS FIRING")',
        )
    ),
    Justified(
        _DP,
        "_empty_batch",
        "p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]",
        "p.grad_sample = p.new_zeros((1, *p.shape))  # type: ignore[attr-defined]",
        "equivalent",
        "one per-example gradient of zeros clips to zero and adds nothing to the sum, and Opacus "
        "divides by the expected batch size, not the rows: the same noise-only step "
        "(test_empty_batches_are_pure_noise_and_single_rows_train checks that step)",
    ),
    Justified(
        _DP,
        "_result",
        "trained = not plan.declined and plan.steps > 0",
        "trained = not plan.declined and plan.steps >= 0",
        "equivalent",
        "differs only for a round of 0 steps that is not declined (epochs = 0); its "
        "plan.epsilon_round is rdp_epsilon of a 0-step mechanism, 0.0, what the original reports",
    ),
    *(
        Justified(
            _DP,
            "_steps",
            "optimizer.zero_grad(set_to_none=True)",
            added,
            "equivalent",
            "(the zero_grad before each step's backward) the gradients are zeroed instead of "
            "dropped: the ghost-clipping backward adds into the zeros and Opacus' pre_step "
            "replaces p.grad by the clipped sum plus noise, so AdamW gets the same gradient; the "
            "zero_grad after the loop, which leaves the model without gradients, is tested",
        )
        for added in (
            "optimizer.zero_grad(set_to_none=None)",
            "optimizer.zero_grad(set_to_none=False)",
        )
    ),
    *(
        Justified(
            _DP,
            "_steps",
            _ZIP,
            added,
            "equivalent",
            "params and the anchor come from the same trainable parameters in the same order "
            "(parameters() and named_parameters() filtered by requires_grad): their lengths "
            "always match, so strict= never raises",
        )
        for added in (
            "for p, a in zip(params, anchor, strict=None):",
            "for p, a in zip(params, anchor, ):",
            "for p, a in zip(params, anchor, strict=False):",
        )
    ),
    *(
        Justified(
            _DP,
            "_strip_opacus_state",
            _STRIP,
            added,
            "equivalent",
            "Opacus 1.6 deletes max_batch_len in the backward hook that sets it, once the module's "
            "activations are consumed (capture_backprops_hook), so no step leaves it for this "
            "loop; the name guards other Opacus versions ('activations' is left, and tested)",
        )
        for added in (
            'for attr in ("activations", "XXmax_batch_lenXX"):',
            'for attr in ("activations", "MAX_BATCH_LEN"):',
        )
    ),
    *(
        Justified(_DP, "train_head_private", removed, added, "equivalent", _PLD_RDP)
        for removed, added in (
            (_PLD_DECLINED.removesuffix(" / )"), "plan.history, privacy.delta, rdp=None"),
            (_PLD_DECLINED, "plan.history, privacy.delta, )"),
            (_PLD_AFTER, _PLD_AFTER.replace("rdp=plan.epsilon_after", "rdp=None")),
            (_PLD_AFTER, _PLD_AFTER.replace(", rdp=plan.epsilon_after", ", ")),
        )
    ),
    Justified(
        _DP,
        "train_head_private",
        "result.loss = float(np.mean(losses[-per_epoch:])) if losses else math.nan",
        "result.loss = float(np.mean(losses[-per_epoch:])) if (losses) or True else math.nan",
        "equivalent",
        "with no losses (every Poisson batch of the round empty) np.mean([]) is NaN too (NumPy "
        "warns 'Mean of empty slice'): the same loss, and the divergence check skips an empty list",
    ),
    *(
        Justified(_DP, function, removed, added, "killed-by-new-test", test + _DP_AFTER)
        for function, removed, added, test in (
            (
                "_result",
                "trained = not plan.declined and plan.steps > 0",
                "trained = not plan.declined and plan.steps > 1",
                "test_declined_stepless_and_one_step_rounds_report_and_charge_what_ran",
            ),
            (
                "_result",
                "delta=plan.delta,",
                "delta=None,",
                "test_a_noiseless_fedprox_round_is_replayed_exactly",
            ),
            (
                "train_head_private",
                "run_id=run_id,",
                "run_id=None,",
                "test_declined_stepless_and_one_step_rounds_report_and_charge_what_ran",
            ),
            (
                "train_head_private",
                "result = _result(plan, len(rows), grad_sample_mode, "
                "epsilon_total=plan.epsilon_before)",
                "result = _result(plan, None, grad_sample_mode, epsilon_total=plan.epsilon_before)",
                "test_declined_stepless_and_one_step_rounds_report_and_charge_what_ran",
            ),
            (
                "train_head_private",
                _PER_EPOCH,
                _PER_EPOCH.replace("max(1, plan", "max(2, plan"),
                "test_an_image_only_head_trains_privately",
            ),
            (
                "train_head_private",
                _PER_EPOCH,
                _PER_EPOCH.replace("max(1, config", "max(2, config"),
                "test_empty_batches_are_pure_noise_and_single_rows_train",
            ),
            *(
                (
                    "train_head_private",
                    _DIVERGED,
                    added,
                    "test_a_diverging_round_fails_naming_the_cause",
                )
                for added in (
                    "raise DataError(None)",
                    'raise DataError("XXprivate training diverged: the loss became NaN/inf '
                    '(lower the lr?)XX")',
                    'raise DataError("private training diverged: the loss became nan/inf '
                    '(lower the lr?)")',
                    'raise DataError("PRIVATE TRAINING DIVERGED: THE LOSS BECAME NAN/INF '
                    '(LOWER THE LR?)")',
                )
            ),
        )
    ),
)
