"""Statistics of the multi-seed report and of ablations: sample moments and Welch's t-test with
the confidence interval of the difference of means, through `scipy.stats`.

`welch_interval(a, b, confidence=0.95)` is the one entry point a comparison of independent
samples needs (the report's TTT BPB against a baseline, an ablation variant against its base):
the difference of means, its Welch interval and the p-values, as a `WelchResult`. Paired samples
(two variants trained on the same seeds) use `paired_interval(a, b)`: the Student t interval of
the mean per-pair difference (`mean_interval` of a_i - b_i), as a `MeanInterval`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean sum(x)/n."""
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation sqrt(sum((x - mean)^2) / (n - 1)) (ddof=1, as the PR reports);
    nan for fewer than two values."""
    values = list(values)
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((x - m) ** 2 for x in values) / (len(values) - 1))


class IntervalResult:
    """What every interval result (a dataclass with fields `low` and `high`) offers: its fields
    as a dict, and whether [low, high] lies entirely on one side of 0 (the effect is beyond
    noise at this confidence)."""

    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


@dataclass
class WelchResult(IntervalResult):
    """Welch's unequal-variance comparison of mean(a) - mean(b).

    se = sqrt(var_a/n_a + var_b/n_b), var = sample variance (ddof=1); t = difference / se;
    df = se^4 / ((var_a/n_a)^2/(n_a-1) + (var_b/n_b)^2/(n_b-1)) (Welch-Satterthwaite);
    interval: difference -+ t_{df, (1+confidence)/2} * se, i.e. [low, high];
    p_two_sided = P(|T_df| >= |t|); p_less = P(T_df <= t) tests mean_a < mean_b (a lower BPB
    than the baseline); p_greater = P(T_df >= t)."""

    mean_a: float
    mean_b: float
    std_a: float
    std_b: float
    n_a: int
    n_b: int
    difference: float
    low: float
    high: float
    confidence: float
    t: float
    df: float
    p_two_sided: float
    p_less: float
    p_greater: float


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> WelchResult:
    """Difference of means mean(a) - mean(b) with its Welch interval and p-values (WelchResult),
    from `scipy.stats.ttest_ind(a, b, equal_var=False)` and its `confidence_interval`.

    Each sample needs at least two values. Two samples with zero variance give t = +-inf, p = 0
    and the point interval [difference, difference] when the means differ, t = 0 and p = 1 when
    they are equal (scipy answers nan there)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs at least two values per sample, got {len(a)} and "
                         f"{len(b)}; run more seeds (--seeds 42 314 999)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    mean_a, mean_b, std_a, std_b = mean(a), mean(b), sample_std(a), sample_std(b)
    difference = mean_a - mean_b
    moments = dict(mean_a=mean_a, mean_b=mean_b, std_a=std_a, std_b=std_b, n_a=len(a), n_b=len(b),
                   difference=difference, confidence=confidence)
    if std_a == 0.0 and std_b == 0.0:
        equal = difference == 0.0
        return WelchResult(**moments, low=difference, high=difference,
                           t=0.0 if equal else math.copysign(math.inf, difference),
                           df=float(len(a) + len(b) - 2), p_two_sided=1.0 if equal else 0.0,
                           p_less=(0.5 if equal else float(difference > 0)),
                           p_greater=(0.5 if equal else float(difference < 0)))
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        # Identical values in one sample: its variance is exactly 0 and Welch's formula holds.
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        return _scipy_welch(a, b, confidence, moments, stats)


def _scipy_welch(a, b, confidence, moments, stats) -> WelchResult:
    two_sided = stats.ttest_ind(a, b, equal_var=False)
    interval = two_sided.confidence_interval(confidence_level=confidence)
    return WelchResult(**moments, low=float(interval.low), high=float(interval.high),
                       t=float(two_sided.statistic), df=float(two_sided.df),
                       p_two_sided=float(two_sided.pvalue),
                       p_less=float(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue),
                       p_greater=float(stats.ttest_ind(a, b, equal_var=False,
                                                       alternative="greater").pvalue))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """`welch_interval(a, b)` at 95% confidence (the report's TTT BPB test)."""
    return welch_interval(a, b, 0.95)


@dataclass
class MeanInterval(IntervalResult):
    """Student t interval of a mean (one sample, or the differences of paired samples).

    se = s / sqrt(n), s = sample standard deviation (ddof=1); t = mean / se (against 0);
    df = n - 1; interval: mean -+ t_{df, (1+confidence)/2} * se, i.e. [low, high];
    p_two_sided = P(|T_df| >= |t|)."""

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float
    t: float
    df: float
    p_two_sided: float


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """The mean of `values` with its Student t interval and the t-test against 0
    (`scipy.stats.ttest_1samp(values, 0)` and its `confidence_interval`). At least two values;
    zero spread gives the point interval [mean, mean] and t = +-inf, p = 0 (t = 0, p = 1 when
    the mean is 0), where scipy answers nan."""
    values = [float(x) for x in values]
    if len(values) < 2:
        raise ValueError(f"a t interval needs at least two values, got {len(values)}; run more seeds")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    center, spread = mean(values), sample_std(values)
    moments = dict(mean=center, std=spread, n=len(values), confidence=confidence, df=float(len(values) - 1))
    if spread == 0.0:
        zero = center == 0.0
        return MeanInterval(**moments, low=center, high=center, t=0.0 if zero else math.copysign(math.inf, center),
                            p_two_sided=1.0 if zero else 0.0)
    from scipy import stats

    test = stats.ttest_1samp(values, 0.0)
    interval = test.confidence_interval(confidence_level=confidence)
    return MeanInterval(**moments, low=float(interval.low), high=float(interval.high),
                        t=float(test.statistic), p_two_sided=float(test.pvalue))


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """`mean_interval` of the per-pair differences a_i - b_i (the paired t interval: pairs share
    a seed, so the seed's own noise cancels). `a` and `b` must have the same length."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired samples need the same length, got {len(a)} and {len(b)}")
    return mean_interval([float(x) - float(y) for x, y in zip(a, b)], confidence)
