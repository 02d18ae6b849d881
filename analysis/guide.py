"""From the study database to the guide's content: groups with intervals, findings, tables, figures.

``collect`` runs the queries of ``analysis/queries.py`` (the only SQL), turns seed and per-example statistics into
intervals (``analysis/stats.py``), compares the groups of each task and dimension (``analysis/compare.py``), and
returns a ``Guide`` the Jinja2 templates in ``report_templates/`` lay out. Every number in the guide is formatted here
from a query's result; the templates only place it.

A finding is one comparison with the group that is best on validation in one task and dimension, or a divergence:
- ``beats``:        one group is better on test (Holm-adjusted, paired over seeds and test examples);
- ``equivalent``:   the whole interval of the difference lies inside the metric's practical margin ±δ;
- ``inconclusive``: neither; the sentence says the smallest difference the study can detect and the seeds needed;
- ``single_seed``:  the two share fewer than two seeds, so nothing is concluded;
- ``diverged``:     some seeds of a group at a learning rate diverged.

The Judged quality section (``judged_section``, present only when an LLM judge was run: analysis/judge.py) treats the
judge's 0-100 scores and pairwise win rates of the kept generations like a test metric measured on judged prompts:
the same intervals, the same paired comparisons with the group best on validation, worded by the same functions.
Its findings stay in that section: Recommendations and What to use read the task's primary metric only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import duckdb
import numpy as np
from scipy.stats import spearmanr

from analysis import queries as q
from analysis.compare import Arm, Verdict, compare_family
from analysis.db import DatabaseError
from analysis.stats import (
    LEVEL,
    LOG_METRICS,
    MARGINS,
    MAX_SEEDS,
    Interval,
    Outcomes,
    interval,
    mean_estimate,
    outcomes_from_rows,
    pareto_front,
)

TASK_TITLES = {
    "sms_spam": "SMS spam (classification)",
    "imdb": "IMDB reviews (sentiment)",
    "nli": "Natural-language inference (3-class)",
    "alpaca": "Alpaca (instruction tuning)",
    "preference": "Preference pairs (DPO)",
}
TASK_KINDS = {"sms_spam": "classification", "imdb": "sentiment", "nli": "NLI", "alpaca": "instruction tuning",
              "preference": "preference tuning (DPO)"}
METRIC_TITLES = {"accuracy": "accuracy", "perplexity": "perplexity", "preference_accuracy": "preference accuracy",
                 "judge_score": "judged score", "win_rate": "win rate"}
# Metrics shown as they are counted, not as a proportion (a judged score is already in points, 0-100), and the range
# a difference of a metric cannot exceed (a proportion's is 1).
POINT_METRICS = frozenset({"judge_score"})
METRIC_RANGES = {"judge_score": 100.0}
JUDGED_METRICS = frozenset({"judge_score", "win_rate"})  # an LLM judge's, about the kept generations

# One section per proposal dimension, in reading order. ``methods`` narrows a section to some methods of the
# dimension (the last-k section reads the `method` dimension's full / last-k / head-only groups).
SECTIONS: tuple[dict[str, Any], ...] = (
    {"key": "method", "dimension": "method", "title": "Full fine-tuning vs LoRA vs partial methods",
     "about": "Every method at its own best learning rate: what each buys in quality and what it costs."},
    {"key": "last_k", "dimension": "method", "methods": ("full", "last_k", "head_only"),
     "title": "How many transformer blocks to train (last-k)",
     "about": "Training only the last k blocks (plus the head): head-only is k = 0, full fine-tuning is every block."},
    {"key": "lora_rank", "dimension": "lora_rank", "title": "LoRA rank",
     "about": "LoRA on every target projection at ranks from 1 up; alpha scales with the rank (alpha = 2r)."},
    {"key": "lora_alpha", "dimension": "lora_alpha", "title": "LoRA alpha and rsLoRA",
     "about": "The scale of LoRA's update: alpha = r, 2r or 4r, and rsLoRA's alpha/sqrt(r) instead of alpha/r."},
    {"key": "lora_dropout", "dimension": "lora_dropout", "title": "LoRA dropout",
     "about": "Dropout on the adapters' input."},
    {"key": "lora_layers", "dimension": "lora_layers", "title": "How many layers get LoRA",
     "about": "LoRA adapters on the last few transformer blocks only, or on all of them."},
    {"key": "lora_targets", "dimension": "lora_targets", "title": "Which projections get LoRA",
     "about": "Adapters on the attention projections, the MLP, or both."},
    {"key": "data_size", "dimension": "data_size", "title": "How much labelled data",
     "about": "Each method trained on subsets of the training split (log axis): how quality grows with data, and where "
              "the cheaper methods catch up."},
    {"key": "model_size", "dimension": "model_size", "title": "Model size",
     "about": "The same methods on larger GPT-2 models (by parameter count): whether the answer changes with size, with "
              "the cost columns that make the trade-off visible."},
    {"key": "batch_size", "dimension": "batch_size", "title": "Batch size",
     "about": "Examples per optimizer step for full fine-tuning and LoRA, each at its own learning-rate grid."},
    {"key": "optimizer", "dimension": "optimizer", "title": "Optimizers",
     "about": "LoRA and full fine-tuning with different optimizers, each optimizer at its own learning-rate grid and "
              "reported at its best learning rate."},
    {"key": "schedule", "dimension": "schedule", "title": "Learning-rate schedules",
     "about": "LoRA and full fine-tuning with different learning-rate schedules."},
    {"key": "control", "dimension": "control", "title": "A/A control: groups that train identically",
     "about": "Groups whose configurations differ only in a key that does not change training (e.g. train.log_every): "
              "a check of the guide's own statistics. They must never be said to differ; with enough test examples "
              "they come out equivalent."},
    {"key": "dpo", "dimension": "dpo", "title": "DPO preference tuning: method and β",
     "about": "DPO on held-out preference pairs: preference accuracy is the share of pairs whose implicit reward "
              "(β times the log-prob gain over the reference) is higher for the chosen answer. Groups differ in "
              "method and β; each has its own learning-rate grid."},
)

METHOD_ORDER = ("full", "last_k", "head_only", "bitfit", "lora")
# One colour per method in every figure (colour-blind-safe Okabe-Ito palette).
METHOD_COLOURS = {"full": "#0072B2", "last_k": "#E69F00", "head_only": "#009E73", "bitfit": "#CC79A7",
                  "lora": "#D55E00"}
OTHER_COLOUR = "#555555"
CHEAPER_FACTOR = 2.0  # an equivalence names the cheaper group when it trains at least this factor fewer parameters
SIDE_BY_SIDE_PROMPTS = 3  # prompts shown side by side per task (a trial keeps up to 100)
Row = TypeVar("Row")


# --------------------------------------------------------------------------------------------------------------------
# Formatting (the one place numbers become text)
# --------------------------------------------------------------------------------------------------------------------


def fmt_metric(value: float | None, metric: str | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if metric == "perplexity":
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    if metric in POINT_METRICS:
        return f"{value:.1f}"
    return f"{value:.3f}"


def fmt_interval(iv: Interval | None, metric: str | None) -> str:
    if iv is None:
        return "–"
    if iv.half is None:
        return f"{fmt_metric(iv.mean, metric)} (1 seed)"
    return f"{fmt_metric(iv.mean, metric)} ± {fmt_metric(iv.half, metric)}"


def fmt_count(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def fmt_share(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "–"
    share = 100 * part / whole
    return f"{share:.3g}%" if share < 10 else f"{share:.0f}%"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def fmt_rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


MEMORY_SOURCES = {"cuda_peak": "CUDA peak", "account": "account"}


def fmt_memory(group: Group) -> str:
    """A group's memory, saying whether it is the measured CUDA peak or the per-trial account."""
    if group.peak_memory_mb is None:
        return "–"
    return f"{group.peak_memory_mb:,.0f} MB ({MEMORY_SOURCES.get(group.memory_source or '', 'unknown')})"


def fmt_lr(value: float | None) -> str:
    return "–" if value is None else f"{value:.0e}".replace("e-0", "e-")


# --------------------------------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One group of one dimension on one task, at the learning rate the guide reports (see queries.guide_best)."""

    task: str
    dimension: str
    group: str
    method: str
    lr: float
    metric: str
    higher_is_better: bool
    n_trials: int
    n_completed: int
    n_diverged: int
    n_other: int
    val_mean: float | None
    test_mean: float | None
    test_sd: float | None
    test_values: list[float]
    test_seeds: list[int]
    trainable_params: float | None
    total_params: float | None
    wall_seconds: float | None
    train_seconds: float | None
    tokens_per_s: float | None
    peak_memory_mb: float | None
    memory_source: str | None
    outcomes: Outcomes | None = None
    """Per-example test outcomes of the completed seeds (``attach``); None when the trials stored none."""
    iv: Interval = field(init=False)

    def __post_init__(self) -> None:
        self.attach(self.outcomes)

    def attach(self, outcomes: Outcomes | None) -> None:
        """Use per-example outcomes (when they cover exactly the completed seeds): the interval then includes the
        test set's own sampling error, not only the spread over seeds."""
        if outcomes is not None and list(outcomes.seeds) != list(self.test_seeds):
            outcomes = None
        self.outcomes = outcomes
        if self.test_values:
            self.iv = interval(mean_estimate(self.test_values, outcomes, log_scale=self.metric in LOG_METRICS))
        else:
            self.iv = Interval(self.test_mean, None, 0) if self.test_mean is not None else None

    def arm(self) -> Arm:
        """The group as comparisons see it."""
        return Arm(self.group, self.val_mean, dict(zip(self.test_seeds, self.test_values, strict=True)),
                   self.outcomes)

    def score(self) -> float:
        """Larger is better, whatever the metric's direction (for sorting)."""
        return self.test_mean if self.higher_is_better else -self.test_mean

    @property
    def shown(self) -> str:
        return fmt_interval(self.iv, self.metric)


@dataclass
class Finding:
    kind: str       # beats | equivalent | inconclusive | single_seed | diverged
    task: str
    dimension: str
    a: str          # beats: the winner; equivalent, inconclusive, single_seed: the reference; diverged: the group
    b: str | None   # the other group (diverged: the learning rate)
    text: str
    numbers: tuple[str, ...] = ()  # the two groups' results, for merged single-seed sentences
    where: str | None = None       # what the sentence says it is about, when not the task and dimension (judged)

    @property
    def key(self) -> tuple[str, str, str, str, str | None]:
        return (self.kind, self.task, self.dimension, self.a, self.b)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    align: list[str] = field(default_factory=list)  # "l" or "r" per column


@dataclass
class Figure:
    path: str       # relative to the guide, e.g. figures/method_sms_spam.png
    alt: str
    caption: str


@dataclass
class Block:
    """A task's part of a section: a figure, a table, sentences."""

    task: str
    title: str
    figure: Figure | None
    table: Table | None
    sentences: list[str]


@dataclass
class Section:
    key: str
    title: str
    about: str
    blocks: list[Block]


@dataclass
class Guide:
    title: str
    random_init: bool
    scope: list[str]
    how_to_read: list[str]
    decisions: Block | None
    summary: list[Block]
    recommendations: dict[str, list[str]]
    across: Block | None
    sections: list[Section]
    pareto: list[Block]
    learning_rate: list[Block]
    judged: JudgedSection | None  # None: no judgments about the reported groups (the section is left out)
    generations: list[GenerationSet]
    reproduce: dict[str, Any]
    findings: list[Finding]
    figures: list[dict[str, Any]]  # what figures.render draws


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def figure_file(*parts: str) -> str:
    """``figures/<parts joined by _>.png``, relative to the guide. The parts come from the database (task names), which
    an older version may have filled with any text: characters outside letters, digits, ``.``, ``_`` and ``-`` become
    ``-``, and a name that had to change gets a short hash of the original, so two names never share a file and none
    leads out of ``figures/``."""
    name = "_".join(parts)
    slug = re.sub(r"-{2,}", "-", _UNSAFE_FILE_CHARS.sub("-", name).replace("..", "-")).strip(".-")[:80]
    if slug != name:
        slug = f"{slug or 'figure'}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f"figures/{slug}.png"


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)


def metric_title(metric: str | None) -> str:
    return METRIC_TITLES.get(metric or "", metric or "metric")


def method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def order_groups(groups: Iterable[Group]) -> list[Group]:
    """Reading order within a dimension: most trainable parameters first, then the study's names."""
    return sorted(groups, key=lambda g: (-(g.trainable_params or 0), method_rank(g.method), g.group))


def _groups(rows: Iterable[dict[str, Any]]) -> list[Group]:
    out = []
    for r in rows:
        r = dict(r)
        r["test_values"] = list(r["test_values"] or [])
        r["test_seeds"] = list(r["test_seeds"] or [])
        out.append(Group(**r))
    return out


def attach_outcomes(con: duckdb.DuckDBPyConnection, groups: Iterable[Group]) -> None:
    """Give every group its per-example test outcomes (the ``predictions`` table; rows come sorted by group)."""
    cols = q.outcome_arrays(con)
    n = len(cols["task"])
    if not n:
        return
    names = [np.asarray(cols[c], dtype=object) for c in ("task", "dimension", "group")]
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for col in names:
        change[1:] |= col[1:] != col[:-1]
    starts = [*np.flatnonzero(change).tolist(), n]
    spans = {(names[0][i], names[1][i], names[2][i]): (i, j) for i, j in itertools.pairwise(starts)}
    for g in groups:
        if (g.task, g.dimension, g.group) in spans:
            i, j = spans[(g.task, g.dimension, g.group)]
            g.attach(outcomes_from_rows(cols["seed"][i:j], cols["example"][i:j], cols["num"][i:j], cols["den"][i:j],
                                        bool(np.all(cols["proportion"][i:j]))))


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


def baseline_rows(row: dict[str, Any]) -> list[tuple[str, str]]:
    """A task's baselines as (name, shown test metric): the majority class, and the model before training."""
    out = []
    if row["n_majority"]:
        out.append(("majority class", fmt_metric(row["majority"], row["metric"])))
    if row["metric"] == "preference_accuracy":
        # before training the policy is its own reference: every implicit reward is 0 and no pair is won, so the
        # step-0 score (0) says nothing; a coin flip's 0.5 is the floor
        out.append(("chance (coin flip per pair)", fmt_metric(0.5, row["metric"])))
    elif row["n_step0"]:
        seeds = row["n_step0_seeds"]
        out.append(("before training (step 0)", f"{fmt_metric(row['step0_mean'], row['metric'])} "
                                                f"(mean of {seeds} seed{'s' if seeds != 1 else ''})"))
    return out


def summary_table(groups: Sequence[Group], verdicts: Sequence[Verdict] = (),
                  baselines: Sequence[tuple[str, str]] = ()) -> Table:
    """A task's main dimension: each group's test metric, how it compares with the best on validation, its cost;
    then the baselines (name, shown metric) any method must beat."""
    metric = metric_title(groups[0].metric)
    rows = []
    for g in groups:
        rows.append([g.group, g.method, fmt_lr(g.lr), g.shown, verdict_cell(g.group, verdicts, g.metric),
                     str(g.n_completed), fmt_count(g.trainable_params), fmt_share(g.trainable_params, g.total_params),
                     fmt_seconds(g.train_seconds), fmt_rate(g.tokens_per_s), fmt_memory(g)])
    for name, shown in baselines:
        rows.append([name, "baseline", "–", shown] + ["–"] * 7)
    return Table(["group", "method", "best LR", f"test {metric} (mean ± 95% CI)", "vs best on validation "
                  f"(difference, {LEVEL:.0%} CI)", "seeds", "trainable", "% of model", "train time", "tokens/s",
                  "memory"], rows, align=["l", "l", "r", "r", "l", "r", "r", "r", "r", "r", "r"])


def dimension_table(groups: Sequence[Group]) -> Table:
    metric = metric_title(groups[0].metric)
    rows = [[g.group, g.method, fmt_lr(g.lr), fmt_metric(g.val_mean, g.metric), g.shown,
             f"{g.n_completed}/{g.n_trials}", fmt_count(g.trainable_params), fmt_seconds(g.train_seconds)]
            for g in groups]
    return Table(["group", "method", "best LR", f"validation {metric}", f"test {metric} (mean ± 95% CI)",
                  "completed", "trainable", "train time"], rows, align=["l", "l", "r", "r", "r", "r", "r", "r"])


def _by_task(items: Iterable[Any]) -> dict[str, list[Any]]:
    """Groups (or query rows) per task, tasks in the guide's reading order (known tasks first, then by name)."""
    out: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        out[item["task"] if isinstance(item, dict) else item.task].append(item)
    order = list(TASK_TITLES)
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def how_to_read(margins: Mapping[str, float] | None = None) -> list[str]:
    """The guide's method notes, with the practical margins it used."""
    used = {**MARGINS, **(margins or {})}
    shown = ", ".join(f"{metric_title(m)} {fmt_margin(v, m)}" for m, v in sorted(used.items())
                      if m not in JUDGED_METRICS)  # the Judged quality section states its own
    return [
        "Each group is reported at its own best learning rate: among the learning rates with no diverged or failed "
        "seed, the one with the best mean validation metric. The test metric is reported there and never used to "
        "choose.",
        f"Intervals are two-sided {LEVEL:.0%} intervals that count both sources of error: the spread over seeds "
        "and the test set's own sampling error (another sample of test examples would give another number). Seeds "
        "and test examples are treated as crossed random factors, variance = s²(seeds)/n + s²(examples)/N, with "
        "the t quantile at n - 1 degrees of freedom (the seed part's: with 2-5 seeds Welch-Satterthwaite's larger "
        "value claimed false differences in simulation); proportions get two pseudo-examples (Agresti-Coull) so an "
        "interval is never ±0. Ignoring the test-set part is what Bouthillier et al. (2021, \"Accounting for "
        "Variance in Machine Learning Benchmarks\") show makes benchmark differences fail to replicate. A "
        "bootstrap is not used: with 2-5 seeds it undercovers (Agarwal et al., 2021, bootstrap over many runs).",
        "Comparisons are paired: seed s gives every group the same data order and head initialisation, and every "
        "group is scored on the same test examples (the predictions table), so each group is compared with the "
        "group that is best on validation on per-seed and per-example differences. P-values are Holm-adjusted "
        "over every pair of groups in a task and dimension, because the reference is chosen on validation and a "
        "lucky seed stays lucky on test; in simulation (python analysis/calibration.py) the procedure claims a "
        "winner in at most 5% of families where all groups are equal. Perplexity is compared on its log, as a "
        "relative difference.",
        f"Three kinds of sentences: 'A beats B by X' (Holm-adjusted p < {1 - LEVEL:.2g}); 'A and B are equivalent "
        f"within ±δ' when the whole {LEVEL:.0%} interval of the difference lies inside the practical margin "
        f"(TOST, Holm-adjusted; margins used here: {shown}; build_guide.py --margin changes them), so the cheaper "
        "one can be taken; otherwise 'inconclusive', with the smallest difference the study can detect "
        "(80% power) and about how many seeds would settle the difference seen. Two groups sharing fewer than two "
        "seeds are not compared.",
        "Memory is each trial's own: on a GPU the CUDA peak allocated by PyTorch (reset at the trial's start), "
        "marked 'CUDA peak'; elsewhere the trial's memory account, marked 'account': weights, gradients, optimizer "
        "state and the activations autograd saves for one training micro-batch, counted from the tensors "
        "(sweeps/memory.py). Train time counts optimizer steps only, without setup and evaluation; tokens/s and "
        "the time Pareto front use it.",
    ]


FINDING_ORDER = {"beats": 0, "equivalent": 1, "inconclusive": 2, "single_seed": 3, "diverged": 4}


def select(con: duckdb.DuckDBPyConnection, sweep_ids: Sequence[str] | None) -> list[str]:
    """The sweeps the guide reports (default: every sweep of the latest sweep's study), selected for the views.
    Raises DatabaseError when there is nothing to report or the choice mixes studies."""
    sweeps_known = q.records(con, q.ALL_SWEEPS)
    if not sweeps_known:
        raise DatabaseError("the database has no sweeps; run python sweeps/launch.py grid first")
    if sweep_ids:
        unknown = sorted(set(sweep_ids) - {s["id"] for s in sweeps_known})
        if unknown:
            raise DatabaseError(f"--sweep: no sweep {', '.join(unknown)} in the database "
                                f"(known: {', '.join(s['id'] for s in sweeps_known)})")
        chosen = list(sweep_ids)
    else:
        study = sweeps_known[-1]["study"]
        chosen = [s["id"] for s in sweeps_known if s["study"] == study]
    studies = sorted({s["study"] for s in sweeps_known if s["id"] in chosen})
    if len(studies) > 1:
        raise DatabaseError(f"--sweep: the sweeps come from different studies ({', '.join(studies)}), which measure "
                            f"different setups; build one guide per study")
    q.select_sweeps(con, chosen)
    if con.execute(q.COMPLETED).fetchone()[0] == 0:
        raise DatabaseError(f"sweep(s) {', '.join(chosen)} have no completed trials yet; nothing to report")
    return chosen


class Findings:
    """Every finding of the guide once, in the order found; ``add`` returns the new ones as sentences."""

    def __init__(self) -> None:
        self.all: list[Finding] = []
        self._seen: set[tuple] = set()

    def add(self, new: Iterable[Finding]) -> list[str]:
        new = list(new)
        for f in new:
            if f.key not in self._seen:
                self._seen.add(f.key)
                self.all.append(f)
        return sentences(new)

    def recommendations(self, tasks: Iterable[str]) -> dict[str, list[str]]:
        """Per task, every finding as a sentence, strongest first."""
        return {task: sentences(sorted((f for f in self.all if f.task == task), key=lambda f: FINDING_ORDER[f.kind]))
                for task in tasks}


def section_specs(dimensions_present: Iterable[str]) -> list[dict[str, Any]]:
    """The shipped sections whose dimension was measured, then one plain section per unknown dimension."""
    present = sorted(set(dimensions_present))
    specs = [s for s in SECTIONS if s["dimension"] in present]
    known = {s["dimension"] for s in SECTIONS}
    return specs + [{"key": d, "dimension": d, "title": f"Dimension: {d}", "about": f"The groups of the {d} dimension."}
                    for d in present if d not in known]


def section(con: duckdb.DuckDBPyConnection, spec: dict[str, Any], all_groups: Sequence[Group], found: Findings,
            figures: list[dict[str, Any]], verdicts: Mapping[tuple[str, str], list[Verdict]]) -> Section | None:
    """One dimension's section: per task a figure, a table and the findings (None when it has nothing to show)."""
    groups = [g for g in all_groups if g.dimension == spec["dimension"]]
    if spec.get("methods"):
        groups = [g for g in groups if g.method in spec["methods"]]
        if not any(g.method == "last_k" for g in groups):
            return None
    curves = q.records(con, q.CURVES, {"dimension": spec["dimension"]})
    lr_rows = q.records(con, q.LR_SWEEP, {"dimension": spec["dimension"]})
    blocks = []
    for task, gs in _by_task(groups).items():
        gs = order_groups(gs)
        names = {g.group for g in gs}
        if spec.get("methods"):  # a narrowed view of a dimension repeats that dimension's findings
            texts = sentences([f for f in found.all if f.task == task and f.dimension == spec["dimension"]
                               and f.a in names and (f.b in names or f.kind == "diverged")])
        else:
            texts = found.add(verdict_findings(task, spec["dimension"], gs,
                                               verdicts.get((task, spec["dimension"]), [])))
            texts += found.add(diverged_findings([r for r in lr_rows if r["task"] == task and r["group"] in names],
                                                 spec["dimension"]))
        fig = {"kind": "dimension", "file": figure_file(spec["key"], task), "task": task,
               "dimension": spec["dimension"],  # the LoRA-rank section draws rank on a numeric axis
               # what one training-loss value averages over: the rows carry no task kind, but the primary metric
               # names it (perplexity: language modelling; preference accuracy: DPO pairs; else classification)
               "loss_per": {"perplexity": "token", "preference_accuracy": "pair"}.get(gs[0].metric, "example"),
               "title": f"{spec['title']}: {task_title(task)}", "groups": gs,
               "curves": [c for c in curves if c["task"] == task and c["group"] in names]}
        figures.append(fig)
        metric = metric_title(gs[0].metric)
        caption = (f"Left: test {metric} at each group's best learning rate, mean and {LEVEL:.0%} interval over "
                   f"seeds and test examples. Right: validation {metric} during training (mean over seeds; a ring "
                   "marks where it peaked: how long training was worth it; dotted, where recorded: the same metric "
                   "on a fixed training subset); dashed: training loss.")
        blocks.append(Block(task, task_title(task), Figure(fig["file"], fig["title"], caption),
                            dimension_table(gs), texts))
    return Section(spec["key"], spec["title"], spec["about"], blocks) if blocks else None


# --------------------------------------------------------------------------------------------------------------------
# The decision table: per task, what to use and the cheapest equivalent, from the comparisons' verdicts only
# --------------------------------------------------------------------------------------------------------------------


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_settings(g: Group, st: Mapping[str, Any] | None) -> str:
    """A group's method settings, learning rate, batch and budget, and where validation peaked."""
    st = st or {}
    if g.method == "lora":
        parts = [f"LoRA r{st.get('lora_rank')}, α {st.get('lora_alpha'):g}" if st.get("lora_alpha") is not None
                 else "LoRA", f"layers {st.get('lora_layers') or 'all'}", f"targets {st.get('lora_targets') or '–'}"]
    elif g.method == "last_k":
        parts = [f"last {st.get('method_k')} blocks"]
    else:
        parts = [g.method]
    parts.append(f"LR {fmt_lr(g.lr)}")
    if st.get("batch_size"):
        parts.append(f"batch {st['batch_size']}")
    if st.get("max_steps"):
        parts.append(f"{st['max_steps']} steps")
    elif st.get("epochs"):
        parts.append(f"{st['epochs']} epoch{'s' if st['epochs'] != 1 else ''}")
    if st.get("best_epoch") is not None:
        parts.append(f"validation peaked at epoch {st['best_epoch']:.1f}")
    return "; ".join(parts)


def _loser(v: Verdict) -> str:
    return v.other if v.winner == v.reference else v.reference


def _partner(v: Verdict, name: str) -> str | None:
    return v.other if v.reference == name else v.reference if v.other == name else None


def _cost(g: Group, st: Mapping[str, Any] | None) -> float:
    """What 'cheaper' means here: the bytes a user keeps, else the trainable parameters."""
    return (st or {}).get("kept_bytes") or g.trainable_params or math.inf


def standing(verdicts: Sequence[Verdict]) -> tuple[list[str], str]:
    """The groups the data lets the guide recommend, and on what ground: the validation pick(s) nothing beats on test,
    else what beats them on test."""
    refs = sorted({v.reference for v in verdicts})
    beaten = {_loser(v) for v in verdicts if v.kind == "beats"}
    up = [r for r in refs if r not in beaten]
    if up:
        return up, "best on validation" if len(refs) == 1 else "tied best on validation"
    winners = sorted({v.winner for v in verdicts if v.kind == "beats" and v.winner not in refs})
    return winners, f"beats the validation pick ({', '.join(refs)}) on test"


def _evidence_cell(name: str, ground: str, verdicts: Sequence[Verdict], metric: str | None) -> str:
    said: dict[str, list[str]] = defaultdict(list)
    for v in verdicts:
        other = _partner(v, name)
        if other is None:
            continue
        if v.kind == "beats":
            said["beats" if v.winner == name else "beaten by"].append(other)
        elif v.kind == "inconclusive":
            said["inconclusive against"].append(f"{other} (detectable: {fmt_detectable(v, metric)})")
        else:
            said[{"equivalent": "equivalent to", "single_seed": "not compared (single seed) with"}[v.kind]].append(
                other)
    text = ground + "".join(f"; {k} {', '.join(vs)}" for k, vs in said.items())
    if set(said) == {"not compared (single seed) with"}:
        return "no conclusion (single seed): " + text
    decided = said.get("beats") or said.get("equivalent to")
    return text if decided or not said.get("inconclusive against") else "inconclusive: " + text


def decide(groups: Sequence[Group], verdicts: Sequence[Verdict], st: Mapping[tuple[str, str, str], Any]
           ) -> list[str]:
    """One task's row of the decision table."""
    g0 = groups[0]
    by = {g.group: g for g in groups}
    cost = {g.group: _cost(g, st.get((g.task, g.dimension, g.group))) for g in groups}
    if not verdicts:
        names, ground = [g.group for g in groups if g.test_values][:1], "the only group with a result"
    else:
        names, ground = standing(verdicts)
    if len(names) > 1:
        tied = {frozenset((v.reference, v.other)) for v in verdicts if v.kind == "equivalent"}
        if all(frozenset(p) in tied for p in itertools.combinations(names, 2)):
            names, ground = [min(names, key=lambda n: (cost[n], n))], f"{ground}, equivalent; the cheapest of them"
        else:
            return [task_title(g0.task), " or ".join(names), "–", "; ".join(by[n].shown for n in names), "–", "–",
                    "–", f"undecided: {' and '.join(names)} are {ground} and their test comparison is not conclusive",
                    "–"]
    if not names:
        return [task_title(g0.task)] + ["–"] * 8
    pick = by[names[0]]
    key = (pick.task, pick.dimension, pick.group)
    equivalents = [_partner(v, pick.group) for v in verdicts if v.kind == "equivalent" and _partner(v, pick.group)]
    cheaper = [n for n in equivalents if cost[n] < cost[pick.group]]
    if cheaper:
        c = by[min(cheaper, key=lambda n: (cost[n], n))]
        ckey = (c.task, c.dimension, c.group)
        alt = (f"{c.group}: {c.shown}, keeps {fmt_bytes((st.get(ckey) or {}).get('kept_bytes'))}, "
               f"{fmt_seconds(c.train_seconds)}, {fmt_memory(c)}; equivalent within "
               f"{fmt_margin(_margin(next(v for v in verdicts if v.kind == 'equivalent'), c.metric), c.metric)}")
    else:
        alt = "– (nothing cheaper is shown equivalent)"
    return [task_title(pick.task), pick.group, fmt_settings(pick, st.get(key)), pick.shown,
            fmt_seconds(pick.train_seconds), fmt_memory(pick), fmt_bytes((st.get(key) or {}).get("kept_bytes")),
            _evidence_cell(pick.group, ground, verdicts, pick.metric), alt]


def decisions(all_groups: Sequence[Group], main: Mapping[str, str],
              verdicts: Mapping[tuple[str, str], Sequence[Verdict]], st: Mapping[tuple[str, str, str], Any]
              ) -> Block | None:
    """Per task: the recommended configuration of its main dimension, its expected test metric and cost, the claims
    behind it, and the cheapest configuration the data shows equivalent; then, per other dimension, what its
    comparisons found (rank, layers, optimizer, ...). Nothing is chosen on test except through the verdicts."""
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in all_groups:
        families[(g.task, g.dimension)].append(g)
    rows, lines = [], []
    for task in _by_task(all_groups):
        rows.append(decide(order_groups(families[(task, main[task])]), verdicts.get((task, main[task]), []), st))
        for (t, dim), gs in sorted(families.items()):
            if t == task and dim != main[task] and verdicts.get((t, dim)):
                lines.append(_across_sentence(task, gs, verdicts[(t, dim)], lead=f"{task}, {dim}: "))
    if not rows:
        return None
    table = Table(["task", "use", "settings", "expected test metric (95% CI)", "train time", "memory", "you keep",
                   "why (Holm-adjusted comparisons)", "cheapest equivalent"], rows,
                  align=["l", "l", "l", "r", "r", "r", "r", "l", "l"])
    return Block("all", "What to use", None, table, lines)


def main_rows(main: Mapping[str, str], fetch: Callable[[str], list[Row]]) -> list[Row]:
    """The rows (typed, with a ``task``) of a per-dimension query, ``fetch(dimension)``, for each task's main
    dimension."""
    rows: list[Row] = []
    for dimension in sorted(set(main.values())):
        rows += [r for r in fetch(dimension) if main.get(r.task) == dimension]
    return rows


def scope(con: duckdb.DuckDBPyConnection, sweeps: Sequence[dict[str, Any]], inits: dict[str, int],
          tasks: Iterable[str]) -> list[str]:
    """What the guide covers: study, sweeps, trials, model and its initialisation, tasks."""
    total = sum(s["completed"] + s["diverged"] + s["failed"] + s["stopped"] + s["unfinished"] for s in sweeps)
    completed = sum(s["completed"] for s in sweeps)
    model_text = ", ".join(f"{m['model']} ({m['model_n_layer'] or 'preset'} layers)" if m["model_n_layer"]
                           else m["model"] for m in q.records(con, q.MODELS))
    sources = [f"{r['task']} read **{r['used']}** in {r['trials']} trials (configured: {r['configured']}"
               + (f"; {r['fallback']}" if r["fallback"] else "") + ")" for r in q.records(con, q.DATA_SOURCES)]
    return [f"Study **{sweeps[0]['study']}**: {len(sweeps)} sweep(s), {total} trials, {completed} completed.",
            f"Model: {model_text}; initialisation: {', '.join(f'{k} ({v} trials)' for k, v in inits.items())}.",
            f"Tasks: {', '.join(task_title(t) for t in tasks)}."] + ([f"Data: {'; '.join(sources)}."] if sources
                                                                      else [])


def reproduce(con: duckdb.DuckDBPyConnection, sweeps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The Reproduce section: the sweeps' provenance and every trial that did not complete."""
    problems = q.records(con, q.PROBLEM_TRIALS)
    rows = [[p["status"], p["task"], p["dimension"], p["group"], fmt_lr(p["lr"]), str(p["seed"]),
             str(p["steps"] if p["steps"] is not None else "–"), p["id"], p["error"] or ""] for p in problems]
    return {"sweeps": [_sweep_view(s) for s in sweeps], "problems": problems,
            "problem_table": Table(["status", "task", "dimension", "group", "LR", "seed", "steps", "trial", "error"],
                                   rows)}


def collect(con: duckdb.DuckDBPyConnection, sweep_ids: Sequence[str] | None = None,
            margins: Mapping[str, float] | None = None) -> Guide:
    """Everything the guide says, from the database (``margins``: practical margins per metric, over
    ``stats.MARGINS``). Raises DatabaseError when there is nothing to report."""
    select(con, sweep_ids)
    inits = {r["model_init"]: r["trials"] for r in q.records(con, q.MODEL_INITS)}
    sweeps = q.records(con, q.SWEEPS)
    figures: list[dict[str, Any]] = []
    found = Findings()

    # Summary: per task, the groups of its main dimension (`method`; `dpo` for preference pairs; else its first)
    all_groups = _groups(q.records(con, q.BEST_ALL))
    attach_outcomes(con, all_groups)
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in all_groups:
        families[(g.task, g.dimension)].append(g)
    verdicts = {key: family_verdicts(gs, margins) for key, gs in families.items()}
    main = main_dimensions(all_groups)
    main_groups = [g for g in all_groups if g.dimension == main[g.task]]
    floors = {r["task"]: baseline_rows(r) for r in q.baselines(con) if r["dimension"] == main.get(r["task"])}
    summary = [Block(task, task_title(task), None,
                     summary_table(order_groups(gs), verdicts.get((task, main[task]), []), floors.get(task, [])), [])
               for task, gs in _by_task(main_groups).items()]
    sections = [s for spec in section_specs(g.dimension for g in all_groups)
                if (s := section(con, spec, all_groups, found, figures, verdicts)) is not None]
    tasks = list(_by_task(all_groups))
    return Guide(
        title="Fine-tuning GPT-2: a measured guide", random_init="random" in inits,
        scope=scope(con, sweeps, inits, tasks), how_to_read=how_to_read(margins),
        decisions=decisions(all_groups, main, verdicts, q.settings(con)), summary=summary,
        recommendations=found.recommendations(tasks), across=across_tasks(main_groups, figures, verdicts),
        sections=sections, pareto=pareto_blocks(main_groups, figures),
        learning_rate=lr_blocks(q.records(con, q.LR_SWEEP_ALL), figures, main,
                                lr_ratios(q.records(con, q.LR_BY_SEED), main)),
        judged=judged_section(con, main, main_groups, margins),
        generations=generation_sets(main_rows(main, lambda d: q.generations(con, d, SIDE_BY_SIDE_PROMPTS))
                                    if q.has_relation(con, "generations") else []),
        reproduce=reproduce(con, sweeps), findings=found.all, figures=figures)


def _sweep_view(s: dict[str, Any]) -> dict[str, Any]:
    versions = json.loads(s["package_versions"]) if s["package_versions"] else {}
    hardware = json.loads(s["hardware"]) if s["hardware"] else {}
    return {**s, "versions": ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
            "hardware_text": ", ".join(f"{k}: {v}" for k, v in hardware.items()),
            "started": f"{s['started_at']:%Y-%m-%d %H:%M}" if s["started_at"] else "–",
            "ended": f"{s['ended_at']:%Y-%m-%d %H:%M}" if s["ended_at"] else "not ended"}


def main_dimensions(groups: Iterable[Group]) -> dict[str, str]:
    """Each task's main dimension: ``method`` when measured, else ``dpo``, else the first one (e.g. ``search``)."""
    found: dict[str, set[str]] = defaultdict(set)
    for g in groups:
        found[g.task].add(g.dimension)
    return {task: next((d for d in ("method", "dpo") if d in dims), min(dims)) for task, dims in found.items()}


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


def across_tasks(method_groups: Sequence[Group], figures: list[dict[str, Any]],
                 verdicts: Mapping[tuple[str, str], Sequence[Verdict]]) -> Block | None:
    """Each main-dimension group on every task, marked by how it compares with the task's best on validation."""
    by_task = _by_task(method_groups)
    if not by_task:
        return None
    names = [g.group for g in order_groups({g.group: g for g in method_groups}.values())]
    rows, sentences = [], []
    marks: dict[tuple[str, str], str] = {}
    for task, gs in by_task.items():
        found = verdicts.get((task, gs[0].dimension), [])
        if found:
            marks.update(_across_marks(task, found))
            sentences.append(_across_sentence(task, gs, found))
    for name in names:
        row = [name]
        for task, gs in by_task.items():
            g = next((g for g in gs if g.group == name), None)
            row.append("–" if g is None else g.shown + marks.get((task, name), ""))
        rows.append(row)
    columns = ["group"] + [f"{t} ({metric_title(gs[0].metric)})" for t, gs in by_task.items()]
    fig = {"kind": "across", "file": "figures/across_tasks.png", "title": "Methods across tasks",
           "by_task": by_task, "names": names}
    figures.append(fig)
    return Block("all", "Across tasks", Figure(fig["file"], fig["title"],
                                              f"Each method at its best learning rate on every task, mean and "
                                              f"{LEVEL:.0%} interval over seeds and test examples."),
                 Table(columns, rows, align=["l"] + ["r"] * len(by_task)), sentences)


def pareto_blocks(groups: Sequence[Group], figures: list[dict[str, Any]]) -> list[Block]:
    """Per task, the groups no other group beats on both metric and a cost, for three costs."""
    blocks = []
    for task, gs in _by_task(groups).items():
        gs = [g for g in gs if g.test_mean is not None]
        if not gs:
            continue
        hib = gs[0].higher_is_better
        sentences, fronts = [], {}
        for axis, label in (("trainable_params", "trainable parameters"), ("train_seconds", "training time"),
                            ("peak_memory_mb", "memory")):
            usable = [g for g in gs if getattr(g, axis)]
            front = [usable[i] for i in pareto_front([(getattr(g, axis), g.test_mean) for g in usable], hib)]
            fronts[axis] = [g.group for g in front]
            if front:
                sentences.append(f"Best {metric_title(gs[0].metric)} for its {label}: "
                                 f"{', '.join(f'{g.group} ({fmt_metric(g.test_mean, g.metric)})' for g in front)}.")
        fig = {"kind": "pareto", "file": figure_file("pareto", task), "task": task,
               "title": f"Pareto fronts: {task_title(task)}", "groups": gs, "fronts": fronts}
        figures.append(fig)
        blocks.append(Block(task, task_title(task),
                            Figure(fig["file"], fig["title"],
                                   f"Test {metric_title(gs[0].metric)} (mean over seeds; bars: {LEVEL:.0%} interval "
                                   "over seeds and test examples) "
                                   "against cost; the line joins the groups no other group beats on both axes. Log "
                                   "axes for parameters and time."),
                            None, sentences))
    return blocks


def _grid_edge(lrs: Sequence[dict[str, Any]], best: dict[str, Any]) -> str | None:
    """``lowest``/``highest`` when the best learning rate is at that end of the group's grid (several tried): the
    metric may still improve beyond it, so the optimum may lie outside the grid."""
    tried = sorted({r["lr"] for r in lrs})
    if len(tried) < 2:
        return None
    return "lowest" if best["lr"] == tried[0] else "highest" if best["lr"] == tried[-1] else None


def _lr_group(task: str, name: str, lrs: Sequence[dict[str, Any]], metric: str | None,
              hib: bool | None) -> tuple[list[str], list[str]]:
    """One group's row of the learning-rate table and its sentences (best LR, sensitivity, an edge-of-grid best)."""
    ok = [r for r in lrs if r["val_mean"] is not None and not r["n_diverged"] and not r["n_other"]]
    tried = ", ".join(fmt_lr(r["lr"]) for r in lrs)
    if not ok:
        return [name, tried, "–", "–", "–", "no learning rate completed every seed"], []
    best = (max if hib else min)(ok, key=lambda r: r["val_mean"])
    worst = (min if hib else max)(ok, key=lambda r: r["val_mean"])
    extra = "".join(f"; at {fmt_lr(r['lr'])} " + " and ".join(
        part for part in (f"{r['n_diverged']} of {r['n_trials']} seeds diverged" if r["n_diverged"] else "",
                          f"{r['n_other']} of {r['n_trials']} failed or did not finish" if r["n_other"]
                          else "") if part)
        for r in lrs if r not in ok)
    if len(ok) == 1:
        note = "one learning rate completed every seed: sensitivity not measured" + extra
    else:
        spread = fmt_metric(abs(best["val_mean"] - worst["val_mean"]), metric)
        note = f"validation {metric_title(metric)} moves by {spread} across {len(ok)} learning rates" + extra
    sentences = [f"{name} on {task}: best learning rate {fmt_lr(best['lr'])}; {note}."] if len(lrs) > 1 else []
    edge = _grid_edge(lrs, best)
    if edge:
        side = "below" if edge == "lowest" else "above"
        note += f"; best at the grid's {edge} learning rate ({fmt_lr(best['lr'])}): the optimum may lie {side} the grid"
        sentences.append(f"{name} on {task}: the best learning rate, {fmt_lr(best['lr'])}, is the {edge} one tried, "
                         f"so the optimum may lie outside the grid ({side} {fmt_lr(best['lr'])}); extend the grid "
                         f"{side} it to find out.")
    return [name, tried, fmt_lr(best["lr"]), fmt_metric(best["val_mean"], metric),
            fmt_metric(worst["val_mean"], metric), note], sentences


def best_lr_per_seed(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, float]]:
    """Per (task, dimension, group) and seed, the learning rate with the best validation metric of that seed."""
    best: dict[tuple[str, str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
    for r in rows:
        score = r["val"] if r["higher_is_better"] else -r["val"]
        seeds = best[(r["task"], r["dimension"], r["group"])]
        if r["seed"] not in seeds or score > seeds[r["seed"]][0]:
            seeds[r["seed"]] = (score, r["lr"])
    return {k: {seed: lr for seed, (_, lr) in v.items()} for k, v in best.items()}


def lr_ratios(rows: Sequence[dict[str, Any]], main: Mapping[str, str]) -> dict[str, list[str]]:
    """Per task, the measured ratio of each LoRA group's best learning rate to full fine-tuning's in the task's main
    dimension: per seed (each chosen on that seed's validation), and their geometric mean."""
    methods = {(r["task"], r["dimension"], r["group"]): r["method"] for r in rows}
    grids: dict[tuple[str, str, str], set[float]] = defaultdict(set)
    for r in rows:
        grids[(r["task"], r["dimension"], r["group"])].add(r["lr"])
    best = best_lr_per_seed(rows)
    out: dict[str, list[str]] = defaultdict(list)
    for (task, dim, group), seeds in best.items():
        if dim != main.get(task) or methods[(task, dim, group)] != "lora" or len(grids[(task, dim, group)]) < 2:
            continue
        for (t2, d2, full), full_seeds in best.items():
            if (t2, d2) != (task, dim) or methods[(t2, d2, full)] != "full" or len(grids[(t2, d2, full)]) < 2:
                continue
            shared = sorted(set(seeds) & set(full_seeds))
            if not shared:
                continue
            ratios = [seeds[s] / full_seeds[s] for s in shared]
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            out[task].append(f"On {task}, {group}'s best learning rate is {geo:.3g}× {full}'s (geometric mean over "
                             f"{len(shared)} seed{'s' if len(shared) != 1 else ''}; per seed "
                             f"{', '.join(f'{x:.3g}×' for x in ratios)}), each chosen on that seed's validation "
                             "metric.")
    return out


def lr_blocks(rows: Sequence[dict[str, Any]], figures: list[dict[str, Any]], main: Mapping[str, str] | None = None,
              ratios: Mapping[str, list[str]] | None = None) -> list[Block]:
    """Per task, every group's best learning rate and how much the metric moves across the grid (groups of other
    dimensions than the task's main one are named ``dimension/group``), with a figure of the main dimension and the
    measured ratio of LoRA's best learning rate to full fine-tuning's."""
    blocks = []
    for task, rs in _by_task(rows).items():
        metric = next((r["metric"] for r in rs if r["metric"]), None)
        hib = next((r["higher_is_better"] for r in rs if r["higher_is_better"] is not None), None)
        table_rows, sentences = [], list((ratios or {}).get(task, []))
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        home = (main or {}).get(task)
        for r in rs:
            dim = r.get("dimension", home)
            groups[r["group"] if dim == home else f"{dim}/{r['group']}"].append(r)
        for name, lrs in groups.items():
            row, said = _lr_group(task, name, lrs, metric, hib)
            table_rows.append(row)
            sentences += said
        shown = [r for r in rs if r.get("dimension", home) == home]
        fig = {"kind": "lr", "file": figure_file("lr", task), "task": task, "metric": metric,
               "higher_is_better": hib,
               "title": f"Learning rate: {task_title(task)}", "rows": shown}
        figures.append(fig)
        blocks.append(Block(task, task_title(task),
                            Figure(fig["file"], fig["title"],
                                   f"Top: validation {metric_title(metric)} (mean over completed seeds; it chooses the "
                                   f"best learning rate) at every learning rate tried, per group; hollow where some "
                                   f"seeds did not complete. Middle: test {metric_title(metric)}, mean ± 1 SD over "
                                   "seeds. Bottom band: learning rates where seeds diverged (cross) or failed (square), "
                                   "with how many."),
                            Table(["group", "learning rates tried", "best LR", f"validation {metric_title(metric)}",
                                   "worst completed", "sensitivity"], table_rows,
                                  align=["l", "l", "r", "r", "r", "l"]),
                            sentences))
    return blocks


@dataclass
class PromptOutputs:
    """One prompt side by side: each group's answer as (group, seed, text)."""

    example: int
    prompt: str
    reference: str
    outputs: list[tuple[str, int, str]]


@dataclass
class GenerationSet:
    task: str
    title: str
    prompts: list[PromptOutputs]


def generation_sets(rows: Sequence[q.GenerationRow], prompts: int = SIDE_BY_SIDE_PROMPTS) -> list[GenerationSet]:
    """Per task, the first ``prompts`` kept prompts (by test index: the same prompt in every group), one answer per
    group (its lowest seed)."""
    out = []
    for task, rs in _by_task(rows).items():
        groups = list(dict.fromkeys((r.group, r.seed) for r in rs))
        by = {(r.group, r.example): r for r in rs}
        shown = []
        for example in sorted({r.example for r in rs})[:prompts]:
            first = next(r for r in rs if r.example == example)
            shown.append(PromptOutputs(example, first.prompt, first.reference or "",
                                       [(g, seed, by[(g, example)].response if (g, example) in by else "")
                                        for g, seed in groups]))
        out.append(GenerationSet(task, task_title(task), shown))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Judged quality: what an LLM judge says about the kept generations (analysis/judge.py fills the judgments table)
# --------------------------------------------------------------------------------------------------------------------

OPPONENTS = {"reference": "the dataset's reference answer",
             "start": "the model the trial started from (its own greedy answer to the same prompt)"}
JUDGED_EXAMPLES = 2  # judged prompts shown side by side per judge and task
CLIP_CHARS = 400     # a judged example's texts are cut here: the section shows what was judged, not whole answers
VERDICTS = {1.0: "win", 0.5: "tie (the two orders disagreed)", 0.0: "loss"}


@dataclass
class JudgedOutput:
    """One group's answer to a judged prompt, from its lowest seed, with what the judge made of it."""

    group: str
    seed: int
    response: str
    score: str      # the judged score, or "–"
    verdict: str    # win / tie / loss against the opponent, or "–"


@dataclass
class JudgedExample:
    example: int
    prompt: str
    reference: str
    outputs: list[JudgedOutput]


@dataclass
class JudgeBlock:
    """One judge (model and rubric version) on one task: how its requests ended, one block per judged metric (a table
    and its sentences), and a few judged prompts side by side."""

    task: str
    title: str
    notes: list[str]
    metrics: list[Block]
    examples: list[JudgedExample]


@dataclass
class JudgedSection:
    about: list[str]
    blocks: list[JudgeBlock]


@dataclass
class JudgedFamily:
    """One judged metric over a task's groups: each group as a ``Group`` of that metric (per seed its mean over the
    compared prompts, with those outcomes, so intervals and verdicts are the test metrics' own), the verdicts, and
    the rows of the compared prompts."""

    metric: str
    groups: list[Group]
    verdicts: list[Verdict]
    examples: np.ndarray
    rows: list[q.JudgedRow]
    judged: int  # prompts with any read reply, compared or not


def clip(text: str | None, limit: int = CLIP_CHARS) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def _judged_seeds(groups: Sequence[Group], rows: Sequence[q.JudgedRow]) -> dict[str, list[int]]:
    """Per group, its completed seeds with any judged prompt (a seed the judge never saw cannot be paired)."""
    seen: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        seen[r.group].add(r.seed)
    return {g.group: sorted(seen[g.group] & set(g.test_seeds)) for g in groups if seen[g.group] & set(g.test_seeds)}


def judged_family(metric: str, groups: Sequence[Group], rows: Sequence[q.JudgedRow],
                  margins: Mapping[str, float] | None = None) -> JudgedFamily:
    """The groups' judged ``metric`` over the prompts every judged seed of every group has a read reply for (so every
    comparison is paired on the same prompts), compared like the test metric: the reference is the group best on
    *validation* of the task's primary metric (negated when lower is better, so higher is better throughout)."""
    seeds = _judged_seeds(groups, rows)
    cells: dict[tuple[str, int], set[int]] = defaultdict(set)
    for r in rows:
        cells[(r.group, r.seed)].add(r.example)
    shared = set.intersection(*(cells[(g, s)] for g, ss in seeds.items() for s in ss)) if seeds else set()
    examples = np.array(sorted(shared), dtype=int)
    kept = [r for r in rows if r.group in seeds and r.seed in seeds[r.group] and r.example in shared]
    judged_prompts = len({r.example for r in rows})
    if not len(examples):
        return JudgedFamily(metric, [], [], examples, [], judged_prompts)
    value = {(r.group, r.seed, r.example): r.value for r in kept}
    judged = []
    for g in (g for g in groups if g.group in seeds):
        ss = seeds[g.group]
        num = np.array([[value[(g.group, s, e)] for e in examples] for s in ss], dtype=float)
        outcomes = Outcomes(tuple(ss), examples, num, np.ones_like(num), proportion=metric == "win_rate")
        per_seed = outcomes.per_seed().tolist()
        val = g.val_mean if g.val_mean is None or g.higher_is_better else -g.val_mean
        judged.append(replace(g, metric=metric, higher_is_better=True, val_mean=val,
                              test_mean=float(np.mean(per_seed)),
                              test_sd=float(np.std(per_seed, ddof=1)) if len(ss) > 1 else None,
                              test_values=per_seed, test_seeds=ss, outcomes=outcomes))
    return JudgedFamily(metric, judged, family_verdicts(judged, margins), examples, kept, judged_prompts)


def agreement(family: JudgedFamily, primary: Mapping[str, Group]) -> str:
    """How the judge's ranking of the groups agrees with the task's primary test metric (Spearman's ρ), oriented so
    that a positive ρ means agreement whichever way the metric points."""
    title = metric_title(family.metric)
    pairs = [(j.test_mean, primary[j.group]) for j in family.groups if primary[j.group].test_mean is not None]
    if not pairs:
        return f"No judged group has a test {title}: no agreement to report."
    ref = pairs[0][1]
    what = f"test {metric_title(ref.metric)}"
    if len(pairs) < 3:
        return (f"Agreement of the {title} with {what}: {len(pairs)} group{'s are' if len(pairs) != 1 else ' is'} "
                "too few to rank (a rank correlation needs at least 3).")
    judged = [x for x, _ in pairs]
    test = [g.test_mean if g.higher_is_better else -g.test_mean for _, g in pairs]
    if len(set(judged)) == 1 or len(set(test)) == 1:
        return (f"Agreement of the {title} with {what}: undefined, every group has the same "
                f"{title if len(set(judged)) == 1 else what}.")
    rho = float(spearmanr(judged, test)[0])
    direction = "" if ref.higher_is_better else (
        f"; {metric_title(ref.metric)} is lower-is-better, so it is ranked reversed: a positive ρ means the judge "
        f"prefers the groups with lower {metric_title(ref.metric)}")
    reading = ("the same order" if math.isclose(rho, 1) else "the opposite order" if math.isclose(rho, -1) else
               "mostly the same order" if rho > 0 else "mostly the opposite order" if rho < 0 else "unrelated orders")
    shown = f"{rho:+.2f}".replace("-", "−")
    return (f"Agreement of the {title} with {what}: Spearman ρ = {shown} over {len(pairs)} groups ({reading}"
            f"{direction}). It describes this study's {len(pairs)} group means only; with so few groups it is no "
            "test of agreement in general.")


def _pairwise_counts(family: JudgedFamily, group: str) -> tuple[str, str]:
    """A group's wins / ties / losses over its compared seeds and prompts, and the share where the order changed
    the verdict (the judge's position bias on this group's answers)."""
    rows = [r for r in family.rows if r.group == group]
    counts = {v: sum(r.value == v for r in rows) for v in (1.0, 0.5, 0.0)}
    changed = sum(bool(r.order_changed) for r in rows)
    return f"{counts[1.0]} / {counts[0.5]} / {counts[0.0]}", f"{fmt_share(changed, len(rows))} ({changed} of {len(rows)})"


def order_effect(family: JudgedFamily) -> str:
    """How often swapping the order changed the pairwise verdict, over every compared group, seed and prompt: the
    judge's position bias, which makes its win rates say little when it is large."""
    changed = sum(bool(r.order_changed) for r in family.rows)
    text = (f"Swapping the order of the two answers changed the verdict on {fmt_share(changed, len(family.rows))} of "
            f"the compared pairs ({changed} of {len(family.rows)}, every group, seed and prompt)")
    if 2 * changed >= len(family.rows):
        return text + (": at least half the verdicts follow the position shown rather than the answer, so these win "
                       "rates say little about quality.")
    return text + "; each such pair counts as a tie."


def judged_table(family: JudgedFamily, primary: Mapping[str, Group], opponent: str | None) -> Table:
    """Per group: its judged metric with its interval, how it compares with the group best on validation, and its
    primary test metric beside it; for win rates the wins, ties, losses and the order effect."""
    columns = ["group", "method", "best LR", "judged seeds",
               "judged score, 0-100 (mean ± 95% CI)" if family.metric == "judge_score" else
               f"win rate against {'the reference' if opponent == 'reference' else 'its start'} (mean ± 95% CI)",
               f"vs best on validation (difference, {LEVEL:.0%} CI)"]
    align = ["l", "l", "r", "r", "r", "l"]
    if family.metric == "win_rate":
        columns += ["wins / ties / losses", "order changed the verdict"]
        align += ["r", "r"]
    columns.append(f"test {metric_title(primary[family.groups[0].group].metric)} (mean ± 95% CI)")
    align.append("r")
    rows = []
    for j in family.groups:
        g = primary[j.group]
        row = [j.group, j.method, fmt_lr(j.lr), f"{len(j.test_seeds)} of {g.n_completed}", j.shown,
               verdict_cell(j.group, family.verdicts, family.metric)]
        if family.metric == "win_rate":
            row += list(_pairwise_counts(family, j.group))
        rows.append([*row, g.shown])
    return Table(columns, rows, align=align)


def judged_block(task: str, family: JudgedFamily, primary: Mapping[str, Group], opponent: str | None,
                 margins: Mapping[str, float] | None = None) -> Block:
    """One judged metric of one judge on one task: the table, the verdicts worded like the test metric's, the
    margin they used, and how the judge's ranking agrees with the primary metric's."""
    title = metric_title(family.metric)
    heading = ("Judged score (0-100)" if family.metric == "judge_score"
               else f"Win rate against {OPPONENTS.get(opponent or '', opponent or 'an opponent')}")
    read = "score" if family.metric == "judge_score" else "verdict in both orders"
    if not family.groups:
        return Block(task, heading, None, None, [
            f"No prompt has a read {read} for every judged seed of every group, so nothing is compared (the "
            "counts above say how the requests ended)."])
    said = [f"Compared on the {len(family.examples)} prompts that every judged seed of all {len(family.groups)} "
            f"group{'s' if len(family.groups) != 1 else ''} has a read {read} for (of {family.judged} with any)."]
    if family.metric == "win_rate":
        said.append(order_effect(family))
    if len(family.groups) < 2:
        said.append(f"Only {family.groups[0].group} was judged: nothing to compare.")
    else:
        margin = {**MARGINS, **(margins or {})}.get(family.metric, 0.0)
        said += sentences(verdict_findings(task, family.groups[0].dimension, family.groups, family.verdicts,
                                           where=f"on {task} ({title})"))
        said.append(f"Equivalence on the {title} means within {fmt_margin(margin, family.metric)} "
                    f"(build_guide.py --margin {family.metric}=VALUE changes it).")
    said.append(agreement(family, primary))
    return Block(task, heading, None, judged_table(family, primary, opponent), said)


def request_notes(requests: Sequence[q.JudgeRequests]) -> list[str]:
    """How one judge's requests ended, per mode: read, unparsed, failed (those are counted, never scored)."""
    notes = []
    for r in requests:
        what = ("Score requests" if r.mode == "score" else
                f"Pairwise requests (two per prompt, against {OPPONENTS.get(r.opponent or '', r.opponent)})")
        notes.append(f"{what}: {r.requests:,} about {r.trials} trial{'s' if r.trials != 1 else ''}; {r.ok:,} read, "
                     f"{r.unparsed:,} could not be parsed, {r.failed:,} failed after retries"
                     + (f"; {r.cached:,} reused from the cache" if r.cached else "") + ".")
    return notes


def judged_examples(family: JudgedFamily | None, scores: Sequence[q.JudgedRow], pairs: Sequence[q.JudgedRow],
                    gens: Sequence[q.GenerationRow]) -> list[JudgedExample]:
    """The first ``JUDGED_EXAMPLES`` compared prompts (by index, not chosen by outcome): each group's answer from its
    lowest seed that kept one, with that seed's score and pairwise verdict."""
    if family is None or not family.groups:
        return []
    score = {(r.group, r.seed, r.example): r.value for r in scores}
    verdict = {(r.group, r.seed, r.example): r.value for r in pairs}
    answer = {(r.group, r.example): r for r in gens}
    out = []
    for example in family.examples[:JUDGED_EXAMPLES].tolist():
        shown = [answer[(g.group, example)] for g in family.groups if (g.group, example) in answer]
        if not shown:
            continue
        outputs = [JudgedOutput(a.group, a.seed, clip(a.response),
                                f"{score[k]:g}" if (k := (a.group, a.seed, example)) in score else "–",
                                VERDICTS.get(verdict[k], "–") if k in verdict else "–") for a in shown]
        out.append(JudgedExample(example, clip(shown[0].prompt), clip(shown[0].reference), outputs))
    return out


def judge_block(groups: Sequence[Group], requests: Sequence[q.JudgeRequests], scores: Sequence[q.JudgedRow],
                pairs: Sequence[q.JudgedRow], gens: Sequence[q.GenerationRow],
                margins: Mapping[str, float] | None = None) -> JudgeBlock:
    """One judge and rubric on one task's main-dimension groups (``groups``, in reading order)."""
    task, judge, rubric = requests[0].task, requests[0].judge_model, requests[0].rubric_version
    primary = {g.group: g for g in groups}
    opponent = next((r.opponent for r in requests if r.mode == "pairwise"), None)
    families = [judged_family(metric, groups, rows, margins)
                for metric, rows in (("judge_score", scores), ("win_rate", pairs)) if rows]
    notes = request_notes(requests)
    if not families:
        notes.append("No reply was read: there is nothing to report beyond these counts.")
    return JudgeBlock(task, f"{task_title(task)}: judged by {judge} (rubric version {rubric})", notes,
                      [judged_block(task, f, primary, opponent, margins) for f in families],
                      judged_examples(next((f for f in families if f.groups), None), scores, pairs, gens))


def judged_about(margins: Mapping[str, float] | None = None) -> list[str]:
    """What the Judged quality section measures and how to read it, with the margins it used."""
    used = {**MARGINS, **(margins or {})}
    return [
        "An LLM judge (python analysis/judge.py) read the greedy answers the trials kept on fixed test prompts: "
        "every completed seed of each group of the Summary, at its chosen learning rate. The judge is a model "
        "too: its numbers say how that judge, with that rubric, rates the answers; they are no ground truth, and "
        "What to use does not read them.",
        "Judged score: the judge rates each answer 0-100 given the prompt and the reference answer. Win rate: the "
        "judge compares the answer with an opponent twice, the answer shown first and then second; a prompt is a "
        "win (1) only when both orders prefer the answer, a loss (0) when both prefer the opponent, else a tie "
        "(0.5). The share of prompts where swapping the order changed the verdict measures the judge's position "
        "bias: a judge that always picks the first answer ties every prompt (100%).",
        "Intervals and comparisons are the test metrics' (How to read): seeds and judged prompts as crossed random "
        "factors, paired over seeds and prompts, Holm-adjusted, each group against the group best on validation of "
        "the task's primary metric. Only prompts for which every judged seed of every group has a read reply are "
        "used, so all groups are judged on the same prompts; replies that could not be parsed and requests that "
        "failed are counted, never scored. Equivalence margins: "
        f"{fmt_margin(used['judge_score'], 'judge_score')} and {fmt_margin(used['win_rate'], 'win_rate')}.",
    ]


def judged_section(con: duckdb.DuckDBPyConnection, main: Mapping[str, str], main_groups: Sequence[Group],
                   margins: Mapping[str, float] | None = None) -> JudgedSection | None:
    """Per task and judge (model, rubric version), what the judge says about the main dimension's groups; None when
    nothing about them was judged (or the database predates the judge), and the guide leaves the section out."""
    if not q.has_relation(con, "judgments"):
        return None
    requests = main_rows(main, lambda d: q.judge_requests(con, d))
    if not requests:
        return None
    scores = main_rows(main, lambda d: q.judged_scores(con, d))
    pairs = main_rows(main, lambda d: q.judged_pairs(con, d))
    gens = main_rows(main, lambda d: q.generations(con, d, None)) if q.has_relation(con, "generations") else []
    by_task = _by_task(main_groups)
    blocks = []
    for task, asked in _by_task(requests).items():
        for judge in dict.fromkeys((r.judge_model, r.rubric_version) for r in asked):
            def mine(rows: Sequence[Row], task: str = task, judge: tuple[str, str] = judge) -> list[Row]:
                return [r for r in rows if (r.task, r.judge_model, r.rubric_version) == (task, *judge)]
            blocks.append(judge_block(order_groups(by_task[task]), mine(asked), mine(scores), mine(pairs),
                                      [g for g in gens if g.task == task], margins))
    return JudgedSection(judged_about(margins), blocks)
