"""Report statistics against independent computations: hand-worked values, published textbook
figures and numeric integration (never against parlm.report itself)."""
from __future__ import annotations

import math

import pytest

from parlm.report import summary as report


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


@pytest.mark.parametrize("a,b", [(1, 1), (3, 1), (1, 4), (2, 3), (5, 7)])
@pytest.mark.parametrize("x", [0.05, 0.3, 0.5, 0.77, 0.99])
def test_incomplete_beta_integer_parameters_equal_binomial_tail(a, b, x):
    # For integers, I_x(a, b) = P(Binomial(a + b - 1, x) >= a).
    n = a + b - 1
    expected = sum(math.comb(n, j) * x ** j * (1 - x) ** (n - j) for j in range(a, n + 1))
    assert report.regularized_incomplete_beta(x, a, b) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("a,b,x", [(1.5, 2.5, 0.4), (3.3, 1.7, 0.9), (2.0, 0.5, 0.6), (10.5, 20.0, 0.25)])
def test_incomplete_beta_against_numeric_integration(a, b, x):
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    integral = simpson(lambda t: t ** (a - 1) * (1 - t) ** (b - 1), 0.0, x, 40_000) / beta
    assert report.regularized_incomplete_beta(x, a, b) == pytest.approx(integral, rel=1e-6)


def test_incomplete_beta_symmetry_and_ends():
    for a, b, x in [(0.5, 0.5, 0.3), (4.2, 1.1, 0.8), (2.0, 9.0, 0.1)]:
        total = report.regularized_incomplete_beta(x, a, b) + report.regularized_incomplete_beta(1 - x, b, a)
        assert total == pytest.approx(1.0, abs=1e-13)
    # I_x(1/2, 1/2) = (2/pi) asin(sqrt(x)) (the arcsine distribution).
    assert report.regularized_incomplete_beta(0.3, 0.5, 0.5) == pytest.approx(
        2 / math.pi * math.asin(math.sqrt(0.3)), rel=1e-12)
    assert report.regularized_incomplete_beta(0.0, 2, 3) == 0.0
    assert report.regularized_incomplete_beta(1.0, 2, 3) == 1.0
    with pytest.raises(ValueError):
        report.regularized_incomplete_beta(1.5, 2, 3)


@pytest.mark.parametrize("df,t_critical", [(1, 12.706), (5, 2.571), (10, 2.228), (30, 2.042)])
def test_student_t_table_critical_values(df, t_critical):
    # Printed t tables: these are the two-sided 5% critical values (3 decimals).
    p = 2 * report.student_t_sf(t_critical, df)
    assert p == pytest.approx(0.05, abs=2e-4)


@pytest.mark.parametrize("t,df", [(0.4, 7.3), (1.3, 2.5), (2.0, 1.0), (3.0984, 50 / 17), (-2.2, 12.0)])
def test_student_t_against_numeric_integration(t, df):
    p_two_sided = 2 * report.student_t_sf(abs(t), df)
    assert p_two_sided == pytest.approx(two_sided_by_integration(t, df), abs=1e-8)
    # The upper tail of a negative t is above one half and the two tails add to one.
    assert report.student_t_sf(t, df) + report.student_t_sf(-t, df) == pytest.approx(1.0, abs=1e-14)


def test_welch_hand_worked_example():
    # a = [1, 2, 3]: mean 2, var 1; b = [4, 6, 8]: mean 6, var 4.
    # se^2 = 1/3 + 4/3 = 5/3; t = -4 / sqrt(5/3); df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17.
    result = report.welch_t_test([1, 2, 3], [4, 6, 8])
    assert result.mean_a == 2 and result.mean_b == 6
    assert result.difference == -4
    assert result.t == pytest.approx(-4 / math.sqrt(5 / 3), rel=1e-14)
    assert result.df == pytest.approx(50 / 17, rel=1e-14)
    expected_p = two_sided_by_integration(result.t, 50 / 17)
    assert result.p_two_sided == pytest.approx(expected_p, abs=1e-8)
    assert result.p_less == pytest.approx(expected_p / 2, abs=1e-8)
    assert result.p_greater == pytest.approx(1 - expected_p / 2, abs=1e-8)


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
    with pytest.raises(ValueError, match="at least two"):
        report.welch_t_test([1.0], [1.0, 2.0])
