"""The decision table: per task, what to use and the cheapest equivalent, from the comparisons' verdicts only."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from analysis.compare import Verdict
from analysis.guide.records import (
    Block,
    Group,
    Row,
    Table,
    _by_task,
    fmt_lr,
    fmt_memory,
    fmt_seconds,
    order_groups,
    task_title,
)
from analysis.guide.sentences import (
    _across_sentence,
    _margin,
    fmt_detectable,
    fmt_margin,
)

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
        kind = "DoRA" if st.get("lora_dora") == "true" else "LoRA"
        parts = [f"{kind} r{st.get('lora_rank')}, α {st.get('lora_alpha'):g}" if st.get("lora_alpha") is not None
                 else kind, f"layers {st.get('lora_layers') or 'all'}", f"targets {st.get('lora_targets') or '–'}"]
        parts += _lora_variant(st)
    elif g.method == "ia3":
        parts = ["IA3"]
    elif g.method == "last_k":
        parts = [f"last {st.get('method_k')} blocks"]
    else:
        parts = [g.method]
    parts += _memory_savers(st)
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


def _lora_variant(st: Mapping[str, Any]) -> list[str]:
    """What sets a LoRA group apart from plain LoRA (LoRA+'s ratio, the start), from the settings' config values."""
    parts = []
    ratio = float(st["lora_lr_ratio"]) if st.get("lora_lr_ratio") is not None else 1.0
    if ratio != 1:
        parts.append(f"LoRA+ (B at {ratio:g}x the LR)")
    if st.get("lora_init") not in (None, "default"):
        parts.append(f"{st['lora_init']} start")
    return parts


def _memory_savers(st: Mapping[str, Any]) -> list[str]:
    parts = []
    if st.get("model_quantize") == "nf4":
        parts.append("NF4 base weights (QLoRA)")
    if st.get("model_frozen_dtype") == "bfloat16":
        parts.append("bf16 frozen weights")
    if st.get("activation_checkpointing") == "true":
        parts.append("activation checkpointing")
    if st.get("optim_name") == "adamw8bit":
        parts.append("8-bit AdamW")
    return parts


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
