"""Uncertainty of quality figures and the rule that decides "equal quality".

Every quality figure of a method is compared with the baseline's on the *same prompts and seeds*, so the natural
unit of resampling is the prompt: a paired bootstrap draws prompts with replacement and recomputes the method's and
the baseline's figures on the same draw. A draw is stored as multiplicities ``counts`` (R, N) (how often each prompt
was drawn), which turns every statistic into a few matrix products over all R draws at once.

"Equal quality" is a non-inferiority test, not a point comparison: a method is at equal quality when, for every
metric, the 95 % confidence interval of its difference to the baseline lies above ``-margin`` (higher-is-better
metrics) or below ``+margin`` (distances). All metrics must pass (an intersection-union test, which needs no
correction for the number of metrics). The margins are `MARGINS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Margin:
    """How much worse than the baseline a metric may be at equal quality.

    Attributes:
        metric: the metric's name (a column of `benchmarks.reference.quality.SetScores.summary`).
        margin: the allowed loss, in the metric's units.
        higher_is_better: adherence and detail (True) or a distance to the data (False).
    """

    metric: str
    margin: float
    higher_is_better: bool = True

    def passes(self, difference: Interval) -> bool:
        """Whether the interval of (method - baseline) rules out a loss larger than the margin."""
        if self.higher_is_better:
            return difference.low >= -self.margin
        return difference.high <= self.margin

    def worse(self, difference: Interval) -> bool:
        """Whether the whole interval of (method - baseline) lies past the margin: a loss larger than it is shown."""
        if self.higher_is_better:
            return difference.high < -self.margin
        return difference.low > self.margin

    def prompts_to_pass(self, difference: Interval, prompts: int) -> float:
        """About how many prompts would make a failing interval pass if its estimate held and its width shrank as
        ``1 / sqrt(prompts)``; inf when the estimate itself lies past the margin."""
        if self.higher_is_better:
            room, half = difference.estimate + self.margin, difference.estimate - difference.low
        else:
            room, half = self.margin - difference.estimate, difference.high - difference.estimate
        if room <= 0:
            return float("inf")
        return float(np.ceil(prompts * (half / room) ** 2)) if half > room else float(prompts)


def bootstrap_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(R, N) float64 multiplicities of N prompts in R bootstrap draws (each row sums to N); fixed by `seed`."""
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 prompts, got {n}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def percentile_interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """The percentile interval of bootstrap replicates around a point estimate."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def normal_interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """``estimate +- z * sd(replicates)``: for a biased statistic (FID), whose resampled values are shifted (a draw
    with repeated prompts has fewer distinct images), so that percentiles would not bracket the estimate."""
    from scipy.stats import norm

    half = norm.ppf(0.5 + level / 2) * float(np.std(replicates, ddof=1))
    return Interval(float(estimate), float(estimate) - half, float(estimate) + half)


def mean_interval(values: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> Interval:
    """Mean of per-prompt values (N,) and its bootstrap interval; NaN values (a metric a prompt does not have, e.g.
    a relation in a one-object caption) are left out of the mean and of every draw's."""
    values = np.asarray(values, np.float64)
    present = ~np.isnan(values)
    if not present.any():
        raise ValueError("values: every entry is NaN, no mean to take")
    drawn = counts @ present
    replicates = (counts @ np.where(present, values, 0.0)) / np.where(drawn > 0, drawn, np.nan)
    return percentile_interval(values[present].mean(), replicates[~np.isnan(replicates)], level)


def paired_mean_difference(method: np.ndarray, baseline: np.ndarray, counts: np.ndarray,
                           level: float = LEVEL) -> Interval:
    """mean(method) - mean(baseline) of per-prompt values (N,) on the same prompts, and its paired interval."""
    method, baseline = np.asarray(method, np.float64), np.asarray(baseline, np.float64)
    if method.shape != baseline.shape:
        raise ValueError(f"method and baseline need one value per prompt each, got {method.shape} and {baseline.shape}")
    return mean_interval(method - baseline, counts, level)


def paired_statistic_difference(statistic: Callable[[np.ndarray], np.ndarray], method: object, baseline: object,
                                counts: np.ndarray, level: float = LEVEL) -> Interval:
    """statistic(method) - statistic(baseline) for a statistic of a whole set, and its paired interval.

    Args:
        statistic: ``(data, weights (R, N)) -> (R,)``, the statistic of a set under prompt multiplicities; called
            with all-ones weights for the point estimate.
    """
    ones = np.ones((1, counts.shape[1]))
    estimate = float(statistic(method, ones)[0] - statistic(baseline, ones)[0])
    return percentile_interval(estimate, statistic(method, counts) - statistic(baseline, counts), level)


# -- the equal-quality rule ------------------------------------------------------------------------------------------
# The margins, in the units of `benchmarks.reference.quality.QualityScorer.summary`:
# - adherence (mean over the attributes): 2 points;
# - each attribute's accuracy: 5 points (a lost attribute cannot hide in the mean);
# - detail: 2 points, about what a Gaussian blur of sigma 0.45 px takes from the data's renders (0.4 px: -1.4,
#   0.5 px: -6.4), below what the eye sees at 64 px;
# - KID: 20 % of the baseline's own KID to the data; KID is a squared distance, so this allows a distance about
#   10 % larger (1.1^2 = 1.21), the bound practitioners put on FID.
ADHERENCE_MARGIN, ATTRIBUTE_MARGIN, DETAIL_MARGIN, KID_RELATIVE_MARGIN = 2.0, 5.0, 2.0, 0.2


def margins(attributes: tuple[str, ...], baseline_kid: float) -> list[Margin]:
    """The non-inferiority margins of the metrics a quality comparison reports, given the baseline's KID."""
    return [
        Margin("adherence", ADHERENCE_MARGIN),
        *(Margin(f"adherence_{a}", ATTRIBUTE_MARGIN) for a in attributes),
        Margin("detail", DETAIL_MARGIN),
        Margin("kid", KID_RELATIVE_MARGIN * max(baseline_kid, 0.0), higher_is_better=False),
    ]


VERDICTS = ("equal", "worse", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    """The three-way verdict of a comparison with the baseline.

    Attributes:
        verdict: "equal" (every metric's interval within its margin: non-inferiority shown), "worse" (some metric's
            interval wholly past its margin: a loss shown), "inconclusive" (neither: the prompts cannot tell).
        failed: the metrics whose interval is not within its margin.
        worse: the metrics whose interval lies wholly past it.
        prompts_needed: for "inconclusive", about how many prompts would show equality if the estimates held (inf:
            an estimate lies past its margin, so more prompts would more likely show a loss); else NaN.
    """

    verdict: str
    failed: tuple[str, ...]
    worse: tuple[str, ...]
    prompts_needed: float


def verdict(differences: dict[str, Interval], rules: list[Margin], prompts: int) -> Verdict:
    """The `Verdict` of the intervals of method - baseline measured on `prompts` prompts."""
    equal, failed = equal_quality(differences, rules)
    worse = tuple(m.metric for m in rules if m.worse(differences[m.metric]))
    if equal:
        return Verdict("equal", (), (), float("nan"))
    if worse:
        return Verdict("worse", tuple(failed), worse, float("nan"))
    needed = max(m.prompts_to_pass(differences[m.metric], prompts) for m in rules if m.metric in failed)
    return Verdict("inconclusive", tuple(failed), (), needed)


def equal_quality(differences: dict[str, Interval], rules: list[Margin]) -> tuple[bool, list[str]]:
    """(every metric within its margin, the metrics that are not) for the intervals of method - baseline."""
    missing = [m.metric for m in rules if m.metric not in differences]
    if missing:
        raise ValueError(f"no interval for metric(s) {missing}; got {sorted(differences)}")
    failed = [m.metric for m in rules if not m.passes(differences[m.metric])]
    return not failed, failed
