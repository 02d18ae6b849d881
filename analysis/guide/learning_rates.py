"""The learning-rate section: each group's metric over its LR grid, where the best LR fell, and the ratio of
best learning rates between methods."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from analysis.guide.records import (
    Block,
    Figure,
    Table,
    _by_task,
    figure_file,
    fmt_lr,
    fmt_metric,
    metric_title,
    task_title,
)


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
