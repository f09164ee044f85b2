"""The selection rules compared by `default_vs_frozen --rules`: which step each keeps."""

from __future__ import annotations

import numpy as np

from common.head_start import ValidationScores
from simulations.experiments.selection_rules import (
    DEFAULT,
    ONE_SE,
    ORACLE,
    RULES,
    earliest_within_noise,
    rule_steps,
)


def _scores(score: float, r5: float, shift: np.ndarray, base: np.ndarray) -> ValidationScores:
    return ValidationScores({"R@5": r5, "score": score}, metric_replicates={"R@5": base + shift})


def test_rules_differ_only_in_how_much_evidence_a_trained_step_needs() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.02, 200)
    start = _scores(0.50, 0.30, np.zeros(200), base)
    noisy = _scores(0.56, 0.31, rng.normal(0.01, 0.03, 200), base)  # best score, within noise
    clear = _scores(0.52, 0.31, np.full(200, 0.02), base)  # smaller, certain gain
    worse_r5 = _scores(0.55, 0.29, np.full(200, 0.05), base)  # certain, but R@5 below the start
    top = _scores(0.60, 0.29, rng.normal(0.0, 0.05, 200), base)  # the best score, pure noise
    metrics = [start, noisy, clear, worse_r5, top]
    steps = rule_steps(metrics, test_scores=[0.1, 0.2, 0.3, 0.9, 0.4])
    assert steps["start only"] == 0
    assert steps[DEFAULT] == 4  # the highest score, the start included
    assert steps["score beats start in 0.95 of bootstrap resamples"] == 3  # a metric may fall
    assert steps["point guard (no metric lower)"] == 1  # highest score with no metric lower
    assert steps["point guard + score beats start in 0.95"] == 2
    assert steps["point guard + score beats start in 0.99"] == 2
    assert steps[ORACLE] == 3
    assert set(steps) == {*RULES, ONE_SE, ORACLE}


def test_without_an_eligible_step_every_guard_keeps_the_start() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.02, 200)
    start = _scores(0.50, 0.30, np.zeros(200), base)
    noise = _scores(0.51, 0.29, rng.normal(0.0, 0.03, 200), base)
    steps = rule_steps([start, noise], test_scores=[0.0, 1.0])
    guards = [name for name in RULES if name not in ("start only", DEFAULT)]
    assert len(guards) == 4 and all(steps[name] == 0 for name in guards)
    assert steps[DEFAULT] == 1 == steps[ORACLE]


def test_the_one_standard_error_rule_keeps_the_earliest_step_within_noise_of_the_best() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(0.5, 0.02, 200)  # standard error 0.02
    start = _scores(0.50, 0.30, np.zeros(200), base)
    early = _scores(0.531, 0.30, np.zeros(200), base)
    best = _scores(0.545, 0.30, np.zeros(200), base)
    assert earliest_within_noise([start, early, best]) == 1  # 0.531 >= 0.545 - 0.02
    assert earliest_within_noise([start, best]) == 1  # the start is 0.045 below: not noise
    plain = [ValidationScores(dict(m)) for m in (start, early, best)]
    assert earliest_within_noise(plain) == 2  # no replicates: the best score
