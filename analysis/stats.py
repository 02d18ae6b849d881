"""The guide's statistics: intervals that include the test set's own sampling error, paired comparisons with Holm's
correction, equivalence within a practical margin, detectable effects, Pareto fronts.

**What varies.** A group's test metric moves for two reasons: the seed (data order, head initialisation, dropout)
and the finite test set (another sample of examples from the same population would give another number). Bouthillier
et al. (2021, "Accounting for Variance in Machine Learning Benchmarks", MLSys) show that both are of the same size in
practice and that ignoring the data-sampling part makes benchmarks claim differences that do not replicate. So every
interval here has two parts, estimated from the per-example outcomes each trial stores (``predictions`` table): seeds
and test examples are two crossed random factors (every seed of every group scores the same examples), and the
variance of a mean over ``n`` seeds and ``N`` examples is estimated as

    var = s²_seed / n + s²_example / N

with ``s²_seed`` the sample variance over seeds of the per-seed metric and ``s²_example`` the sample variance over
examples of each example's contribution averaged over seeds. This is the two-way random-effects ANOVA estimate with the
interaction counted in both parts (slightly conservative). The interval uses the t quantile at n - 1 degrees of
freedom, the seed part's (see ``Estimate.df`` for why not Welch-Satterthwaite's): with 2-3 seeds it is wide, as it
should be. Proportions get two pseudo-examples of opposite outcome in the example part (as Agresti and Coull, 1998,
add to a binomial proportion), so an accuracy of 0 or 1 never gets a zero-width interval.

**Why paired.** Seed ``s`` gives every group the same data order and head initialisation, and every group is scored on
the same test examples, so A and B are compared on their per-seed and per-example *differences*: what the two share
(a hard example, a lucky seed) cancels. Perplexity is compared on its logarithm (mean nats per token; an example's
contribution is its linearised share of the ratio Σloss / Σtokens) and reported as a relative difference.

**Why not a bootstrap.** A study runs 2-5 seeds; a percentile bootstrap over 3 seeds has at most 10 distinct
resamples and covers far less than its nominal level (Agarwal et al., 2021, "Deep RL at the Edge of the Statistical
Precipice", NeurIPS, use a stratified bootstrap over *many* runs and tasks; with a handful of seeds the t interval at
n - 1 degrees of freedom is the honest small-sample choice).

**Multiplicity.** Within one task and dimension every group is compared with the group that is best on *validation*
(the test set never chooses), and the family's p-values are Holm-adjusted (Holm, 1979): the chance that a family
claims any difference that is not there stays at or below ``ALPHA``. Equivalence is a two-one-sided-tests (TOST,
Schuirmann 1987) claim that the difference lies inside ±δ, Holm-adjusted in the same family; its p-value is defined so
that, unadjusted, it is below ``ALPHA`` exactly when the 95% interval lies inside ±δ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
ALPHA = 1 - LEVEL
POWER = 0.8        # the "smallest detectable difference" is detected with this probability
MAX_SEEDS = 100    # beyond this many seeds the guide says "more than" instead of a number

# The practical margin δ within which two groups count as equivalent, per primary metric: absolute for proportions
# (0.01 = one accuracy point), relative for perplexity (0.02 = 2%). ``build_guide.py --margin metric=value`` overrides.
# An LLM judge's metrics (the guide's Judged quality section) are coarser and noisier than a test metric, so their
# margins are wider: 5 points of a 0-100 judged score, and 5 points of a pairwise win rate (a proportion).
MARGINS: dict[str, float] = {"accuracy": 0.01, "preference_accuracy": 0.01, "macro_f1": 0.01, "perplexity": 0.02,
                             "judge_score": 5.0, "win_rate": 0.05}
LOG_METRICS = frozenset({"perplexity"})  # compared on the log scale, margins and differences relative


# --------------------------------------------------------------------------------------------------------------------
# Per-example outcomes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcomes:
    """One group's per-example test outcomes: ``num[s, i] / den[s, i]`` is seed ``seeds[s]``'s outcome on example
    ``examples[i]`` (accuracy: correct / 1; perplexity: summed loss / scored tokens)."""

    seeds: tuple[int, ...]
    examples: np.ndarray   # (N,) example indices, sorted
    num: np.ndarray        # (n, N)
    den: np.ndarray        # (n, N)
    proportion: bool       # outcomes are 0/1 (accuracy-like), not losses

    def select(self, seeds: Sequence[int], examples: np.ndarray) -> Outcomes:
        rows = [self.seeds.index(s) for s in seeds]
        cols = np.searchsorted(self.examples, examples)
        return Outcomes(tuple(seeds), examples, self.num[np.ix_(rows, cols)], self.den[np.ix_(rows, cols)],
                        self.proportion)

    def per_seed(self) -> np.ndarray:
        """(n,) each seed's metric on the analysis scale: a proportion, or mean nats per token."""
        return self.num.sum(axis=1) / self.den.sum(axis=1)

    def contributions(self) -> np.ndarray:
        """(n, N) each example's linearised contribution to its seed's ratio metric (the ratio's influence function:
        its mean over examples is the metric, and its spread is the test set's sampling error)."""
        ratio = self.per_seed()[:, None]
        return ratio + (self.num - ratio * self.den) / self.den.mean(axis=1, keepdims=True)


def outcomes_from_rows(seeds: np.ndarray, examples: np.ndarray, num: np.ndarray, den: np.ndarray,
                       proportion: bool) -> Outcomes | None:
    """A group's outcomes from long rows (one per seed and example); None unless every seed scored the same
    examples (a group whose seeds saw different test sets cannot be paired)."""
    order = np.lexsort((examples, seeds))
    seeds, examples, num, den = seeds[order], examples[order], num[order], den[order]
    seed_ids = tuple(int(s) for s in np.unique(seeds))
    n = len(seed_ids)
    if n == 0 or len(examples) % n:
        return None
    grid = examples.reshape(n, -1)
    if not (grid == grid[0]).all():
        return None
    return Outcomes(seed_ids, grid[0].copy(), num.reshape(n, -1).astype(float), den.reshape(n, -1).astype(float),
                    proportion)


# --------------------------------------------------------------------------------------------------------------------
# Estimates: a mean or a paired difference, with its two variance parts
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds and ``n_examples`` test examples with the two parts of its variance."""

    value: float
    seed_var: float           # s²_seed / n (0 when unknown: see ``n``)
    example_var: float | None  # s²_example / N; None when no per-example outcomes were stored
    n: int
    n_examples: int | None

    @property
    def seed_var_per_seed(self) -> float:
        """s²_seed itself, to project other seed counts."""
        return self.seed_var * self.n

    @property
    def se(self) -> float:
        return math.sqrt(self.seed_var + (self.example_var or 0.0))

    @property
    def df(self) -> float:
        """n - 1, the seed part's degrees of freedom, for the whole two-part variance (conservative).

        Welch-Satterthwaite's larger value is right on average but not here: with 2-5 seeds the seed variance is
        often estimated far too small by chance, Satterthwaite then trusts the precisely known test-set part, and the
        interval is too narrow exactly when it matters (simulated null families with 6 groups, 2 seeds and 5,000 test
        examples claimed a winner 24% of the time). At n - 1 the test is exact for the seed part and the test-set
        part only widens it."""
        return float(self.n - 1) if self.n > 1 else float("inf")

    def quantile(self, level: float = LEVEL) -> float:
        return float(stats.t.ppf(0.5 + level / 2, self.df))

    def half(self, level: float = LEVEL) -> float:
        return self.quantile(level) * self.se

    def ci(self, level: float = LEVEL) -> tuple[float, float]:
        h = self.half(level)
        return self.value - h, self.value + h

    def p_value(self) -> float:
        """Two-sided p-value of 'the true value is 0'."""
        if self.se == 0:
            return 1.0 if self.value == 0 else 0.0
        return float(2 * stats.t.sf(abs(self.value) / self.se, self.df))

    def p_equivalent(self, margin: float) -> float:
        """TOST p-value of 'the true value lies outside ±margin', doubled so that it is below ALPHA exactly when the
        two-sided (1 - ALPHA) interval lies inside ±margin."""
        if self.se == 0:
            return 0.0 if abs(self.value) < margin else 1.0
        below = stats.t.sf((self.value + margin) / self.se, self.df)   # H0: value <= -margin
        above = stats.t.cdf((self.value - margin) / self.se, self.df)  # H0: value >= +margin
        return float(min(1.0, 2 * max(below, above)))


def _example_var(values: np.ndarray, proportion: bool, pseudo: tuple[float, float]) -> float:
    """Sample variance over examples; proportions get two pseudo-examples (Agresti-Coull) so it is never 0."""
    if proportion:
        values = np.concatenate([values, pseudo])
    return float(values.var(ddof=1)) if len(values) > 1 else 0.0


def mean_estimate(per_seed: Sequence[float], outcomes: Outcomes | None = None, log_scale: bool = False) -> Estimate:
    """A group's mean metric over seeds with both variance parts (``per_seed`` alone: the seed part only).

    ``per_seed`` is on the scale the guide shows; with ``log_scale`` (perplexity) the outcomes' example part, which is
    on the log scale, is carried over by the delta method (d perplexity = perplexity × d log perplexity)."""
    values = np.asarray(per_seed, dtype=float)
    n, mean = len(values), float(values.mean())
    seed_var = float(values.var(ddof=1)) if n > 1 else 0.0
    if outcomes is None:
        return Estimate(mean, seed_var / n, None, n, None)
    contrib = outcomes.contributions().mean(axis=0)
    big_n = len(contrib)
    ex = _example_var(contrib, outcomes.proportion, (0.0, 1.0)) / big_n * (mean * mean if log_scale else 1.0)
    return Estimate(mean, seed_var / n, ex, n, big_n)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds with its two-sided interval (``half`` is None when n < 2: no interval exists)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half


def interval(estimate: Estimate, level: float = LEVEL) -> Interval:
    """The estimate's interval; none from a single seed (its seed variance is unknown)."""
    return Interval(estimate.value, estimate.half(level) if estimate.n >= 2 else None, estimate.n)


def paired_difference(a: Outcomes, b: Outcomes) -> Estimate | None:
    """A minus B on the seeds and examples both scored (analysis scale: proportion, or log perplexity); None when
    they share no seed or no example."""
    seeds = [s for s in a.seeds if s in b.seeds]
    same = a.seeds == b.seeds and np.array_equal(a.examples, b.examples)
    examples = a.examples if same else np.intersect1d(a.examples, b.examples)
    if not seeds or not len(examples):
        return None
    if not same:
        a, b = a.select(seeds, examples), b.select(seeds, examples)
    per_seed = a.per_seed() - b.per_seed()
    n, big_n = len(seeds), len(examples)
    seed_var = float(per_seed.var(ddof=1)) if n > 1 else 0.0
    diff = (a.contributions() - b.contributions()).mean(axis=0)
    ex = _example_var(diff, a.proportion, (-1.0, 1.0)) / big_n
    return Estimate(float(per_seed.mean()), seed_var / n, ex, n, big_n)


def seed_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Estimate | None:
    """A minus B over shared seeds from per-seed metrics alone (no per-example outcomes stored): seed part only."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return mean_estimate([a[s] - b[s] for s in seeds])


def analysis_scale(metric: str, value: float) -> float:
    """A per-seed metric on the scale comparisons use (log for perplexity)."""
    return math.log(value) if metric in LOG_METRICS else value


# --------------------------------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): reject where adjusted < ALPHA."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable(estimate: Estimate, family: int) -> float:
    """The smallest true difference this comparison detects with probability POWER at the family's strictest Holm
    level ALPHA / family (two-sided)."""
    t_alpha = stats.t.ppf(1 - ALPHA / (2 * family), estimate.df)
    t_power = stats.t.ppf(POWER, estimate.df)
    return float((t_alpha + t_power) * estimate.se)


def seeds_to_settle(estimate: Estimate, family: int, difference: float | None = None) -> int | None:
    """About how many seeds would detect a true difference the size of ``difference`` (default: the one seen) with
    probability POWER at level ALPHA / family on the same test set, at the t quantiles of that many seeds (as the
    comparison itself would use them); None when no number up to MAX_SEEDS can (the test set's own sampling error is
    too large, or the difference is 0), MAX_SEEDS + 1 when only more would."""
    size = abs(estimate.value if difference is None else difference)
    example = estimate.example_var or 0.0
    if size == 0 or size <= (stats.norm.ppf(1 - ALPHA / (2 * family)) + stats.norm.ppf(POWER)) * math.sqrt(example):
        return None
    for seeds in range(2, MAX_SEEDS + 1):
        quantiles = stats.t.ppf(1 - ALPHA / (2 * family), seeds - 1) + stats.t.ppf(POWER, seeds - 1)
        if quantiles * math.sqrt(estimate.seed_var_per_seed / seeds + example) <= size:
            return seeds
    return MAX_SEEDS + 1


# --------------------------------------------------------------------------------------------------------------------
# Pareto fronts
# --------------------------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: cost (x) no larger and metric (y) no worse, one strictly.

    Returned in order of increasing cost, so they can be drawn as a staircase.
    """
    def better_or_equal(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ya, yb = (a[1], b[1]) if higher_is_better else (-a[1], -b[1])
        return a[0] <= b[0] and ya >= yb and (a[0] < b[0] or ya > yb)

    front = [i for i, p in enumerate(points)
             if not any(better_or_equal(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1] if higher_is_better else points[i][1]))
