"""Judged quality: what an LLM judge says about the kept generations (analysis/judge.py fills the judgments
table), worded by the same calibrated sentences as the test metric."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import duckdb
import numpy as np
from scipy.stats import spearmanr

from analysis import queries as q
from analysis.compare import Verdict
from analysis.guide.decisions import (
    main_rows,
)
from analysis.guide.records import (
    Block,
    Group,
    Row,
    Table,
    _by_task,
    fmt_lr,
    fmt_share,
    metric_title,
    order_groups,
    task_title,
)
from analysis.guide.sentences import (
    family_verdicts,
    fmt_margin,
    sentences,
    verdict_cell,
    verdict_findings,
)
from analysis.stats import (
    LEVEL,
    MARGINS,
    Outcomes,
)

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
