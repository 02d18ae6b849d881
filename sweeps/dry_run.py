"""The dry run: a plan as a table, CSV or JSON, with its cost summary and where its rates came from; a plan
as CSV reads back as the same trials."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from sweeps.costs import (
    ASSUMED_RATES,
    PreflightRates,
    RateKey,
    Rates,
    TrialCost,
    dimension_costs,
    estimate_hours,
    estimate_tokens,
    load_preflight,
    load_rates,
    rate_key,
    rate_label,
    trial_cost,
)
from sweeps.study import PlannedTrial, Study, duplicates_removed, planned_memberships


def preflight_note(preflight: PreflightRates, trials: int) -> str:
    """What the estimate took from the preflight, and what it still assumed."""
    flops = preflight.train_flops_per_s
    took = [f"training {flops['full']:.2e} FLOP/s full fine-tuning (evaluation at that rate)" if "full" in flops
            else "full fine-tuning assumed", f"{flops['lora']:.2e} FLOP/s with frozen weights (LoRA)" if "lora" in flops
            else "frozen weights assumed", f"{preflight.setup_seconds:.1f} s setup per trial"
            if preflight.setup_seconds is not None else "setup assumed"]
    return (f"from preflight {preflight.path} on {preflight.device} ({preflight.date}) for {trials:,} planned trials: "
            + ", ".join(took))


def rates_note(trials: list[PlannedTrial], costs: list[TrialCost], rates: dict[RateKey, Rates], db: Path,
               problem: str | None, preflight: PreflightRates | None = None, preflight_problem: str | None = None
               ) -> str:
    """Which rates the estimate used: measured (from how many trials, where, for which model/method), a preflight's,
    or assumed."""
    used = {rate_key(t.config) for t, c in zip(trials, costs, strict=True) if c.measured}
    from_preflight = sum(c.preflight and not c.measured for c in costs)
    assumed = sum(not c.measured and not c.preflight for c in costs)
    parts = []
    if used:
        devices = sorted({d for k in used for d in rates[k].devices})
        parts.append(f"measured from {sum(rates[k].trials for k in used)} trials in {db} "
                     f"({', '.join(rate_label(k) for k in sorted(used, key=str))}"
                     + (f"; ran on {', '.join(devices)}" if devices else "") + f") for {sum(c.measured for c in costs):,} "
                     "planned trials: their training tokens/s, evaluation and setup seconds")
    if from_preflight and preflight is not None:
        parts.append(preflight_note(preflight, from_preflight))
    if assumed:
        why = ("" if used or from_preflight else f"; nothing measured: {problem}" if problem
               else f"; {db} has no completed trial of these models and methods")
        parts.append(f"assumed for {assumed:,} planned trials ({ASSUMED_RATES}){why}")
    if preflight_problem:
        parts.append(preflight_problem)
    return "Rates: " + "; ".join(parts) + "."


def hours_unit(costs: list[TrialCost]) -> str:
    """GPU-hours when every trial's seconds are a GPU's; plain hours when some are a CPU's (pinned or measured)."""
    return "GPU-hours" if all(c.device == "gpu" for c in costs) else "hours"


def packing_note(total: float, gpus_per_trial: float, preflight: PreflightRates | None) -> str:
    """With a fraction of a GPU per trial: the GPU-hours at the trials-per-hour gain the preflight measured for that
    many trials per GPU (small LoRA trials), where it measured it."""
    if preflight is None or not 0 < gpus_per_trial < 1:
        return ""
    per_gpu = round(1 / gpus_per_trial)
    gain = preflight.packing.get(per_gpu)
    if gain is None:
        return ""
    return (f" At {per_gpu} trials per GPU the preflight measured {gain:.2f}x the trials per hour of one trial per "
            f"GPU (small LoRA trials): about {total / gain:,.2f} GPU-hours of GPU time.")


def plan_summary(study: Study, trials: list[PlannedTrial], costs: list[TrialCost], gpus_per_trial: float,
                 preflight: PreflightRates | None = None) -> str:
    """What the dry run says a study costs: trials per dimension and in all, duplicates removed, hours (and, with a
    preflight and a fraction of a GPU per trial, the GPU-hours packed)."""
    unit, on_cpu = hours_unit(costs), sum(c.device == "cpu" for c in costs)
    lines = [f"Study {study.name}: {len(trials):,} distinct trials planned from {planned_memberships(trials):,} "
             f"(trial, group) memberships; {duplicates_removed(trials):,} duplicate configurations removed (each trains "
             "once and serves every group that asks for it).", "",
             f"{'dimension':<16} {'trials':>7} {'shared':>7} {unit:>10}"]
    for dim, row in dimension_costs(study, trials, costs).items():
        lines.append(f"{dim:<16} {row['trials']:>7,.0f} {row['shared']:>7,.0f} {row['hours']:>10,.2f}")
    total = sum(c.total_s for c in costs) / 3600
    lines += [f"{'distinct total':<16} {len(trials):>7,} {'':>7} {total:>10,.2f}",
              "(a trial shared by several dimensions counts in each of them; the total counts it once)", ""]
    parts = {name: sum(getattr(c, f"{name}_s") for c in costs) / 3600 for name in ("train", "eval", "setup")}
    tokens = sum(estimate_tokens(t.config) for t in trials)
    lines.append(f"Estimated cost: {total:,.2f} {unit} (training {parts['train']:,.2f}, evaluation "
                 f"{parts['eval']:,.2f}, setup {parts['setup']:,.2f}), {tokens / 1e6:,.1f}M training tokens; at "
                 f"assumed rates {estimate_hours(trials, 'cpu'):,.1f} CPU-hours on a 2-core CPU"
                 + (f"; with {gpus_per_trial:g} GPU per trial" if gpus_per_trial else "") + "."
                 + (f" {on_cpu} trials are costed on a CPU (train.device=cpu, or rates measured on one)."
                    if on_cpu else "")
                 + (packing_note(total, gpus_per_trial, preflight) if unit == "GPU-hours" else ""))
    return "\n".join(lines)


def plan_table(trials: list[PlannedTrial]) -> str:
    """The trials per task, dimension, group and learning rate (seeds counted), with the groups sharing them."""
    rows: dict[tuple, list[PlannedTrial]] = {}
    for trial in trials:
        for dim, group in trial.memberships:
            rows.setdefault((trial.config["task.name"], dim, group, trial.config["method.name"],
                             trial.config["optim.lr"]), []).append(trial)
    lines = [f"{'task':<10} {'dimension':<14} {'group':<12} {'method':<10} {'lr':>9} {'seeds':>5}  also in"]
    for (task, dim, group, method, lr), members in rows.items():
        others = dict.fromkeys(f"{d}/{g}" for t in members for d, g in t.memberships if (d, g) != (dim, group))
        lines.append(f"{task:<10} {dim:<14} {group:<12} {method:<10} {lr:>9.2e} {len(members):>5}  "
                     + ", ".join(others))
    return "\n".join(lines)


def print_plan(args: argparse.Namespace, study: Study, trials: list[PlannedTrial], gpus_per_trial: float) -> None:
    """The dry run: the plan as a table (text), CSV or JSON on stdout (the summary then goes to stderr)."""
    rates, problem = load_rates(args.db)
    preflight, preflight_problem = load_preflight(args.preflight)
    costs = [trial_cost(t.config, "gpu", rates, preflight) for t in trials]
    note = rates_note(trials, costs, rates, args.db, problem, preflight, preflight_problem)
    summary = plan_summary(study, trials, costs, gpus_per_trial, preflight) + "\n" + note
    if args.format == "text":
        print(plan_table(trials) + "\n\n" + summary)
        return
    print(summary, file=sys.stderr)
    if args.format == "csv":
        write_plan_csv(trials, [c.total_s for c in costs], sys.stdout)
        return
    print(json.dumps({"study": study.name, "trials": len(trials), "memberships": planned_memberships(trials),
                      "duplicates_removed": duplicates_removed(trials),
                      "dimensions": dimension_costs(study, trials, costs),
                      "hours": sum(c.total_s for c in costs) / 3600, "unit": hours_unit(costs), "rates": note,
                      "plan": [plan_record(t, c.total_s) for t, c in zip(trials, costs, strict=True)]}, indent=1))




# --------------------------------------------------------------------------------------------------------------------
# A plan as CSV: one row per planned trial, every flat key its own column; ``read_plan_csv`` gives the trials back.
# --------------------------------------------------------------------------------------------------------------------

PLAN_COLUMNS = ("trial_id", "sweep_id", "study", "task", "memberships", "method", "lr", "seed", "estimated_seconds")


def plan_record(trial: PlannedTrial, seconds: float) -> dict[str, Any]:
    """One planned trial as the dry run's CSV and JSON give it (the JSON keeps ``config`` as one object)."""
    config = trial.config
    return {"trial_id": trial.trial_id, "sweep_id": trial.sweep_id, "study": trial.study, "task": config["task.name"],
            "memberships": [list(m) for m in trial.memberships], "method": config["method.name"],
            "lr": config["optim.lr"], "seed": config["train.seed"], "estimated_seconds": round(seconds, 1),
            "config": config}


def _cell(value: Any) -> str:
    """A CSV cell that reads back as the same value: text as itself unless it would read as JSON, the rest as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def _uncell(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def write_plan_csv(trials: Sequence[PlannedTrial], seconds: Sequence[float], out: TextIO) -> None:
    """The plan for a spreadsheet or a script: fixed columns, then every flat configuration key (study order)."""
    keys = list(dict.fromkeys(k for t in trials for k in t.config))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*PLAN_COLUMNS, *keys])
    for trial, secs in zip(trials, seconds, strict=True):
        record = plan_record(trial, secs)
        writer.writerow([_cell(record[c]) for c in PLAN_COLUMNS] + [_cell(trial.config.get(k)) for k in keys])


def read_plan_csv(source: TextIO) -> list[PlannedTrial]:
    """The trials of a plan written by ``write_plan_csv``, with their configurations exactly as planned."""
    trials = []
    for row in csv.DictReader(source):
        values = {name: _uncell(text) for name, text in row.items()}
        memberships = [tuple(m) for m in values["memberships"]]
        config = {k: v for k, v in values.items() if k not in PLAN_COLUMNS}
        trials.append(PlannedTrial(str(values["trial_id"]), str(values["sweep_id"]), str(values["study"]),
                                   *memberships[0], config, memberships))
    return trials
