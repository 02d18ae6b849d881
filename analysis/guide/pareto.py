"""The Pareto blocks: test metric against trainable parameters and time per task, the front named."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analysis.guide.records import (
    Block,
    Figure,
    Group,
    _by_task,
    figure_file,
    fmt_metric,
    metric_title,
    task_title,
)
from analysis.stats import (
    LEVEL,
    pareto_front,
)


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
