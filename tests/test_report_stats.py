"""Report statistics (parlm.report.stats, through scipy) against independent computations:
hand-worked values, published worked examples and numeric integration of the Student t density
written out here (never against scipy or parlm.report itself)."""
from __future__ import annotations

import math

import pytest

from parlm.report import stats as report


def simpson(f, lo: float, hi: float, intervals: int = 20_000) -> float:
    """Composite Simpson rule (an independent integrator for the checks below)."""
    h = (hi - lo) / intervals
    total = f(lo) + f(hi)
    for i in range(1, intervals):
        total += (4 if i % 2 else 2) * f(lo + i * h)
    return total * h / 3


def student_t_density(x: float, df: float) -> float:
    """Student's t probability density from its textbook formula."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def two_sided_by_integration(t: float, df: float) -> float:
    """P(|T| > |t|) = 1 - 2 * integral_0^|t| density."""
    return 1.0 - 2.0 * simpson(lambda x: student_t_density(x, df), 0.0, abs(t))


def t_quantile_by_integration(probability: float, df: float) -> float:
    """The t_df quantile q with P(T <= q) = probability (> 1/2), by bisection in [0, 20] on the integrated
    density (P(T <= q) = 1/2 + integral_0^q density)."""
    lo, hi = 0.0, 20.0
    for _ in range(32):
        middle = (lo + hi) / 2
        if 0.5 + simpson(lambda x: student_t_density(x, df), 0.0, middle, 1_000) < probability:
            lo = middle
        else:
            hi = middle
    return (lo + hi) / 2


def test_mean_and_sample_std_hand_worked():
    # [1, 2, 3, 4]: mean 2.5; squared deviations 2.25+0.25+0.25+2.25 = 5; 5/3 -> sqrt.
    assert report.mean([1, 2, 3, 4]) == 2.5
    assert report.sample_std([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert math.isnan(report.sample_std([1.0]))


def test_std_of_pr1858_seeds_matches_published_figure():
    # SPEC 7: TTT 1.08061893 / 1.08103354 / 1.08135172 -> mean 1.08100 (std 0.00037).
    values = [1.08061893, 1.08103354, 1.08135172]
    assert report.mean(values) == pytest.approx(1.08100, abs=5e-6)
    assert report.sample_std(values) == pytest.approx(0.00037, abs=5e-6)


def test_welch_hand_worked_example():
    # a = [1, 2, 3]: mean 2, var 1; b = [4, 6, 8]: mean 6, var 4.
    # se^2 = 1/3 + 4/3 = 5/3; t = -4 / sqrt(5/3); df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17;
    # 95% interval -4 -+ t_{50/17, 0.975} sqrt(5/3).
    result = report.welch_interval([1, 2, 3], [4, 6, 8])
    assert result.mean_a == 2 and result.mean_b == 6
    assert result.difference == -4
    assert result.t == pytest.approx(-4 / math.sqrt(5 / 3), rel=1e-12)
    assert result.df == pytest.approx(50 / 17, rel=1e-12)
    expected_p = two_sided_by_integration(result.t, 50 / 17)
    assert result.p_two_sided == pytest.approx(expected_p, abs=1e-8)
    assert result.p_less == pytest.approx(expected_p / 2, abs=1e-8)
    assert result.p_greater == pytest.approx(1 - expected_p / 2, abs=1e-8)
    half_width = t_quantile_by_integration(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert result.low == pytest.approx(-4 - half_width, abs=1e-6)
    assert result.high == pytest.approx(-4 + half_width, abs=1e-6)
    assert result.confidence == 0.95 and not result.excludes_zero
    narrower = report.welch_interval([1, 2, 3], [4, 6, 8], confidence=0.80)
    half_80 = t_quantile_by_integration(0.90, 50 / 17) * math.sqrt(5 / 3)
    assert narrower.high - narrower.low == pytest.approx(2 * half_80, abs=1e-6)
    assert narrower.excludes_zero  # 80%: -4 +- 2.6 stays below zero


def test_welch_interval_of_the_published_sleep_example():
    # R's documented `t.test(extra ~ group, data = sleep)` (Student's sleep data, Welch):
    # t = -1.8608, df = 17.776, p-value = 0.07939, 95 percent CI -3.3654832 0.2054832.
    group1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    group2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    result = report.welch_interval(group1, group2)
    assert round(result.t, 4) == -1.8608
    assert round(result.df, 3) == 17.776
    assert round(result.p_two_sided, 5) == 0.07939
    assert round(result.low, 7) == -3.3654832 and round(result.high, 7) == 0.2054832
    assert result.difference == pytest.approx(0.75 - 2.33)


def test_welch_textbook_examples():
    # Wikipedia, "Welch's t-test", worked examples (published: t, df, p rounded as printed).
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    first = report.welch_t_test(a1, a2)
    assert round(first.t, 2) == -2.46
    assert round(first.df, 1) == 25.0
    assert round(first.p_two_sided, 3) == 0.021
    b1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
    b2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5,
          23.6, 21.5, 22.5, 23.5, 21.5, 21.8]
    second = report.welch_t_test(b1, b2)
    assert round(second.t, 2) == -1.57
    assert round(second.df, 1) == 9.9
    assert round(second.p_two_sided, 3) == 0.149


def test_welch_is_antisymmetric_and_handles_degenerate_samples():
    forward = report.welch_t_test([1.0, 1.2, 0.9], [1.5, 1.7, 1.6, 1.4])
    backward = report.welch_t_test([1.5, 1.7, 1.6, 1.4], [1.0, 1.2, 0.9])
    assert forward.t == pytest.approx(-backward.t)
    assert forward.p_two_sided == pytest.approx(backward.p_two_sided)
    assert forward.p_less == pytest.approx(backward.p_greater)
    same = report.welch_t_test([2.0, 2.0], [2.0, 2.0])
    assert same.t == 0 and same.p_two_sided == 1.0
    apart = report.welch_t_test([1.0, 1.0], [2.0, 2.0])
    assert apart.t == -math.inf and apart.p_two_sided == 0.0
    assert apart.p_less == 0.0 and apart.p_greater == 1.0  # one-sided p of "a lower than b"
    assert apart.low == apart.high == -1.0
    with pytest.raises(ValueError, match="at least two"):
        report.welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        report.welch_interval([1.0, 2.0], [1.0, 2.0], confidence=95)


def test_paired_interval_of_the_published_sleep_example():
    # R's documented `t.test(extra ~ group, data = sleep, paired = TRUE)`: t = -4.0621, df = 9,
    # p-value = 0.002833, 95 percent CI -2.4598858 -0.7001142, mean difference -1.58.
    group1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    group2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    result = report.paired_interval(group1, group2)
    assert result.mean == pytest.approx(-1.58, abs=1e-12) and result.n == 10 and result.df == 9
    assert round(result.t, 4) == -4.0621
    assert round(result.p_two_sided, 6) == 0.002833
    assert round(result.low, 7) == -2.4598858 and round(result.high, 7) == -0.7001142
    assert result.excludes_zero


def test_paired_interval_matches_scipy_and_the_integrated_t_quantile():
    from scipy import stats

    a, b = [1.0712, 1.0698, 1.0731], [1.0745, 1.0721, 1.0770]
    result = report.paired_interval(a, b, confidence=0.90)
    reference = stats.ttest_rel(a, b)
    interval = reference.confidence_interval(confidence_level=0.90)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_two_sided == pytest.approx(reference.pvalue, rel=1e-12)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high), rel=1e-12)
    differences = [x - y for x, y in zip(a, b)]
    half = t_quantile_by_integration(0.95, 2) * report.sample_std(differences) / math.sqrt(3)
    assert result.high - result.low == pytest.approx(2 * half, rel=1e-6)
    assert result.mean == pytest.approx(sum(differences) / 3, rel=1e-12)


def test_mean_interval_degenerate_and_bad_input():
    point = report.mean_interval([0.002, 0.002, 0.002])
    assert point.low == point.high == pytest.approx(0.002) and point.t == math.inf and point.p_two_sided == 0.0
    zero = report.mean_interval([0.0, 0.0])
    assert zero.t == 0.0 and zero.p_two_sided == 1.0 and not zero.excludes_zero
    with pytest.raises(ValueError, match="at least two"):
        report.mean_interval([1.0])
    with pytest.raises(ValueError, match="same length"):
        report.paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        report.mean_interval([1.0, 2.0], confidence=1.5)
