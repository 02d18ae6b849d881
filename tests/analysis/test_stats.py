"""Intervals with a test-set part, paired differences, Holm, equivalence, detectable effects and Pareto fronts,
against values written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (
    Outcomes,
    detectable,
    holm,
    interval,
    mean_estimate,
    outcomes_from_rows,
    paired_difference,
    pareto_front,
    seeds_to_settle,
)


def _outcomes(correct: list[list[int]], seeds: tuple[int, ...] | None = None) -> Outcomes:
    num = np.asarray(correct, dtype=float)
    return Outcomes(seeds or tuple(range(len(num))), np.arange(num.shape[1]), num, np.ones_like(num), True)


def test_seed_only_interval_is_the_student_t_interval() -> None:
    # t_{0.975} with 2 degrees of freedom is 4.303 (any statistics table)
    iv = interval(mean_estimate([0.8, 0.9, 1.0]))
    assert iv.mean == pytest.approx(0.9) and iv.half == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)


def test_one_seed_has_no_interval() -> None:
    iv = interval(mean_estimate([0.9], _outcomes([[1, 0, 1, 1]])))
    assert iv.half is None and iv.low is None and iv.n == 1


def test_agreeing_seeds_still_carry_the_test_sets_sampling_error() -> None:
    # two seeds right on the same 88 of 100 examples: no seed spread, but a finite test set
    row = [1] * 88 + [0] * 12
    est = mean_estimate([0.88, 0.88], _outcomes([row, row]))
    values = np.array([*row, 0, 1], dtype=float)  # two pseudo-examples of opposite outcome
    assert est.seed_var == 0 and est.example_var == pytest.approx(values.var(ddof=1) / 100)
    assert est.df == 1  # the seed part's degrees of freedom: agreeing seeds do not prove a zero seed variance
    assert interval(est).half == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(values.var(ddof=1) / 100))
    perfect = mean_estimate([1.0, 1.0], _outcomes([[1] * 50, [1] * 50]))
    assert interval(perfect).half > 0  # accuracy 1.0 is not known to ±0


def test_both_variance_parts_add_at_the_seed_parts_degrees_of_freedom() -> None:
    a = [[1, 1, 0, 1, 0, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1, 1, 1]]
    out = _outcomes(a)
    per_seed = out.per_seed().tolist()
    est = mean_estimate(per_seed, out)
    s1 = np.var(per_seed, ddof=1) / 3
    s2 = np.var(np.concatenate([np.mean(a, axis=0), [0, 1]]), ddof=1) / 8
    assert est.se == pytest.approx(math.sqrt(s1 + s2)) and est.df == 2
    assert interval(est).half == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(s1 + s2))


def test_paired_difference_cancels_what_two_groups_share() -> None:
    # B is A with one example flipped in each seed: per seed +1/6, per example mostly 0
    a = [[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 0, 1]]
    b = [[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0, 0]]
    est = paired_difference(_outcomes(a), _outcomes(b))
    assert est.value == pytest.approx(1 / 6) and est.seed_var == 0
    diff = np.array([0, 0, 0, 0, 0, 1, -1, 1], dtype=float)  # per example, plus pseudo-examples -1 and +1
    assert est.example_var == pytest.approx(diff.var(ddof=1) / 6)
    # unpaired, the same data (ten times over, so pseudo-examples weigh little) carries both groups' example spread
    a10, b10 = _outcomes([r * 10 for r in a]), _outcomes([r * 10 for r in b])
    unpaired = mean_estimate([0.5] * 2, a10).example_var + mean_estimate([1 / 3] * 2, b10).example_var
    assert paired_difference(a10, b10).example_var < 0.6 * unpaired


def test_paired_difference_uses_shared_seeds_and_examples_only() -> None:
    a = Outcomes((0, 1, 2), np.array([0, 1, 2]), np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0.]]), np.ones((3, 3)), True)
    b = Outcomes((1, 2), np.array([1, 2, 5]), np.array([[0, 0, 1], [1, 0, 1.]]), np.ones((2, 3)), True)
    est = paired_difference(a, b)
    assert est.n == 2 and est.n_examples == 2
    assert est.value == pytest.approx(((0 - 0) / 2 + (0 - 1) / 2) / 2)


def test_perplexity_is_compared_on_log_perplexity_with_linearised_examples() -> None:
    loss = np.array([[20.0, 30.0, 25.0], [22.0, 28.0, 26.0]])
    tokens = np.array([[10.0, 10.0, 10.0], [10.0, 10.0, 10.0]])
    a = Outcomes((0, 1), np.arange(3), loss, tokens, False)
    b = Outcomes((0, 1), np.arange(3), loss * 1.1, tokens, False)
    est = paired_difference(b, a)
    assert est.value == pytest.approx(math.log(1.1) * 0 + (loss * 0.1).sum(axis=1).mean() / 30)
    contrib = a.contributions()
    assert contrib.mean(axis=1) == pytest.approx(a.per_seed())  # contributions average to the ratio


def test_rows_become_a_seed_by_example_grid_or_nothing() -> None:
    seeds, examples = np.array([1, 0, 1, 0]), np.array([0, 1, 1, 0])
    out = outcomes_from_rows(seeds, examples, np.array([1., 0, 1, 1]), np.ones(4), True)
    assert out.seeds == (0, 1) and out.num.tolist() == [[1, 0], [1, 1]]
    assert outcomes_from_rows(np.array([0, 1]), np.array([0, 1]), np.ones(2), np.ones(2), True) is None


def test_holm_matches_a_hand_computed_step_down() -> None:
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_equivalence_holds_exactly_when_the_interval_lies_inside_the_margin() -> None:
    est = mean_estimate([0.001, -0.002, 0.0005, 0.0])
    low, high = est.ci()
    inside = max(abs(low), abs(high))
    assert est.p_equivalent(inside * 1.01) < 0.05 < est.p_equivalent(inside * 0.99)


def test_detectable_difference_and_seeds_needed_follow_the_power_formula() -> None:
    est = mean_estimate([0.80, 0.82, 0.84])  # seed part only, sd 0.02
    se = 0.02 / math.sqrt(3)
    assert detectable(est, 1) == pytest.approx((stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * se)
    need = seeds_to_settle(est, 1, 0.01)  # the first seed count whose own t quantiles reach 80% power
    t = lambda m: stats.t.ppf(0.975, m - 1) + stats.t.ppf(0.8, m - 1)  # noqa: E731
    assert t(need) * 0.02 / math.sqrt(need) <= 0.01 < t(need - 1) * 0.02 / math.sqrt(need - 1)
    assert seeds_to_settle(est, 1, 0.0) is None
    row = [1] * 50 + [0] * 50
    noisy_test = mean_estimate([0.5, 0.5], _outcomes([row, row]))
    assert seeds_to_settle(noisy_test, 1, 0.01) is None  # 100 examples cannot resolve one point at any seed count


def test_pareto_front_keeps_only_undominated_points_in_cost_order() -> None:
    # (cost, metric), higher metric better: (3, 0.7) is beaten by (2, 0.8); (1, 0.5) and (5, 0.9) are on the front
    pts = [(3, 0.7), (1, 0.5), (2, 0.8), (5, 0.9), (5, 0.85)]
    assert pareto_front(pts, higher_is_better=True) == [1, 2, 3]
    # lower is better (perplexity): (1, 30) and (2, 20) on the front, (3, 25) beaten by (2, 20)
    assert pareto_front([(3, 25.0), (1, 30.0), (2, 20.0)], higher_is_better=False) == [1, 2]
