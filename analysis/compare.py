"""The guide's comparison procedure, apart from the database and from wording, so it can be simulated.

In one task and dimension (a *family*), the group with the best mean **validation** metric is the reference (the test
set never chooses; groups that tie on validation are all references, never separated by name). Every other group is
compared with each reference on paired test outcomes (``analysis/stats.py``), and p-values are Holm-adjusted over
every pair of the family (see ``compare_family`` for why all pairs). Each comparison ends in one verdict:

- ``beats``:        the difference is not 0 (Holm-adjusted p < ALPHA); ``winner`` is the better group on test;
- ``equivalent``:   the difference lies within ±margin (Holm-adjusted TOST p < ALPHA);
- ``inconclusive``: neither; the smallest difference the study can detect and the seeds that would settle the
                    difference seen say what it would take;
- ``single_seed``:  the two share fewer than two seeds: no seed variance, so no test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from analysis.stats import (
    ALPHA,
    LOG_METRICS,
    Estimate,
    Outcomes,
    analysis_scale,
    detectable,
    holm,
    paired_difference,
    seed_difference,
    seeds_to_settle,
)


@dataclass(frozen=True)
class Arm:
    """A group as the comparison sees it."""

    name: str
    val: float | None              # mean validation metric at the chosen learning rate (selects the reference)
    per_seed: dict[int, float]     # test metric per completed seed, as the guide shows it
    outcomes: Outcomes | None      # per-example test outcomes of those seeds, when stored


@dataclass(frozen=True)
class Verdict:
    kind: str                      # beats | equivalent | inconclusive | single_seed
    reference: str
    other: str
    estimate: Estimate | None      # reference minus other, on the analysis scale (log for perplexity)
    winner: str | None = None      # beats: the better group on test
    p_adjusted: float | None = None
    p_equivalent: float | None = None  # Holm-adjusted TOST p-value
    margin: float = 0.0            # on the analysis scale
    family: int = 1                # comparisons tested in the family (Holm's m)
    paired_examples: bool = True   # False: per-example outcomes missing, seed spread only

    @property
    def detectable(self) -> float | None:
        return None if self.estimate is None else detectable(self.estimate, self.family)

    @property
    def seeds_needed(self) -> int | None:
        return None if self.estimate is None else seeds_to_settle(self.estimate, self.family)


def margin_on_scale(metric: str, margin: float) -> float:
    """A practical margin on the scale comparisons use: relative margins of log metrics become log ratios."""
    return math.log1p(margin) if metric in LOG_METRICS else margin


def references(arms: Sequence[Arm], higher_is_better: bool) -> list[Arm]:
    """Every arm whose validation mean equals the best one (ties are ties)."""
    scored = [a for a in arms if a.val is not None and a.per_seed]
    if not scored:
        return []
    top = (max if higher_is_better else min)(a.val for a in scored)
    return [a for a in scored if math.isclose(a.val, top, rel_tol=1e-12, abs_tol=1e-12)]


def pairs(arms: Sequence[Arm]) -> list[tuple[Arm, Arm]]:
    """Every two arms with a test result, once each."""
    done = [a for a in arms if a.per_seed]
    return [(a, b) for i, a in enumerate(done) for b in done[i + 1:]]


def difference(metric: str, ref: Arm, other: Arm) -> tuple[Estimate | None, bool]:
    """Reference minus other: paired on seeds and examples when both stored outcomes, else on seeds alone."""
    if ref.outcomes is not None and other.outcomes is not None:
        estimate = paired_difference(ref.outcomes, other.outcomes)
        if estimate is not None:
            return estimate, True
    scaled = [{s: analysis_scale(metric, v) for s, v in arm.per_seed.items()} for arm in (ref, other)]
    return seed_difference(*scaled), False


def compare_family(arms: Sequence[Arm], metric: str, higher_is_better: bool, margin: float) -> list[Verdict]:
    """The verdict of each comparison with a reference (``margin`` as configured: absolute, or relative for log
    metrics).

    Every pair of the family is tested and Holm-adjusted, not only the pairs with the reference: the reference is
    chosen on validation, and a lucky seed is lucky on test too, so adjusting for the reported comparisons alone lets
    the reference's luck through (4 groups, 5 seeds: 7.6% of simulated null families claimed a winner). Holm over
    every pair bounds the chance of any false claim whichever pair validation picks."""
    delta = margin_on_scale(metric, margin)
    refs = [a.name for a in references(arms, higher_is_better)]
    tested: list[tuple[Arm, Arm, Estimate, bool]] = []
    verdicts: list[Verdict] = []
    for a, b in pairs(arms):
        ref, other = (a, b) if a.name in refs or b.name not in refs else (b, a)
        estimate, paired = difference(metric, ref, other)
        if estimate is not None and estimate.n >= 2:
            tested.append((ref, other, estimate, paired))
        elif ref.name in refs:
            verdicts.append(Verdict("single_seed", ref.name, other.name, estimate, margin=delta,
                                    paired_examples=paired))
    m = len(tested)
    p_diff = holm([e.p_value() for _, _, e, _ in tested])
    p_equiv = holm([e.p_equivalent(delta) for _, _, e, _ in tested])
    for (ref, other, estimate, paired), p, q in zip(tested, p_diff, p_equiv, strict=True):
        if ref.name not in refs:
            continue
        common = dict(margin=delta, family=m, paired_examples=paired, p_adjusted=p, p_equivalent=q)
        if p < ALPHA:
            winner = ref.name if (estimate.value > 0) == higher_is_better else other.name
            verdicts.append(Verdict("beats", ref.name, other.name, estimate, winner=winner, **common))
        elif q < ALPHA:
            verdicts.append(Verdict("equivalent", ref.name, other.name, estimate, **common))
        else:
            verdicts.append(Verdict("inconclusive", ref.name, other.name, estimate, **common))
    return verdicts


def claims_winner(verdicts: Sequence[Verdict]) -> bool:
    """Whether the family says any group beats another (what a false discovery would be under no difference)."""
    return any(v.kind == "beats" for v in verdicts)
