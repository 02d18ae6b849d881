"""How to read the guide, what it covers, and the Reproduce section (provenance, every trial that did not
complete)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import duckdb

from analysis import queries as q
from analysis.guide.records import (
    JUDGED_METRICS,
    Table,
    fmt_lr,
    metric_title,
    task_title,
)
from analysis.guide.sentences import (
    fmt_margin,
)
from analysis.stats import (
    LEVEL,
    MARGINS,
)


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

def _sweep_view(s: dict[str, Any]) -> dict[str, Any]:
    versions = json.loads(s["package_versions"]) if s["package_versions"] else {}
    hardware = json.loads(s["hardware"]) if s["hardware"] else {}
    return {**s, "versions": ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
            "hardware_text": ", ".join(f"{k}: {v}" for k, v in hardware.items()),
            "started": f"{s['started_at']:%Y-%m-%d %H:%M}" if s["started_at"] else "–",
            "ended": f"{s['ended_at']:%Y-%m-%d %H:%M}" if s["ended_at"] else "not ended"}
