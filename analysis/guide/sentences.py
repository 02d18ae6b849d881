"""The calibrated sentences: each comparison's verdict (beats / equivalent / inconclusive / single seed /
diverged) as a finding and its one sentence, with the evidence and the margin it was judged against."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from analysis.compare import Verdict, compare_family
from analysis.guide.records import (
    CHEAPER_FACTOR,
    JUDGED_METRICS,
    METRIC_RANGES,
    POINT_METRICS,
    TASK_KINDS,
    Finding,
    Group,
    fmt_count,
    fmt_lr,
    fmt_metric,
    fmt_share,
    metric_title,
)
from analysis.stats import (
    LEVEL,
    LOG_METRICS,
    MARGINS,
    MAX_SEEDS,
)


def _where(task: str, dimension: str) -> str:
    return f"on {task}" + (f" ({dimension})" if dimension != "method" else "")


def in_points(value: float, metric: str | None) -> float:
    """A difference on the comparison scale as a reader counts it: accuracy points, percent for log metrics (a
    log-perplexity difference d is a relative change of exp(d) - 1), or the metric itself when it is in points."""
    if metric in LOG_METRICS:
        return 100 * math.expm1(value)
    return value if metric in POINT_METRICS else 100 * value


def fmt_points(value: float, metric: str | None, signed: bool = True, digits: int = 1) -> str:
    shown = in_points(value, metric)
    text = f"{shown:+.{digits}f}" if signed else f"{abs(shown):.{digits}f}"
    return text.replace("-", "−")


def _unit(metric: str | None) -> str:
    return "%" if metric in LOG_METRICS else " points"


def _digits(metric: str | None, *values: float) -> int:
    """One decimal, two when everything shown is below one point (or percent)."""
    return 2 if max(abs(v if metric in POINT_METRICS else 100 * v) for v in values) < 1 else 1


def _sample(metric: str | None) -> tuple[str, str]:
    """What one outcome of a comparison is measured on, and the set of them: test examples, or judged prompts."""
    if metric in JUDGED_METRICS:
        return "judged prompts", "these prompts"
    return "test examples", "this test set"


def fmt_margin(margin: float, metric: str | None) -> str:
    if metric in LOG_METRICS:
        return f"±{100 * margin:g}% ({metric_title(metric)}, relative)"
    points = in_points(margin, metric)
    return f"±{points:g} {metric_title(metric)} point{'s' if points != 1 else ''}"


def _evidence(v: Verdict, metric: str | None) -> str:
    """The numbers behind a verdict: the interval of reference minus other, what it is paired over, the p-value."""
    lo, hi = v.estimate.ci()
    d = _digits(metric, v.estimate.value, lo, hi)
    paired = (f"paired over {v.estimate.n} seeds and {v.estimate.n_examples:,} {_sample(metric)[0]}"
              if v.paired_examples
              else f"paired over {v.estimate.n} seeds; seed spread only, the trials stored no per-example outcomes")
    test = "equivalence " if v.kind == "equivalent" else ""
    p = v.p_equivalent if v.kind == "equivalent" else v.p_adjusted
    return (f"{v.reference} − {v.other} = {fmt_points(v.estimate.value, metric, digits=d)}{_unit(metric)}, "
            f"{LEVEL:.0%} CI {fmt_points(lo, metric, digits=d)} to {fmt_points(hi, metric, digits=d)}; {paired}; "
            f"Holm-adjusted {test}p {fmt_p(p)} over {v.family} comparison{'s' if v.family != 1 else ''}")


def fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def _beats(v: Verdict, where: str, metric: str | None, hib: bool) -> str:
    loser = v.other if v.winner == v.reference else v.reference
    lo, hi = v.estimate.ci()
    gain = v.estimate.value if v.winner == v.reference else -v.estimate.value
    if metric in LOG_METRICS:  # perplexity: how much lower (or higher) the winner's is, relative to the loser's
        ratio = math.exp(gain)  # winner / loser
        size = f"with {100 * abs(ratio - 1):.1f}% {'higher' if hib else 'lower'} {metric_title(metric)}"
    else:
        size = (f"by {fmt_points(gain, metric, signed=False, digits=_digits(metric, gain, lo, hi))} "
                f"{metric_title(metric)} points")
    return f"{v.winner} beats {loser} {where} {size} ({_evidence(v, metric)})."


def _equivalent(v: Verdict, where: str, metric: str | None, groups: dict[str, Group]) -> str:
    text = (f"{v.reference} and {v.other} are equivalent {where} within {fmt_margin(_margin(v, metric), metric)}: "
            f"the whole interval lies inside it ({_evidence(v, metric)}).")
    a, b = groups[v.reference], groups[v.other]
    if a.trainable_params and b.trainable_params:
        cheap, dear = sorted((a, b), key=lambda g: g.trainable_params)
        if dear.trainable_params >= CHEAPER_FACTOR * cheap.trainable_params:
            text += (f" {cheap.group} trains {fmt_count(cheap.trainable_params)} parameters "
                     f"({fmt_share(cheap.trainable_params, cheap.total_params)} of the model) against "
                     f"{fmt_count(dear.trainable_params)} for {dear.group}: take {cheap.group} when memory or "
                     f"checkpoint size matters.")
    return text


def _margin(v: Verdict, metric: str | None) -> float:
    """The configured margin back from the comparison scale (relative for log metrics)."""
    return math.expm1(v.margin) if metric in LOG_METRICS else v.margin


def fmt_detectable(v: Verdict, metric: str | None) -> str:
    """The smallest detectable difference, or a plain statement when it exceeds what the metric can differ by."""
    mde = v.detectable
    if mde >= (math.log(10) if metric in LOG_METRICS else METRIC_RANGES.get(metric or "", 1.0)):
        return "none within the metric's range"
    return f"about {fmt_points(mde, metric, signed=False)}{_unit(metric)}"


def _inconclusive(v: Verdict, where: str, metric: str | None) -> str:
    seen = fmt_points(abs(v.estimate.value), metric, signed=False, digits=_digits(metric, v.estimate.value))
    outcomes, sample = _sample(metric)
    text = (f"Inconclusive {where} between {v.reference} and {v.other} ({_evidence(v, metric)}). With "
            f"{v.estimate.n} seeds the smallest difference this study can detect is {fmt_detectable(v, metric)}")
    need = v.seeds_needed
    if need is None:
        text += (f"; no number of seeds settles a difference of {seen}{_unit(metric)} on {sample}, whose own "
                 f"sampling error is larger: it would take more {outcomes}.")
    elif need > MAX_SEEDS:
        text += f"; more than {MAX_SEEDS} seeds would be needed to settle a difference of {seen}{_unit(metric)}."
    else:
        text += f"; about {need} seeds would settle a difference of the size seen ({seen}{_unit(metric)})."
    return text


def family_verdicts(groups: Sequence[Group], margins: Mapping[str, float] | None = None) -> list[Verdict]:
    """The verdicts of one task and dimension (``analysis/compare.py``)."""
    done = [g for g in groups if g.test_values]
    if len(done) < 2:
        return []
    metric = done[0].metric
    margin = {**MARGINS, **(margins or {})}.get(metric, 0.0)
    return compare_family([g.arm() for g in done], metric, done[0].higher_is_better, margin)


def verdict_findings(task: str, dimension: str, groups: Sequence[Group], verdicts: Sequence[Verdict],
                     where: str | None = None) -> list[Finding]:
    """Each verdict as a sentence about ``where`` (default: the task and dimension)."""
    by_name = {g.group: g for g in groups}
    said = where
    where = where or _where(task, dimension)
    findings = []
    for v in verdicts:
        ref, other = by_name[v.reference], by_name[v.other]
        metric = ref.metric
        if v.kind == "single_seed":
            text = (f"{ref.group} scored {fmt_metric(ref.test_mean, metric)} and {other.group} "
                    f"{fmt_metric(other.test_mean, metric)} {metric_title(metric)} {where}, but they share fewer "
                    f"than two seeds, so no interval can be given and the guide draws no conclusion; run more seeds.")
            findings.append(Finding("single_seed", task, dimension, ref.group, other.group, text,
                                    (f"{ref.group} {ref.shown}", f"{other.group} {other.shown}"), said))
        elif v.kind == "beats":
            loser = v.other if v.winner == v.reference else v.reference
            findings.append(Finding("beats", task, dimension, v.winner, loser,
                                    _beats(v, where, metric, ref.higher_is_better)))
        elif v.kind == "equivalent":
            findings.append(Finding("equivalent", task, dimension, v.reference, v.other,
                                    _equivalent(v, where, metric, by_name)))
        else:
            findings.append(Finding("inconclusive", task, dimension, v.reference, v.other,
                                    _inconclusive(v, where, metric)))
    return findings


def sentences(findings: Sequence[Finding]) -> list[str]:
    """The findings as sentences; the single-seed ones of one task and dimension become one sentence."""
    out: list[str] = []
    single: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        if f.kind == "single_seed":
            if (f.task, f.dimension) not in single:
                single[(f.task, f.dimension)] = []
                out.append(f"@single:{f.task}:{f.dimension}")
            single[(f.task, f.dimension)].append(f)
        else:
            out.append(f.text)
    for (task, dimension), fs in single.items():
        where = fs[0].where or _where(task, dimension)
        others = list(dict.fromkeys(n for f in fs for n in f.numbers[1:] if n not in {g.numbers[0] for g in fs}))
        text = (f"No conclusion {where}: {', '.join(fs[0].numbers)}" if len(fs) == 1 else
                f"No conclusion {where}: best on validation "
                f"{', '.join(dict.fromkeys(f.numbers[0] for f in fs))}; others {', '.join(others)}")
        out[out.index(f"@single:{task}:{dimension}")] = (text + ". With a single seed no interval can be given; "
                                                         "run more seeds.")
    return out


def diverged_findings(lr_rows: Iterable[dict[str, Any]], dimension: str) -> list[Finding]:
    out = []
    for r in lr_rows:
        if r["n_diverged"]:
            text = (f"On {r['task']}, {r['group']} at learning rate {fmt_lr(r['lr'])} diverged in "
                    f"{r['n_diverged']} of {r['n_trials']} seeds; stay below it.")
            out.append(Finding("diverged", r["task"], dimension, r["group"], fmt_lr(r["lr"]), text))
    return out


def verdict_cell(group: str, verdicts: Sequence[Verdict], metric: str | None) -> str:
    """How a group compares with the group(s) best on validation, in a table cell: group minus reference."""
    refs = sorted({v.reference for v in verdicts})
    if group in refs:
        return "best on validation" if len(refs) == 1 else "tied best on validation"
    parts = []
    for v in (v for v in verdicts if v.other == group):
        prefix = f"vs {v.reference}: " if len(refs) > 1 else ""
        if v.kind == "single_seed":
            parts.append(prefix + "no test (single seed)")
            continue
        lo, hi = v.estimate.ci()
        d = _digits(metric, v.estimate.value, lo, hi)
        shown = (f"{fmt_points(-v.estimate.value, metric, digits=d)}{_unit(metric)} "
                 f"({fmt_points(-hi, metric, digits=d)} to {fmt_points(-lo, metric, digits=d)})")
        label = {"beats": "better" if v.winner == group else "worse", "equivalent": "equivalent",
                 "inconclusive": "inconclusive"}[v.kind]
        if v.kind == "inconclusive" and (lo > 0 or hi < 0):  # the interval alone excludes 0; the family does not
            label += f" after Holm over {v.family} comparisons"
        parts.append(f"{prefix}{label}: {shown}")
    return "; ".join(parts) or "–"

ACROSS_MARKS = {"better": " (better)", "worse": " (worse)", "equivalent": " (equivalent)",
                "inconclusive": " (inconclusive)"}


def _across_marks(task: str, verdicts: Sequence[Verdict]) -> dict[tuple[str, str], str]:
    """Table marks: the reference(s), and how each other group compares with them (when all agree)."""
    refs = sorted({v.reference for v in verdicts})
    marks = {(task, r): " (best on validation)" if len(refs) == 1 else " (tied best on validation)" for r in refs}
    labels: dict[str, set[str]] = defaultdict(set)
    for v in verdicts:
        if v.other not in refs and v.kind != "single_seed":
            labels[v.other].add(("better" if v.winner == v.other else "worse") if v.kind == "beats" else v.kind)
    marks.update({(task, g): ACROSS_MARKS[next(iter(ls))] for g, ls in labels.items() if len(ls) == 1})
    return marks


def _across_sentence(task: str, groups: Sequence[Group], verdicts: Sequence[Verdict], lead: str | None = None
                     ) -> str:
    """One family's line: the group(s) best on validation and what the comparisons with them found."""
    kind = TASK_KINDS.get(task, task)
    shown = {g.group: g.shown for g in groups}
    refs = sorted({v.reference for v in verdicts})
    text = lead if lead is not None else f"{kind[:1].upper() + kind[1:]} ({task}): "
    if len(refs) == 1:
        text += f"{refs[0]} is best on validation (test {shown[refs[0]]})"
    else:
        both = "; ".join(f"{r} {shown[r]}" for r in refs)
        text += f"{', '.join(refs[:-1])} and {refs[-1]} tie for best on validation ({both})"
    said: dict[str, list[str]] = defaultdict(list)
    for v in verdicts:
        if v.kind == "beats":
            loser = v.other if v.winner == v.reference else v.reference
            said[f"{v.winner} beats"].append(loser)
        elif v.other not in refs or v.kind != "single_seed":
            said[{"equivalent": "equivalent", "inconclusive": "inconclusive",
                  "single_seed": "not compared (single seed)"}[v.kind]].append(f"{v.reference}/{v.other}"
                                                                          if len(refs) > 1 else v.other)
    for key, names in said.items():
        text += f"; {key}: {', '.join(names)}" if not key.endswith("beats") else f"; {key} {', '.join(names)}"
    return text + "."
