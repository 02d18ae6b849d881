"""``collect``: everything the guide says (a ``Guide``), from the database, part by part."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from analysis import queries as q
from analysis.guide.decisions import (
    decisions,
    main_rows,
)
from analysis.guide.generations import (
    GenerationSet,
    generation_sets,
)
from analysis.guide.judged import (
    JudgedSection,
    judged_section,
)
from analysis.guide.learning_rates import (
    lr_blocks,
    lr_ratios,
)
from analysis.guide.pareto import (
    pareto_blocks,
)
from analysis.guide.records import (
    SIDE_BY_SIDE_PROMPTS,
    Block,
    Finding,
    Group,
    Section,
    _by_task,
    _groups,
    attach_outcomes,
    order_groups,
    task_title,
)
from analysis.guide.reproduce import (
    how_to_read,
    reproduce,
    scope,
)
from analysis.guide.sentences import (
    family_verdicts,
)
from analysis.guide.summary import (
    Findings,
    across_tasks,
    baseline_rows,
    join_main,
    joined_settings,
    main_dimensions,
    section,
    section_specs,
    select,
    summary_table,
)


@dataclass
class Guide:
    title: str
    random_init: bool
    unfinished: list[str]  # one sentence per reported sweep that did not finish (interrupted, killed, running)
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

def unfinished(sweeps: Sequence[Mapping[str, Any]]) -> list[str]:
    """A sentence per sweep (``q.SWEEPS`` rows) that did not finish: how many planned trials it is missing."""
    return [f"sweep {s['id']} is {s['status']}: {s['unfinished']} of its {s['planned_trials']} planned trials did not "
            f"run to their end (python sweeps/launch.py resume --sweep {s['id']} finishes it)"
            for s in sweeps if s["status"] != "completed" or s["unfinished"]]


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
    main = main_dimensions(all_groups)
    joined = join_main(all_groups, main)  # LoRA's variants also stand among the methods
    all_groups += joined
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in all_groups:
        families[(g.task, g.dimension)].append(g)
    verdicts = {key: family_verdicts(gs, margins) for key, gs in families.items()}
    main_groups = [g for g in all_groups if g.dimension == main[g.task]]
    floors = {r["task"]: baseline_rows(r) for r in q.baselines(con) if r["dimension"] == main.get(r["task"])}
    summary = [Block(task, task_title(task), None,
                     summary_table(order_groups(gs), verdicts.get((task, main[task]), []), floors.get(task, [])), [])
               for task, gs in _by_task(main_groups).items()]
    sections = [s for spec in section_specs(g.dimension for g in all_groups)
                if (s := section(con, spec, all_groups, found, figures, verdicts)) is not None]
    tasks = list(_by_task(all_groups))
    return Guide(
        title="Fine-tuning GPT-2: a measured guide", random_init="random" in inits, unfinished=unfinished(sweeps),
        scope=scope(con, sweeps, inits, tasks), how_to_read=how_to_read(margins),
        decisions=decisions(all_groups, main, verdicts, joined_settings(q.settings(con), joined)), summary=summary,
        recommendations=found.recommendations(tasks), across=across_tasks(main_groups, figures, verdicts),
        sections=sections, pareto=pareto_blocks(main_groups, figures),
        learning_rate=lr_blocks(q.records(con, q.LR_SWEEP_ALL), figures, main,
                                lr_ratios(q.records(con, q.LR_BY_SEED), main)),
        judged=judged_section(con, main, main_groups, margins),
        generations=generation_sets(main_rows(main, lambda d: q.generations(con, d, SIDE_BY_SIDE_PROMPTS))
                                    if q.has_relation(con, "generations") else []),
        reproduce=reproduce(con, sweeps), findings=found.all, figures=figures)
