"""The summary and the per-dimension sections: each task's groups with intervals and verdicts, the
recommendations, and how each method fares across tasks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import duckdb

from analysis import queries as q
from analysis.compare import Verdict
from analysis.db import DatabaseError
from analysis.guide.records import (
    SECTIONS,
    Block,
    Figure,
    Finding,
    Group,
    Section,
    Table,
    _by_task,
    figure_file,
    fmt_count,
    fmt_lr,
    fmt_memory,
    fmt_metric,
    fmt_rate,
    fmt_seconds,
    fmt_share,
    metric_title,
    order_groups,
    task_title,
)
from analysis.guide.sentences import (
    _across_marks,
    _across_sentence,
    diverged_findings,
    sentences,
    verdict_cell,
    verdict_findings,
)
from analysis.stats import (
    LEVEL,
)


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
    """A dimension's groups at their best learning rates, with what each costs (time and memory: the variants and
    memory savers differ in little else)."""
    metric = metric_title(groups[0].metric)
    rows = [[g.group, g.method, fmt_lr(g.lr), fmt_metric(g.val_mean, g.metric), g.shown,
             f"{g.n_completed}/{g.n_trials}", fmt_count(g.trainable_params), fmt_seconds(g.train_seconds),
             fmt_memory(g)]
            for g in groups]
    return Table(["group", "method", "best LR", f"validation {metric}", f"test {metric} (mean ± 95% CI)",
                  "completed", "trainable", "train time", "memory"], rows,
                 align=["l", "l", "r", "r", "r", "r", "r", "r", "r"])

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

JOINS_MAIN = ("lora_variant",)  # dimensions whose groups also stand in their task's `method` family


def join_main(groups: Iterable[Group], main: Mapping[str, str]) -> list[Group]:
    """Copies, under the task's ``method`` dimension, of the groups of ``JOINS_MAIN`` (LoRA's variants): they are
    methods a user chooses between like the others, so the summary, the decision table, the across-tasks table and the
    Pareto fronts show them beside full fine-tuning and LoRA, compared within one family (Holm over all of it). A
    variant named like a method group (the plain-LoRA reference) is that configuration and joins once."""
    groups = list(groups)
    names = {(g.task, g.group) for g in groups if g.dimension == main.get(g.task)}
    return [replace(g, dimension="method") for g in groups
            if g.dimension in JOINS_MAIN and main.get(g.task) == "method" and (g.task, g.group) not in names]


def joined_settings(settings: Mapping[tuple[str, str, str], Any], joined: Iterable[Group]
                    ) -> dict[tuple[str, str, str], Any]:
    """The settings (queries.settings) with each joined group's also under its new (task, dimension, group)."""
    out = dict(settings)
    for g in joined:
        for dimension in JOINS_MAIN:
            if (g.task, dimension, g.group) in settings:
                out[(g.task, g.dimension, g.group)] = settings[(g.task, dimension, g.group)]
    return out


def main_dimensions(groups: Iterable[Group]) -> dict[str, str]:
    """Each task's main dimension: ``method`` when measured, else ``dpo``, else the first one (e.g. ``search``)."""
    found: dict[str, set[str]] = defaultdict(set)
    for g in groups:
        found[g.task].add(g.dimension)
    return {task: next((d for d in ("method", "dpo") if d in dims), min(dims)) for task, dims in found.items()}

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
