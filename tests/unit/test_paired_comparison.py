"""The Evaluator's statistics: known 2x2 tables against p-values and bounds computed by hand and by scipy
(never by the code under test), the test/interval duality, and the blessing rule."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
from scipy import stats

from conveyor_ml.components.evaluator import comparison
from conveyor_ml.components.evaluator.comparison import PairedTable


def exact_upper_tail(k: int, n: int) -> float:
    """P(X >= k), X ~ Binomial(n, 1/2), in exact rational arithmetic."""
    return float(Fraction(sum(math.comb(n, i) for i in range(k, n + 1)), 2 ** n))


@pytest.mark.parametrize("candidate_only, baseline_only, expected", [
    (0, 6, 1 / 64),          # every discordant example favours the baseline: 0.5^6
    (2, 8, 56 / 1024),       # (C(10,8) + C(10,9) + C(10,10)) / 2^10
    (1, 1, 3 / 4),           # P(X >= 1), X ~ Bin(2, 1/2)
    (5, 0, 1.0),             # the candidate wins every disagreement: no evidence at all of harm
])
def test_mcnemar_exact_p_values_by_hand(candidate_only, baseline_only, expected):
    table = PairedTable(both=100, candidate_only=candidate_only, baseline_only=baseline_only, neither=3)
    assert comparison.mcnemar(table, 0.05).p_value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("candidate_only, baseline_only", [(3, 9), (17, 31), (0, 1), (40, 40), (600, 700)])
def test_mcnemar_p_values_match_scipy(candidate_only, baseline_only):
    table = PairedTable(both=2000, candidate_only=candidate_only, baseline_only=baseline_only, neither=50)
    expected = stats.binomtest(baseline_only, candidate_only + baseline_only, 0.5, alternative="greater").pvalue
    assert comparison.mcnemar(table, 0.05).p_value == pytest.approx(expected, rel=1e-9)


def test_binomial_tail_is_exact_where_integers_would_overflow_floats():
    # C(1500, 800) is about 10^449: a direct float sum overflows, the log-space sum does not.
    assert comparison.binomial_upper_tail(800, 1500, 0.5) == pytest.approx(stats.binom.sf(799, 1500, 0.5), rel=1e-9)
    assert comparison.binomial_upper_tail(5, 12, 0.5) == pytest.approx(exact_upper_tail(5, 12), rel=1e-12)


@pytest.mark.parametrize("successes, trials", [(0, 10), (3, 10), (10, 10), (7, 60), (290, 300)])
def test_clopper_pearson_matches_scipy(successes, trials):
    expected = stats.binomtest(successes, trials).proportion_ci(confidence_level=0.90, method="exact")
    low, high = comparison.clopper_pearson(successes, trials, 0.05)
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_clopper_pearson_bounds_by_hand():
    # All n successes: P(X >= n | p) = p^n = alpha, so the lower bound is alpha^(1/n); none: 1 - alpha^(1/n).
    assert comparison.clopper_pearson(5, 5, 0.05)[0] == pytest.approx(0.05 ** (1 / 5), abs=1e-10)
    assert comparison.clopper_pearson(0, 5, 0.05)[1] == pytest.approx(1 - 0.05 ** (1 / 5), abs=1e-10)


@pytest.mark.parametrize("candidate_only", range(0, 8))
@pytest.mark.parametrize("baseline_only", range(0, 14))
def test_the_interval_excludes_zero_exactly_when_the_test_rejects(candidate_only, baseline_only):
    table = PairedTable(both=300, candidate_only=candidate_only, baseline_only=baseline_only, neither=10)
    result = comparison.mcnemar(table, 0.05)
    if table.discordant:
        assert (result.p_value < 0.05) == (result.interval[1] < 0)
    assert result.interval[0] <= table.difference <= result.interval[1]


def test_the_difference_interval_is_the_discordant_interval_scaled_by_their_share():
    table = PairedTable(both=180, candidate_only=4, baseline_only=12, neither=4)   # n = 200, m = 16
    expected = stats.binomtest(12, 16).proportion_ci(confidence_level=0.90, method="exact")
    low, high = comparison.mcnemar(table, 0.05).interval
    assert low == pytest.approx(16 / 200 * (1 - 2 * expected.high), abs=1e-9)
    assert high == pytest.approx(16 / 200 * (1 - 2 * expected.low), abs=1e-9)


def test_bootstrap_agrees_with_the_normal_approximation_on_a_large_table():
    table = PairedTable(both=1800, candidate_only=40, baseline_only=75, neither=85)   # n = 2000
    n, d = table.examples, table.difference
    standard_error = math.sqrt((table.discordant / n - d ** 2) / n)
    z = stats.norm.ppf(0.95)
    result = comparison.bootstrap(table, 0.05)
    assert result.interval == pytest.approx((d - z * standard_error, d + z * standard_error), abs=0.002)
    assert result.p_value == pytest.approx(stats.norm.cdf(d / standard_error), abs=0.002)
    assert comparison.bootstrap(table, 0.05) == result   # a fixed seed: the same answer every time


def test_accuracies_and_difference_of_a_table():
    table = PairedTable(both=50, candidate_only=3, baseline_only=1, neither=6)
    assert (table.examples, table.discordant) == (60, 4)
    assert table.candidate_accuracy == pytest.approx(53 / 60)
    assert table.baseline_accuracy == pytest.approx(51 / 60)
    assert table.difference == pytest.approx(2 / 60)


def decide(table, test="mcnemar", **rule):
    rule = {"min_accuracy": 0.9, "max_accuracy_drop": 0.01, "alpha": 0.05, **rule}
    return comparison.decide(table, comparison.compare(table, test, rule["alpha"]), baseline="model #7", **rule)


def test_one_image_on_sixty_is_not_evidence_of_a_regression():
    # The case: 0.9333 against 0.95 on 60 images, one image apart, used to be rejected.
    table = PairedTable(both=55, candidate_only=1, baseline_only=2, neither=2)
    decision = decide(table)
    assert decision.blessed
    assert decision.reason.startswith("no evidence it is worse: 0.9333 vs 0.9500 for model #7 on the same 60")
    assert "p=0.5 >= alpha 0.05" in decision.reason


@pytest.mark.parametrize("test", comparison.TESTS)
def test_a_significant_regression_larger_than_the_tolerance_is_rejected(test):
    table = PairedTable(both=330, candidate_only=1, baseline_only=15, neither=14)   # -4.2 points on 360
    decision = decide(table, test)
    assert not decision.blessed
    assert decision.reason.startswith("significantly worse: 0.9194 vs 0.9583 for model #7 on the same 360 examples")


def test_a_significant_but_negligible_drop_is_within_max_accuracy_drop():
    # 10,000 examples: 0.3 points worse is significant (p < 0.001) but below the 1-point tolerance.
    table = PairedTable(both=9500, candidate_only=10, baseline_only=40, neither=450)
    decision = decide(table)
    assert decision.blessed and decision.reason.startswith("worse, but within max_accuracy_drop 0.01")
    assert not decide(table, max_accuracy_drop=0.001).blessed


def test_min_accuracy_is_checked_first_and_reports_its_interval():
    table = PairedTable(both=80, candidate_only=5, baseline_only=0, neither=15)   # 0.85, better than the baseline
    decision = decide(table)
    assert not decision.blessed
    low, high = (stats.binomtest(85, 100).proportion_ci(confidence_level=0.9, method="exact"))
    assert decision.reason == (f"accuracy 0.8500 on 100 eval examples (90% interval {low:.4f}-{high:.4f}) "
                               "is below min_accuracy 0.9")


def test_without_a_baseline_only_min_accuracy_decides():
    table = PairedTable(both=0, candidate_only=57, baseline_only=0, neither=3)
    decision = comparison.decide(table, None, min_accuracy=0.9, max_accuracy_drop=0.01, alpha=0.05)
    assert decision.blessed and decision.reason.endswith("reaches min_accuracy 0.9; no baseline to compare with")


def test_unknown_test_and_empty_eval_sets_are_refused():
    with pytest.raises(ValueError, match="unknown test 'ttest'"):
        comparison.compare(PairedTable(1, 0, 0, 0), "ttest", 0.05)
    with pytest.raises(ValueError, match="no eval examples"):
        comparison.compare(PairedTable(0, 0, 0, 0), "mcnemar", 0.05)


@pytest.mark.parametrize("max_accuracy_drop, configured, expected", [
    (0.01, None, 100),   # one example may weigh at most one point
    (0.02, None, 50),
    (0.003, None, 334),
    (0.0, None, 0),      # no tolerance: the test alone decides
    (0.01, 30, 30),      # as configured
])
def test_the_eval_set_a_comparison_needs_follows_the_tolerance(max_accuracy_drop, configured, expected):
    assert comparison.required_eval_examples(max_accuracy_drop, configured) == expected


@pytest.mark.parametrize("table", [
    PairedTable(both=55, candidate_only=1, baseline_only=2, neither=2),   # one image worse on 60
    PairedTable(both=55, candidate_only=3, baseline_only=0, neither=2),   # three images better on 60
])
def test_a_comparison_on_too_few_examples_is_not_blessed_and_says_it_lacks_evidence(table):
    decision = decide(table, min_eval_examples=100)
    assert not decision.blessed
    assert decision.reason.startswith("not enough evidence: 60 eval examples, fewer than the 100 a comparison needs "
                                      "(one example is 1.7 points, max_accuracy_drop 0.01)")
    assert "for model #7 on the same 60 examples" in decision.reason and decision.reason.endswith(")")
    assert decide(table, min_eval_examples=60).blessed  # 60 examples are enough for whoever says so


def test_the_evidence_recorded_on_the_evaluation_names_the_test_its_p_value_and_the_eval_set():
    from conveyor_ml.base.spec import EvaluatorSettings
    from conveyor_ml.components.evaluator.executor import evidence

    table = PairedTable(both=55, candidate_only=1, baseline_only=2, neither=2)
    values = evidence(table, EvaluatorSettings(), True, 7, [1, 2])
    assert values["decision"] == "rejected" and values["reason"].startswith("not enough evidence: 60 eval examples")
    assert (values["eval_examples"], values["eval_spans"], values["min_eval_examples"]) == (60, "1,2", 100)
    assert values["comparison_test"] == "McNemar exact, one-sided"
    assert values["p_value"] == pytest.approx(stats.binomtest(2, 3, 0.5, alternative="greater").pvalue)
    assert (values["candidate_only_correct"], values["baseline_only_correct"]) == (1, 2)
    # The same table on a golden set of 60 the user accepts: no evidence it is worse, blessed.
    accepted = evidence(table, EvaluatorSettings(min_eval_examples=50), True, 7, [1])
    assert accepted["decision"] == "blessed" and accepted["reason"].startswith("no evidence it is worse")
    first = evidence(table, EvaluatorSettings(), False, None, [1])
    assert first["decision"] == "blessed" and "p_value" not in first and "min_eval_examples" not in first
