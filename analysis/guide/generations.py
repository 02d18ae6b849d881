"""Side-by-side generations: each task's kept generations for the first prompts, one row per group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from analysis import queries as q
from analysis.guide.records import (
    SIDE_BY_SIDE_PROMPTS,
    _by_task,
    task_title,
)


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
