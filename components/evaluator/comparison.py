"""Candidate against baseline on the same eval examples: a paired test, its interval, and the blessing rule.

Both models are scored on every eval example, so each example falls in one cell of a 2x2 table:

                         baseline right   baseline wrong
    candidate right          both          candidate_only
    candidate wrong     baseline_only         neither

Only the discordant cells say anything about which model is better. The question the gate asks is one-sided:

    H0: the candidate is at least as accurate as the baseline      (Δ = acc_candidate − acc_baseline ≥ 0)
    H1: the candidate is less accurate                               (Δ < 0)

- `mcnemar`: McNemar's exact test. Given m = candidate_only + baseline_only discordant examples, under H0's
  boundary each is equally likely to favour either model, so baseline_only ~ Binomial(m, 1/2) and
  p = P(X >= baseline_only). Its interval is the Clopper-Pearson interval of the share of discordant
  examples the baseline wins, mapped onto Δ given m (conditional on m, like the test; with no discordant
  example it is [0, 0]). The upper bound is below 0 exactly when p < alpha.
- `bootstrap`: the eval set resampled with replacement (the 2x2 table as a multinomial) BOOTSTRAP_RESAMPLES
  times with a fixed seed; p = (1 + resamples with Δ* >= 0) / (1 + resamples), the interval Δ*'s alpha and
  1 − alpha quantiles.

Intervals are two-sided at 1 − 2·alpha, i.e. each bound is a one-sided 1 − alpha bound: with alpha 0.05, a
90 % interval whose upper end is the test's decision boundary.

The rule (`decide`): a candidate is rejected when it is below min_accuracy, when its comparison rests on
fewer eval examples than `min_eval_examples` (1 / max_accuracy_drop by default: an eval set on which one example
weighs more than the tolerated drop cannot tell; "not enough evidence"), or when it is worse than the
baseline with evidence — p < alpha — AND by more than max_accuracy_drop (a significant but negligible drop is
tolerated). A lower accuracy that is not significant is blessed and says so: in continuous training the
candidate saw the baseline's data and more, and a gate that flips on a handful of images is noise.

Power: with m discordant examples, the smallest baseline_only count that is significant at alpha 0.05 is
5 of 5, 9 of 12, 13 of 20...; on an eval set of n examples where two good models disagree on about 4 %, a
true drop of 2 points is detected with 80 % power only from n ≈ 1,000 on (n ≈ (z_α + z_β)² · ψ / Δ²).
Smaller eval sets can only catch large regressions; the reason line states n so the reader can judge.

Pure Python (no TensorFlow): the p-values and bounds are computed here from log-space binomial sums and
checked in the tests against scipy and hand computation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TESTS = ("mcnemar", "bootstrap")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20240601
TEST_NAMES = {"mcnemar": "McNemar exact, one-sided",
              "bootstrap": f"paired bootstrap, {BOOTSTRAP_RESAMPLES} resamples, one-sided"}


@dataclass(frozen=True)
class PairedTable:
    """How candidate and baseline fared on the same examples."""

    both: int
    candidate_only: int
    baseline_only: int
    neither: int

    @property
    def examples(self) -> int:
        return self.both + self.candidate_only + self.baseline_only + self.neither

    @property
    def discordant(self) -> int:
        return self.candidate_only + self.baseline_only

    @property
    def candidate_accuracy(self) -> float:
        return (self.both + self.candidate_only) / self.examples

    @property
    def baseline_accuracy(self) -> float:
        return (self.both + self.baseline_only) / self.examples

    @property
    def difference(self) -> float:
        """acc_candidate − acc_baseline."""
        return (self.candidate_only - self.baseline_only) / self.examples


@dataclass(frozen=True)
class Comparison:
    """A test's answer: its name, the one-sided p-value of H0 'the candidate is at least as accurate', and the
    (1 − 2·alpha) interval of the accuracy difference."""

    test: str
    p_value: float
    interval: tuple[float, float]


@dataclass(frozen=True)
class Decision:
    blessed: bool
    reason: str


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact to float precision for any n)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    terms = [_log_binomial_pmf(i, n, p) for i in range(k, n + 1)]
    top = max(terms)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def _solve_increasing(function, target: float) -> float:
    """The p in [0, 1] where an increasing function of p reaches target (bisection to 1e-12)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if function(middle) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion: each bound one-sided at 1 − alpha."""
    if trials == 0:
        return 0.0, 1.0
    low = 0.0 if successes == 0 else _solve_increasing(
        lambda p: binomial_upper_tail(successes, trials, p), alpha)
    high = 1.0 if successes == trials else _solve_increasing(
        lambda p: binomial_upper_tail(successes + 1, trials, p), 1.0 - alpha)
    return low, high


def mcnemar(table: PairedTable, alpha: float) -> Comparison:
    """McNemar's exact one-sided test and its conditional Clopper-Pearson interval of the difference."""
    m = table.discordant
    if m == 0:
        return Comparison(TEST_NAMES["mcnemar"], 1.0, (0.0, 0.0))
    p_value = binomial_upper_tail(table.baseline_only, m, 0.5)
    low, high = clopper_pearson(table.baseline_only, m, alpha)
    scale = m / table.examples
    return Comparison(TEST_NAMES["mcnemar"], p_value, (scale * (1 - 2 * high), scale * (1 - 2 * low)))


def bootstrap(table: PairedTable, alpha: float, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> Comparison:
    """The paired bootstrap: whole examples resampled, so candidate and baseline stay paired."""
    n = table.examples
    cells = np.array([table.both, table.candidate_only, table.baseline_only, table.neither], dtype=float) / n
    draws = np.random.default_rng(seed).multinomial(n, cells, size=resamples)
    differences = (draws[:, 1] - draws[:, 2]) / n
    p_value = (1 + int(np.count_nonzero(differences >= 0))) / (1 + resamples)
    low, high = np.quantile(differences, [alpha, 1 - alpha])
    return Comparison(f"paired bootstrap, {resamples} resamples, one-sided", p_value, (float(low), float(high)))


def compare(table: PairedTable, test: str, alpha: float) -> Comparison:
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r} (use {', '.join(TESTS)})")
    if table.examples == 0:
        raise ValueError("no eval examples to compare the models on")
    return mcnemar(table, alpha) if test == "mcnemar" else bootstrap(table, alpha)


def accuracy_interval(correct: int, examples: int, alpha: float) -> tuple[float, float]:
    """The candidate's accuracy, as a Clopper-Pearson interval at the same level as the comparison."""
    return clopper_pearson(correct, examples, alpha)


def _points(value: float) -> str:
    return f"{value * 100:+.1f}"


def required_eval_examples(max_accuracy_drop: float, min_eval_examples: int | None) -> int:
    """The fewest eval examples a comparison may rest on: as set, else 1 / max_accuracy_drop, so that one example
    weighs no more than the tolerated drop (on 60 examples one is 1.7 points, more than a 1-point tolerance)."""
    if min_eval_examples is not None:
        return min_eval_examples
    return math.ceil(round(1 / max_accuracy_drop, 9)) if max_accuracy_drop > 0 else 0


def decide(table: PairedTable, comparison: Comparison | None, *, min_accuracy: float, max_accuracy_drop: float,
           alpha: float, baseline: str = "the baseline", min_eval_examples: int = 0) -> Decision:
    """The blessing and its one-line reason. `comparison` is None when there is no baseline; with one, an eval
    set of fewer than `min_eval_examples` is not evidence either way, and the candidate is not blessed."""
    n = table.examples
    accuracy = table.candidate_accuracy
    low, high = accuracy_interval(table.both + table.candidate_only, n, alpha)
    level = f"{(1 - 2 * alpha) * 100:g}%"
    measured = f"accuracy {accuracy:.4f} on {n} eval examples ({level} interval {low:.4f}-{high:.4f})"
    if accuracy < min_accuracy:
        return Decision(False, f"{measured} is below min_accuracy {min_accuracy:g}")
    if comparison is None:
        return Decision(True, f"{measured} reaches min_accuracy {min_accuracy:g}; no baseline to compare with")
    versus = (f"{accuracy:.4f} vs {table.baseline_accuracy:.4f} for {baseline} on the same {n} examples "
              f"({_points(table.difference)} points, {level} interval {_points(comparison.interval[0])} to "
              f"{_points(comparison.interval[1])}; {comparison.test} p={comparison.p_value:.3g}")
    if n < min_eval_examples:
        return Decision(False, f"not enough evidence: {n} eval examples, fewer than the {min_eval_examples} a "
                               f"comparison needs (one example is {100 / n:.1f} points, max_accuracy_drop "
                               f"{max_accuracy_drop:g}); widen data.window_spans or set evaluator.golden_span: "
                               f"{versus})")
    significant = comparison.p_value < alpha
    drop = -table.difference
    if significant and drop > max_accuracy_drop:
        return Decision(False, f"significantly worse: {versus} < alpha {alpha:g})")
    if significant:
        return Decision(True, f"worse, but within max_accuracy_drop {max_accuracy_drop:g}: {versus} < alpha {alpha:g})")
    if drop > 0:
        return Decision(True, f"no evidence it is worse: {versus} >= alpha {alpha:g})")
    return Decision(True, f"not worse: {versus})")
