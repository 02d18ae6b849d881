"""The comparison procedure: calibrated by simulation, references chosen on validation, ties kept as ties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from analysis.calibration import Setting, rates, simulate_study
from analysis.compare import Arm, claims_winner, compare_family
from analysis.stats import ALPHA, MARGINS, Outcomes


def _arm(name: str, val: float, correct: list[list[int]]) -> Arm:
    num = np.asarray(correct, dtype=float)
    out = Outcomes(tuple(range(len(num))), np.arange(num.shape[1]), num, np.ones_like(num), True)
    return Arm(name, val, dict(enumerate(num.mean(axis=1).tolist())), out)


@pytest.mark.slow
def test_null_studies_claim_a_winner_in_at_most_five_percent_of_families() -> None:
    """2,160 simulated studies where every group is truly equal, over realistic group counts, seed counts (seed
    spread about 1.7 accuracy points) and test-set sizes: the share of families claiming any winner stays <= 5%, in
    every setting (not only on average: 2 seeds and a large test set is where a narrower interval would fail)."""
    rng = np.random.default_rng(2026)
    settings = [Setting(groups=g, seeds=s, examples=n)
                for g, s, n in itertools.product((2, 3, 4, 6), (2, 3, 5), (100, 1000, 5000))]
    claimed: dict[Setting, int] = {}
    for setting in settings:
        claimed[setting] = sum(claims_winner(compare_family(simulate_study(setting, rng)[0], "accuracy", True,
                                                            MARGINS["accuracy"])) for _ in range(60))
    assert 60 * len(settings) >= 2000
    assert sum(claimed.values()) / (60 * len(settings)) <= ALPHA
    worst = max(claimed, key=claimed.get)
    assert claimed[worst] <= 6, f"{claimed[worst]} of 60 null families claimed a winner with {worst}"


def test_a_planted_five_point_difference_is_found_with_five_seeds() -> None:
    _, found = rates(Setting(groups=2, seeds=5, effect=0.05), studies=100, seed=3)
    assert found >= 0.9


def test_the_reference_is_best_on_validation_not_on_test() -> None:
    right = [1] * 90 + [0] * 10
    worse = [1] * 60 + [0] * 40
    # "val_best" is best on validation; "test_best" scores higher on test but is not the reference
    arms = [_arm("test_best", 0.70, [right, right, right]), _arm("val_best", 0.90, [worse, worse, worse])]
    [verdict] = compare_family(arms, "accuracy", True, 0.01)
    assert verdict.reference == "val_best" and verdict.kind == "beats" and verdict.winner == "test_best"


def test_groups_tied_on_validation_are_both_references_whatever_their_names() -> None:
    rng = np.random.default_rng(0)
    rows = [(rng.random((3, 200)) < p).astype(int).tolist() for p in (0.8, 0.8, 0.6)]
    for names in (("alpha", "zeta", "other"), ("zeta", "alpha", "other")):
        arms = [_arm(names[0], 0.85, rows[0]), _arm(names[1], 0.85, rows[1]), _arm(names[2], 0.5, rows[2])]
        verdicts = compare_family(arms, "accuracy", True, 0.01)
        assert {v.reference for v in verdicts} == {"alpha", "zeta"}
        assert {(v.reference, v.other) for v in verdicts if v.other == "other"} == {("alpha", "other"),
                                                                                   ("zeta", "other")}
        assert all(v.family == 3 for v in verdicts)  # every pair of the family is Holm-adjusted


def test_identical_groups_are_equivalent_and_a_single_seed_is_not_tested() -> None:
    row = [1] * 900 + [0] * 100
    same = compare_family([_arm("a", 0.9, [row] * 5), _arm("b", 0.8, [row] * 5)], "accuracy", True, 0.01)
    assert [v.kind for v in same] == ["equivalent"]
    # two seeds cannot tell: their seed variance (here 0) is unknown, so the interval is t(1) wide
    two = compare_family([_arm("a", 0.9, [row] * 2), _arm("b", 0.8, [row] * 2)], "accuracy", True, 0.01)
    assert [v.kind for v in two] == ["inconclusive"]
    single = compare_family([_arm("a", 0.9, [row]), _arm("b", 0.8, [row])], "accuracy", True, 0.01)
    assert [v.kind for v in single] == ["single_seed"]


def test_an_inconclusive_comparison_says_what_would_settle_it() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random((3, 300)) < 0.80).astype(int).tolist()
    b = (rng.random((3, 300)) < 0.78).astype(int).tolist()
    [v] = compare_family([_arm("a", 0.9, a), _arm("b", 0.8, b)], "accuracy", True, 0.01)
    assert v.kind == "inconclusive"
    assert v.detectable > abs(v.estimate.value)
    assert v.seeds_needed is None or v.seeds_needed > 3


@pytest.mark.parametrize("hib", [True, False])
def test_the_winner_follows_the_metrics_direction(hib: bool) -> None:
    high, low = [1] * 95 + [0] * 5, [1] * 50 + [0] * 50
    [v] = compare_family([_arm("a", 0.9, [high] * 3), _arm("b", 0.1 if hib else 2.0, [low] * 3)], "accuracy", hib,
                         0.01)
    assert v.kind == "beats" and v.winner == ("a" if hib else "b")


def test_the_design_figures_agree_with_the_comparison_itself() -> None:
    """``calibration --design``'s A/A interval is the one compare_family judges: identical groups at the demo's shape
    (3 seeds, 300 test examples) are equivalent within ±3 points and not within ±1.5 (the interval is ±2.0)."""
    from analysis.calibration import design, identical_pair_halfwidth

    half = identical_pair_halfwidth(3, 300)
    assert 0.015 < half < 0.03
    row = [1] * 200 + [0] * 100
    arms = [_arm("a", 0.7, [row] * 3), _arm("b", 0.6, [row] * 3)]
    assert [v.kind for v in compare_family(arms, "accuracy", True, 0.03)] == ["equivalent"]
    assert [v.kind for v in compare_family(arms, "accuracy", True, 0.015)] == ["inconclusive"]
    lines = design(Setting(groups=2, seeds=3, examples=300, accuracy=0.65), 0.03, studies=60)
    assert any(line.startswith("  planted 20 points") for line in lines)
    assert lines[-1] == f"  identical A/A pair: interval ±{half * 100:.1f} points, inside the ±3-point margin"
