"""t intervals, separation and Pareto fronts against values written out by hand."""

from __future__ import annotations

import math

import pytest

from analysis.stats import Interval, interval, pareto_front, separated, t_half_width


def test_t_half_width_matches_table_values() -> None:
    # t_{0.975} with 2, 4 and 9 degrees of freedom: 4.303, 2.776, 2.262 (any statistics table)
    assert t_half_width(1.0, 3) == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert t_half_width(2.0, 5) == pytest.approx(2.7764 * 2 / math.sqrt(5), rel=1e-4)
    assert t_half_width(0.5, 10) == pytest.approx(2.2622 * 0.5 / math.sqrt(10), rel=1e-4)


def test_one_seed_has_no_interval() -> None:
    iv = interval(0.9, None, 1)
    assert iv.half is None and iv.low is None and iv.high is None
    assert separated(iv, interval(0.5, 0.01, 3)) is None


def test_separation_is_overlap_of_intervals() -> None:
    a, b = Interval(0.90, 0.02, 3), Interval(0.85, 0.02, 3)
    assert separated(a, b) is True and separated(b, a) is True
    assert separated(Interval(0.90, 0.03, 3), Interval(0.85, 0.03, 3)) is False


def test_pareto_front_keeps_only_undominated_points_in_cost_order() -> None:
    # (cost, metric), higher metric better: (3, 0.7) is beaten by (2, 0.8); (1, 0.5) and (5, 0.9) are on the front
    pts = [(3, 0.7), (1, 0.5), (2, 0.8), (5, 0.9), (5, 0.85)]
    assert pareto_front(pts, higher_is_better=True) == [1, 2, 3]
    # lower is better (perplexity): (1, 30) and (2, 20) on the front, (3, 25) beaten by (2, 20)
    assert pareto_front([(3, 25.0), (1, 30.0), (2, 20.0)], higher_is_better=False) == [1, 2]
