"""How often the guide's comparison procedure claims a winner, by simulation (no training).

A simulated study has ``groups`` groups × ``seeds`` seeds, each scored on the same ``examples`` test examples and
``val_examples`` validation examples. Outcomes are Bernoulli with a logit of example difficulty (shared by every
trial, as a hard message is hard for every method) plus a seed effect shared by the groups of one seed (data order)
plus a trial's own effect (head initialisation and their interaction), both carried to validation and test alike,
so choosing the reference on validation carries its luck into the test comparison, as in a real study. Group 0 can
be given a planted advantage of ``effect`` accuracy points.

    python analysis/calibration.py            # null claim rates and detection rates (about a minute)
    python analysis/calibration.py --smoke    # a few hundred studies, seconds
    python analysis/calibration.py --design --groups 2 --seeds 3 --examples 300 --margin 0.03   # a study's power

Printed: the share of families that claim any winner when all groups are equal (must stay at or below ALPHA), and
the share of studies in which a planted difference is detected, with the planted group as the winner.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import optimize, stats
from scipy.special import expit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.compare import Arm, claims_winner, compare_family
from analysis.stats import ALPHA, MARGINS, Outcomes, paired_difference


@dataclass(frozen=True)
class Setting:
    groups: int = 4
    seeds: int = 3
    examples: int = 1000
    val_examples: int = 500
    accuracy: float = 0.85       # the groups' mean accuracy without an effect
    difficulty_sd: float = 1.5   # SD of example difficulty on the logit scale
    seed_sd: float = 0.10        # shared seed effect (logit)
    trial_sd: float = 0.12       # each trial's own effect (logit): about 1.5 accuracy points of seed spread
    effect: float = 0.0          # planted accuracy advantage of group 0 (0.02 = two points)


def _shift(base: np.ndarray, target: float) -> float:
    """The logit shift that moves the mean accuracy over examples with logits ``base`` to ``target``."""
    return float(optimize.brentq(lambda s: expit(base + s).mean() - target, -20, 20))


def simulate_study(setting: Setting, rng: np.random.Generator) -> tuple[list[Arm], float]:
    """One simulated study's arms (``task`` accuracy on test, validation means) and the planted group's accuracy."""
    n_all = setting.examples + setting.val_examples
    z = rng.normal(0.0, setting.difficulty_sd, n_all)
    base = z + _shift(z, setting.accuracy)
    planted = _shift(base, setting.accuracy + setting.effect) if setting.effect else 0.0
    seed_effect = rng.normal(0.0, setting.seed_sd, setting.seeds)
    arms = []
    for g in range(setting.groups):
        trial = rng.normal(0.0, setting.trial_sd, setting.seeds) + seed_effect + (planted if g == 0 else 0.0)
        correct = rng.random((setting.seeds, n_all)) < expit(base[None, :] + trial[:, None])
        test, val = correct[:, :setting.examples], correct[:, setting.examples:]
        outcomes = Outcomes(tuple(range(setting.seeds)), np.arange(setting.examples), test.astype(float),
                            np.ones_like(test, dtype=float), proportion=True)
        per_seed = dict(enumerate(test.mean(axis=1).tolist()))
        arms.append(Arm(f"g{g}", float(val.mean()), per_seed, outcomes))
    return arms, setting.accuracy + setting.effect


def rates(setting: Setting, studies: int, seed: int = 0, margin: float | None = None) -> tuple[float, float]:
    """(share of families claiming any winner, share where group 0 beats every other group)."""
    rng = np.random.default_rng(seed)
    claimed = detected = 0
    for _ in range(studies):
        arms, _ = simulate_study(setting, rng)
        verdicts = compare_family(arms, "accuracy", True, MARGINS["accuracy"] if margin is None else margin)
        claimed += claims_winner(verdicts)
        wins = {v.other if v.reference == "g0" else v.reference for v in verdicts if v.kind == "beats"
                and v.winner == "g0"}
        detected += len(wins) == setting.groups - 1
    return claimed / studies, detected / studies


def equivalence_rate(setting: Setting, studies: int, margin: float, seed: int = 0) -> float:
    """Share of studies of equal groups (no effect) in which every comparison with the reference is "equivalent":
    groups trained apart (each its own trial effect), so it is the power of a real equivalence, not of an A/A pair."""
    rng = np.random.default_rng(seed)
    found = 0
    for _ in range(studies):
        arms, _ = simulate_study(replace(setting, effect=0.0), rng)
        verdicts = compare_family(arms, "accuracy", True, margin)
        found += bool(verdicts) and all(v.kind == "equivalent" for v in verdicts)
    return found / studies


def identical_pair_halfwidth(seeds: int, examples: int) -> float:
    """Half-width of the interval of two groups whose predictions are identical (an A/A pair that trains bit for bit
    alike): zero difference everywhere, the two pseudo-examples' variance alone (``stats.paired_difference``)."""
    diff = np.zeros((seeds, examples))
    a = Outcomes(tuple(range(seeds)), np.arange(examples), diff + 1.0, np.ones_like(diff), proportion=True)
    estimate = paired_difference(a, a)
    return float(stats.t.ppf(1 - ALPHA / 2, estimate.df) * estimate.se)


def design(setting: Setting, margin: float, studies: int) -> list[str]:
    """What a study of this shape can conclude: false claims, the planted differences it detects, equal groups
    called equivalent, and the A/A pair's interval (``--design``; the demo study is designed with it)."""
    claim, _ = rates(setting, studies, margin=margin)
    lines = [f"{setting.groups} groups x {setting.seeds} seeds, {setting.examples} test examples, accuracy "
             f"{setting.accuracy:.2f}, margin ±{margin * 100:g} points ({studies} studies per line)",
             f"  null (all equal): share of families claiming a winner {claim:.3f}"]
    for effect in (e for e in (0.05, 0.10, 0.15, 0.20) if setting.accuracy + e < 0.99):  # accuracy stays < 1
        _, found = rates(replace(setting, effect=effect), studies, margin=margin)
        lines.append(f"  planted {effect * 100:.0f} points: share detected (group 0 beats every other) {found:.3f}")
    lines.append(f"  equal groups trained apart: share called equivalent {equivalence_rate(setting, studies, margin):.3f}")
    half = identical_pair_halfwidth(setting.seeds, setting.examples)
    lines.append(f"  identical A/A pair: interval ±{half * 100:.1f} points, "
                 + ("inside" if half < margin else "not inside") + f" the ±{margin * 100:g}-point margin")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=2000, help="simulated studies per setting")
    parser.add_argument("--smoke", action="store_true", help="200 studies per setting")
    parser.add_argument("--design", action="store_true", help="the power of one study shape (--groups, --seeds, "
                                                              "--examples, --accuracy, --margin) instead of the tables")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=300, help="test examples")
    parser.add_argument("--accuracy", type=float, default=0.85, help="the groups' mean accuracy without an effect")
    parser.add_argument("--margin", type=float, default=MARGINS["accuracy"], help="equivalence margin (accuracy)")
    args = parser.parse_args(argv)
    studies = 200 if args.smoke else args.studies
    if args.design:
        shape = Setting(groups=args.groups, seeds=args.seeds, examples=args.examples, accuracy=args.accuracy)
        print("\n".join(design(shape, args.margin, studies)))
        return 0
    print(f"null: all groups equal ({studies} studies each); share of families claiming a winner")
    for groups in (2, 4, 6):
        for seeds in (2, 3, 5):
            for examples in (100, 1000, 5000):
                claim, _ = rates(Setting(groups=groups, seeds=seeds, examples=examples), studies)
                print(f"  groups={groups} seeds={seeds} test examples={examples:>5}: {claim:.3f}")
    print(f"planted difference, two groups, 1,000 test examples ({studies} studies each); share detected")
    for effect in (0.01, 0.02, 0.05):
        for seeds in (3, 5):
            _, found = rates(Setting(groups=2, seeds=seeds, effect=effect), studies)
            print(f"  {effect * 100:.0f} point(s), {seeds} seeds: {found:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
