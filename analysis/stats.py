"""The guide's statistics: Student-t confidence intervals over seeds, interval separation, Pareto fronts.

Why a t interval and not a bootstrap: a study runs 2-5 seeds per configuration; a percentile bootstrap over 3 values
has at most 10 distinct resamples and covers far less than its nominal 95%. The t interval is exact for normal noise
and honest (wide) at small n. Two configurations are called different only when their intervals do not overlap, which
is stricter than a two-sample t-test at the same level: the guide prefers "within noise" to a false claim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds with its two-sided t interval (``half`` is None when n < 2: no interval exists)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half


def t_half_width(sd: float | None, n: int, level: float = LEVEL) -> float | None:
    """Half-width of the two-sided t interval of a mean from a sample SD over ``n`` values (None when n < 2)."""
    if n < 2 or sd is None or not math.isfinite(sd):
        return None
    return float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def interval(mean: float, sd: float | None, n: int, level: float = LEVEL) -> Interval:
    return Interval(mean, t_half_width(sd, n, level), n)


def separated(a: Interval, b: Interval) -> bool | None:
    """True when the intervals do not overlap, False when they do, None when either has no interval (one seed)."""
    if a.half is None or b.half is None:
        return None
    return a.low > b.high or b.low > a.high


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
