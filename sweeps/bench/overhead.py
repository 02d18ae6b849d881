"""The preflight's overhead check ("A study's cost on this machine"), and the small trials it and other checks run:
where a trial's wall time goes, the database write, a guide-study trial's estimated seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.bench.context import OVERHEAD_TARGET, Check, Context, Skipped
from sweeps.bench.rates import rates


@dataclass
class TrialPhases:
    """Where one trial's wall time went, from ``run_trial``'s call to its final record (seconds)."""

    wall_s: float
    setup_s: float  # FinalRecord.setup_seconds: model, data, method, optimizer
    before_first_step_s: float  # call -> first optimizer step starts (setup, the step-0 test baseline)
    training_s: float  # first step starts -> last step ends
    after_last_step_s: float  # last step ends -> final record (final validation and test, memory account)
    steps: int


def trial_config(ctx: Context, seed: int = 0) -> Any:
    from sweeps.config import TrialConfig

    return TrialConfig.from_flat({**ctx.shapes.trial, "train.seed": seed})


def timed_trial(config: Any) -> tuple[TrialPhases, Any]:
    """Run a trial through ``sweeps.loop.run_trial`` and time its parts from the records it emits (every step is
    reported: ``train.log_every=1``); the timing and the final record."""
    from sweeps.loop import run_trial
    from sweeps.records import FinalRecord, StepRecord

    seen: dict[str, float] = {}
    first: list[StepRecord] = []

    def callback(record: Any) -> None:
        now = time.perf_counter()
        if isinstance(record, StepRecord):
            if not first:
                first.append(record)
                seen["first"] = now
            seen["last"] = now
        elif isinstance(record, FinalRecord):
            seen["final"] = now

    started = time.perf_counter()
    record = run_trial(config, callback).record
    first_step = first[0].tokens_seen / first[0].tokens_per_s  # the first step's own seconds
    before = seen["first"] - first_step - started
    return TrialPhases(seen["final"] - started, record.setup_seconds, before, seen["last"] - started - before,
                       seen["final"] - seen["last"], record.step), record


def data_ready(ctx: Context) -> None:
    """Load (and cache) the small trial's data once, as the sweep driver does; Skipped when it cannot be had."""
    from model import TokenizerError, get_tokenizer
    from sweeps.loop import SUBSET_SEED
    from tasks import DataError, get_task

    try:
        get_task(trial_config(ctx).task).load(get_tokenizer(), seed=SUBSET_SEED)
    except (DataError, TokenizerError) as err:
        raise Skipped(f"no data for the small trials ({str(err).splitlines()[0]}); set FINETUNE_DATA_DIR") from None


def db_write_seconds(record: Any, config: Any, workdir: Path) -> float | None:
    """Seconds from a final record to its rows in the study database, as the sweep driver takes them: Ray's report
    (``to_report``), read back (``record_from_report``), then ``ResultsWriter.write_final`` as
    ``sweeps/ray_trial.py``'s DuckDBCallback calls it; None without DuckDB."""
    try:
        import duckdb  # noqa: F401 - only whether it is installed
    except ImportError:
        return None
    from analysis.db import ResultsWriter
    from sweeps.records import record_from_report

    writer = ResultsWriter(workdir / "preflight.duckdb")
    writer.con  # noqa: B018 - the driver holds the file open for the whole sweep: opening is not a trial's cost
    spec = {"trial_id": "preflight-0", "sweep_id": "preflight", "study": "preflight", "dimension": "method",
            "group": "lora", "config": config.to_flat()}
    started = time.perf_counter()
    final = record_from_report(record.to_report())
    writer.write_final(spec, final)
    seconds = time.perf_counter() - started
    writer.close()
    return seconds


def guide_trial_seconds(ctx: Context) -> tuple[float, str]:
    """Median estimated training + evaluation seconds of the guide study's trials at this machine's measured speed
    (``sweeps/costs.py``'s estimate with the rates of the speed check; assumed rates when it did not run)."""
    from sweeps.costs import PreflightRates, assumed_cost
    from sweeps.study import load_study, plan

    flops = rates(ctx, {"device": "", "date": ""})["train_flops_per_s"]
    measured = PreflightRates("this run", "", "", False, flops, None, {})
    seconds = sorted(c.train_s + c.eval_s for c in
                     (assumed_cost(t.config, "gpu", measured) for t in plan(load_study("guide"), "preflight")))
    source = f"training FLOP/s measured here ({ctx.shapes.label()})" if flops else "assumed rates"
    return seconds[len(seconds) // 2], source


def check_overhead(ctx: Context) -> list[Check]:
    """A trial's overhead: what it spends doing no study work (setup before the first step, and the write of its
    row into the database), as a share of a guide-study trial's wall time. Evaluations are study work (they make the
    numbers the guide reports), so they are shown but not counted. Measured on the second small LoRA trial of this
    process, as a reused Ray worker runs them; the first, cold one is in the detail."""
    data_ready(ctx)
    cold, _ = timed_trial(trial_config(ctx, 0))
    warm, record = timed_trial(trial_config(ctx, 1))
    db = db_write_seconds(record, trial_config(ctx, 1), ctx.workdir)
    ctx.rates["setup_seconds"] = warm.setup_s
    fixed = warm.setup_s + (db or 0.0)
    typical, source = guide_trial_seconds(ctx)
    wall = warm.wall_s + (db or 0.0)
    parts = {"setup": warm.setup_s, "step-0 test baseline": warm.before_first_step_s - warm.setup_s,
             "training": warm.training_s, "final evaluation": warm.after_last_step_s, "DB write": db}
    shown = "; ".join(f"{name} {s:.2f} s ({s / wall:.1%})" if s is not None else
                      f"{name} not measured (duckdb not installed)" for name, s in parts.items())
    trial, share = ctx.shapes.trial, fixed / (fixed + typical)
    return [Check("cost", "target: trial overhead share of a guide-study trial", ctx.judged(share <= OVERHEAD_TARGET),
                  f"{share:.1%} ({fixed:.2f} s of setup and DB write per trial; median guide trial "
                  f"{typical:,.0f} s of training and evaluation)", f"<= {OVERHEAD_TARGET:.0%}",
                  f"guide trials estimated from {source}. The small LoRA trial measured ({trial['task.name']}, "
                  f"{warm.steps} steps of {trial['train.batch_size']}, {trial['task.max_eval_examples']} evaluation "
                  f"examples per split, {ctx.shapes.label()}, random init): {shown}; outside its steps "
                  f"{(wall - warm.training_s) / wall:.1%} of its wall time (evaluation included), the first, cold "
                  f"trial of the process {(cold.before_first_step_s + cold.after_last_step_s) / cold.wall_s:.1%} "
                  "(before the DB write)")]

