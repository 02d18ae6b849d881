"""The guide's shared vocabulary: constants, the one place numbers become text, the content dataclasses
(``Group``, ``Finding``, ``Table``, ``Block``, ``Section``, ``Guide``), names and reading order, groups from rows."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import duckdb
import numpy as np

from analysis import queries as q
from analysis.compare import Arm
from analysis.stats import (
    LOG_METRICS,
    Interval,
    Outcomes,
    interval,
    mean_estimate,
    outcomes_from_rows,
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
    {"key": "lora_variant", "dimension": "lora_variant", "title": "LoRA variants",
     "about": "Plain LoRA against DoRA, LoRA+ (B at 4x and 16x A's learning rate), PiSSA's start, QLoRA (4-bit NF4 "
              "base weights) and IA3, each at its own best learning rate: what each buys over plain LoRA, and at what "
              "time and memory."},
    {"key": "memory_savers", "dimension": "memory_savers", "title": "Memory savers",
     "about": "LoRA at one learning rate with activation checkpointing, 8-bit AdamW, QLoRA with checkpointing or bf16 "
              "frozen weights: the memory each saves against the time it costs, and whether quality moves."},
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

METHOD_ORDER = ("full", "last_k", "head_only", "bitfit", "lora", "ia3")
# One colour per method in every figure (colour-blind-safe Okabe-Ito palette).
METHOD_COLOURS = {"full": "#0072B2", "last_k": "#E69F00", "head_only": "#009E73", "bitfit": "#CC79A7",
                  "lora": "#D55E00", "ia3": "#56B4E9"}
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

def _by_task(items: Iterable[Any]) -> dict[str, list[Any]]:
    """Groups (or query rows) per task, tasks in the guide's reading order (known tasks first, then by name)."""
    out: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        out[item["task"] if isinstance(item, dict) else item.task].append(item)
    order = list(TASK_TITLES)
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
