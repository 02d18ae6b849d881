"""Launch, resume and inspect sweeps. Ray Tune runs the trials; the driver alone writes the DuckDB file.

    python sweeps/launch.py grid --study smoke                  # every planned trial of a study
    python sweeps/launch.py grid --study guide --dry-run        # the trial table and a cost estimate; starts nothing
    python sweeps/launch.py grid --study guide --address auto --gpus-per-trial 0.5 --storage s3://bucket/sweeps
    python sweeps/launch.py search --task sms_spam --method lora --num-samples 20   # Optuna + ASHA
    python sweeps/launch.py resume                              # continue the last interrupted sweep
    python sweeps/launch.py status                              # progress of every sweep, from the database
    python sweeps/launch.py preflight                           # sweeps/preflight.py: this GPU, checked and timed

Bad input (malformed study, unknown key, unsatisfiable resources) prints every problem and exits with code 2 before
anything starts.

Exit codes of grid, search and resume: 0 when every trial ended completed, diverged or stopped; 3 (FAILED_TRIALS_EXIT)
when the sweep ran to its end but some trials ended ``failed`` (each named with its error's line on stderr; every
other result is kept in the database); 2 for bad input; anything else (1: an uncaught error, or a signal) means the
sweep stopped early: ``resume`` continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Experiment state saved at every controller step: a killed driver loses at most the result in flight.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # results live in DuckDB, not CSV/TensorBoard
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry unless the user opts in
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # frequent saves are deliberate

if __name__ == "__main__" and sys.argv[1:2] == ["preflight"]:
    # The preflight needs neither Ray nor DuckDB (a bare GPU machine may have neither): forwarded before the imports
    # below, which need DuckDB. main() forwards it the same way when called in-process.
    from sweeps.preflight import main as preflight_main

    sys.exit(preflight_main(sys.argv[2:]))

from analysis import queries
from analysis.db import (
    DEFAULT_DB,
    DatabaseError,
    DiskFullError,
    ResultsWriter,
    connect,
    disk_full,
    exception_chain,
    membership_rows,
    trial_row,
)
from model import CheckpointError, ConfigError, TokenizerError
from model.checkpoint import resolve_checkpoint
from model.methods import METHODS
from sweeps.config import TrialConfig, name_problem
from sweeps.records import EVAL_STEP, metric_key
from sweeps.study import (
    ASSUMED_RATES,
    PREFLIGHT_REPORT,
    PlannedTrial,
    PreflightRates,
    RateKey,
    Rates,
    Study,
    TrialCost,
    duplicates_removed,
    estimate_hours,
    estimate_tokens,
    load_study,
    measured_rates,
    plan,
    plan_record,
    planned_memberships,
    rate_key,
    rate_label,
    read_preflight,
    resolve_init,
    trial_cost,
    write_plan_csv,
)
from sweeps.train import parse_sets
from tasks import TASKS, DataError

if TYPE_CHECKING:
    from ray.tune import Tuner

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = Path("results/ray")
KEEP_CHECKPOINTS = 2  # per trial; the newest, and the previous one for when the newest is damaged
PACKAGES = ("torch", "ray", "transformers", "peft", "tiktoken", "duckdb", "optuna", "numpy")


FAILED_TRIALS_EXIT = 3  # the sweep ended, and some of its trials ended failed


class LaunchError(RuntimeError):
    """A sweep that cannot start (resources, missing sweep to resume)."""


# --------------------------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except OSError:
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def hardware(resources: dict[str, float]) -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"driver_host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "driver_cpus": os.cpu_count(), "driver_gpus": gpus, "cluster_resources": resources,
            "user": getpass.getuser()}


# --------------------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------------------


def pretrained_available(trials: list[PlannedTrial]) -> bool:
    """Whether every pretrained checkpoint the trials need can be had (cache, local directory or download)."""
    names = {t.config["model.name"] for t in trials if t.config["model.init"] == "pretrained"}
    try:
        for name in names:
            resolve_checkpoint(name)
    except CheckpointError as err:
        print("\n" + "!" * 100 + f"\n!! PRETRAINED WEIGHTS UNAVAILABLE: {str(err).splitlines()[0]}\n!! Running the "
              "SAME study on a RANDOMLY INITIALISED GPT-2 instead. Every result is labelled model_init=random;\n!! "
              "its numbers are a pipeline check, not findings about pretrained GPT-2.\n" + "!" * 100 + "\n",
              file=sys.stderr, flush=True)
        return False
    return True


def prepare_data(trials: list[PlannedTrial]) -> None:
    """Load every distinct task configuration once, here in the driver: a data problem stops the sweep before any
    trial starts, and the token cache is filled once instead of by every trial at the same time."""
    from model import get_tokenizer
    from sweeps.loop import SUBSET_SEED
    from tasks import TaskConfig, get_task

    enc = get_tokenizer()
    seen = set()
    for trial in trials:
        options = tuple(sorted((k, v) for k, v in trial.config.items() if k.startswith("task.")))
        if options not in seen:
            seen.add(options)
            get_task(TaskConfig(**{k[5:]: v for k, v in options})).load(enc, seed=SUBSET_SEED)


def load_rates(db: Path) -> tuple[dict[RateKey, Rates], str | None]:
    """Measured rates per (model, method) from the completed trials in ``db``; none, and why, when the file is
    missing, held by a running sweep, or no study database (a dry run never fails for want of measurements)."""
    import duckdb

    if not Path(db).is_file():
        return {}, f"no database at {db}"
    try:
        con = connect(db, read_only=True)
    except DatabaseError as err:
        return {}, f"{db} could not be read ({str(err).split('(')[0].strip()})"
    try:
        rows = queries.measured_trials(con)
    except duckdb.Error as err:
        return {}, f"{db} is no study database ({str(err).splitlines()[0]})"
    finally:
        con.close()
    return measured_rates(rows), None


def dimension_costs(study: Study, trials: list[PlannedTrial], costs: list[TrialCost]) -> dict[str, dict[str, float]]:
    """Per dimension (study order): its trials (a shared trial counts in every dimension it serves), how many of them
    another dimension shares, and their estimated hours."""
    table: dict[str, dict[str, float]] = {dim: {"trials": 0, "shared": 0, "hours": 0.0} for dim in study.dimensions}
    for trial, cost in zip(trials, costs, strict=True):
        dims = list(dict.fromkeys(d for d, _ in trial.memberships))
        for dim in dims:
            row = table[dim]
            row["trials"] += 1
            row["shared"] += len(dims) > 1
            row["hours"] += cost.total_s / 3600
    return {dim: row for dim, row in table.items() if row["trials"]}  # --dimensions may leave some out


def load_preflight(path: Path | None) -> tuple[PreflightRates | None, str | None]:
    """A preflight's measured rates (``--preflight``, else the preflight's default report where there is one), and a
    note when there is a report the estimate does not use (one from ``--cpu`` mode: tiny shapes on a CPU). A named
    file that is missing or malformed is a ConfigError naming it."""
    if path is None:
        if not PREFLIGHT_REPORT.is_file():
            return None, None
        path = PREFLIGHT_REPORT
    elif not Path(path).is_file():
        raise ConfigError([("--preflight", f"{path}: no such file (python sweeps/preflight.py writes "
                                           f"{PREFLIGHT_REPORT})")])
    preflight = read_preflight(Path(path))
    if preflight.cpu_mode:
        return None, (f"preflight {path} ran with --cpu (tiny shapes on a CPU, {preflight.date}): its rates are not "
                      "used")
    return preflight, None


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
# Ray
# --------------------------------------------------------------------------------------------------------------------


# Ray's driver uploads its experiment state (<storage>/<sweep>: experiment_state-*.json, the searcher's state) from a
# staging directory in a background thread, while the next controller step (every step: TUNE_GLOBAL_CHECKPOINT_S=0)
# writes it again. Ray writes the searcher's state as ".<uuid>-tmp-<name>" and renames it into place
# (ray/tune/utils/util.py _atomic_save); an upload that listed the directory before that rename fails on the vanished
# file with FileNotFoundError, and Ray logs the traceback (ray/train/_internal/syncer.py _launch_sync_process;
# ray/tune/execution/experiment_state.py wait_for_sync). Harmless: the file is there under its final name, Ray starts
# the next upload at once, and a run ends with an upload it waits for; trial checkpoints never go this way (trials
# write them to storage themselves). Only that failure is hidden; every other sync error still shows.
_RAY_TEMP_FILE_GONE = re.compile(r"FileNotFoundError\b.*[/\\]\.[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-")


def _not_a_vanished_ray_temp_file(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += f"\n{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    last = text.strip().splitlines()[-1:]  # the exception a traceback ends with
    return not (last and _RAY_TEMP_FILE_GONE.search(last[0]))


def start_ray(address: str | None, node_ip_address: str | None = None) -> None:
    import ray

    # Tune's end-of-run analysis looks for its CSV/JSON logs, which are off (results live in DuckDB)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    for name in ("ray.train._internal.syncer", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).addFilter(_not_a_vanished_ray_temp_file)
    if ray.is_initialized():
        return
    # address "local": without --address always start a fresh Ray here, never attach to a cluster left behind
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, _node_ip_address=node_ip_address,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k.startswith(("FINETUNE_", "HF_", "TUNE_"))}})


def check_local_resources(cpus: float, gpus: float) -> None:
    """Without --address, Ray runs on this machine: refuse what it cannot give before starting anything."""
    import torch

    have_cpu, have_gpu = os.cpu_count() or 1, torch.cuda.device_count()
    problems = []
    if cpus > have_cpu:
        problems.append(("--cpus-per-trial", f"asked {cpus:g} CPU per trial; this machine has {have_cpu}"))
    if gpus > have_gpu:
        problems.append(("--gpus-per-trial", f"asked {gpus:g} GPU per trial; this machine has {have_gpu} "
                                             "(pass --address to use a GPU cluster)"))
    if problems:
        raise ConfigError(problems, "this machine can never run these trials")


def check_resources(cpus: float, gpus: float) -> dict[str, float]:
    """Refuse a per-trial request no node of the cluster can satisfy (Ray would leave it pending forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    best_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    best_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    problems = []
    if cpus > best_cpu:
        problems.append(("--cpus-per-trial", f"asked {cpus:g} CPU per trial; the largest node has {best_cpu:g}"))
    if gpus > best_gpu:
        problems.append(("--gpus-per-trial", f"asked {gpus:g} GPU per trial; the largest node has {best_gpu:g} "
                                             f"(cluster total {ray.cluster_resources().get('GPU', 0):g})"))
    if problems:
        raise ConfigError(problems, "the cluster can never run these trials")
    return dict(ray.cluster_resources())


def check_trial_resources(args: argparse.Namespace, gpus: float) -> None:
    """Without --address, refuse what this machine cannot give before anything (data, Ray) starts."""
    if args.address is None:
        check_local_resources(args.cpus_per_trial, gpus)


def start_cluster(args: argparse.Namespace, gpus: float) -> dict[str, float]:
    """Start or join Ray, then refuse a per-trial request no node can satisfy; the cluster's resources."""
    start_ray(args.address, args.node_ip_address)
    return check_resources(args.cpus_per_trial, gpus)


def trial_trainable(finished: dict[str, str], storage: str, resources: dict[str, float]) -> Any:
    """The shipped trainable with its resources; imported when called, so a test wrapper installed there is used."""
    from ray import tune

    from sweeps.ray_trial import trainable

    return tune.with_resources(tune.with_parameters(trainable, finished=finished, export_root=export_root(storage)),
                               resources)


def make_tuner(args: argparse.Namespace, sweep_id: str, storage: str, param_space: dict[str, Any],
               specs: dict[str, Any], **tune_options: Any) -> Tuner:
    """The Tuner every sweep kind shares (retries from checkpoints, one checkpoint kept, results into DuckDB);
    ``tune_options`` add to its TuneConfig (a search's metric, algorithm and scheduler)."""
    from ray import tune

    from sweeps.ray_trial import DuckDBCallback

    return tune.Tuner(
        trial_trainable({}, storage, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent, reuse_actors=True, **tune_options),
        run_config=tune.RunConfig(
            name=sweep_id, storage_path=storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            # two per trial: a damaged newest checkpoint falls back to the one before (sweeps/checkpoints.py)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[DuckDBCallback(None, specs),  # writes through the driver's writer (_run_and_close)
                       *tensorboard_callbacks(args)],
        ),
    )


TENSORBOARD_HELP = ("Ray Tune also writes TensorBoard event files (tensorboardX) of every reported metric, one per "
                    "trial under <storage>/<sweep>: tensorboard --logdir <storage>/<sweep> shows learning curves live")


def tensorboard_callbacks(args: argparse.Namespace) -> list[Any]:
    """Ray Tune's TensorBoard logger with --tensorboard (Ray's automatic loggers are off: results live in DuckDB). Ray
    copies each trial's event file to storage with its experiment state; a resumed sweep keeps the setting."""
    if not getattr(args, "tensorboard", False):
        return []
    from ray.tune.logger import TBXLoggerCallback

    return [TBXLoggerCallback()]


def run_tuner(trials: list[PlannedTrial], args: argparse.Namespace, sweep_id: str, storage: str) -> None:
    """Run planned trials as one grid (each trial's spec is one grid point)."""
    from ray import tune

    specs = {t.trial_id: t.as_spec() for t in trials}
    make_tuner(args, sweep_id, storage, {"trial": tune.grid_search(list(specs.values()))}, specs).fit()


def export_root(storage: str) -> str | None:
    """Where trials with ``train.export`` keep their final weights (``<storage>/exports/<trial id>``)."""
    return None if "://" in storage else str(Path(storage) / "exports")


def _storage(args: argparse.Namespace) -> str:
    value = args.storage or str(DEFAULT_STORAGE)
    return value if "://" in value else str(Path(value).resolve())


def default_gpus_per_trial() -> float:
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def trial_gpus(args: argparse.Namespace) -> float:
    """GPUs per trial: --gpus-per-trial, else 1 where this machine has a GPU. Written back into ``args``, where the
    Tuner and the sweep row read it."""
    if args.gpus_per_trial is None:
        args.gpus_per_trial = default_gpus_per_trial()
    return args.gpus_per_trial


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------


def sweep_row(args: argparse.Namespace, sweep_id: str, study: str, kind: str, planned: int, model_init: str,
              resources: dict[str, float], storage: str) -> dict[str, Any]:
    """The ``sweeps`` row a new sweep starts with: what it plans, and the provenance that makes it reproducible."""
    return {
        "id": sweep_id, "study": study, "kind": kind, "started_at": datetime.now(UTC).replace(tzinfo=None),
        "ended_at": None, "status": "running", "planned_trials": planned, "model_init": model_init,
        "git_commit": git_commit(), "package_versions": package_versions(),
        "hardware": {**hardware(resources), "per_trial": {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}},
        "command_line": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "storage_path": storage,
    }


def grid_overrides(args: argparse.Namespace, study: Study) -> dict[str, Any]:
    """--set and --model for every trial; ``dpo.init=<trial id>`` (there or in the study) becomes that trial's
    exported weights, so a missing export stops the sweep here."""
    overrides = parse_sets(args.set)
    if args.model:
        overrides["model.name"] = args.model
    for flat in (overrides, study.base, *study.tasks.values(),
                 *(variant for variants in study.dimensions.values() for variant in variants.values())):
        resolve_init(flat, args.db)
    return overrides


def cmd_grid(args: argparse.Namespace) -> int:
    if args.format != "text" and not args.dry_run:
        raise ConfigError([("--format", f"{args.format} writes a plan; it needs --dry-run")])
    study = load_study(args.study)
    overrides = grid_overrides(args, study)
    sweep_id = args.name or f"{study.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    selection = {"tasks": _split(args.tasks), "dimensions": _split(args.dimensions),
                 "seeds": [int(s) for s in _split(args.seeds)] if args.seeds else None}
    trials = plan(study, sweep_id, overrides=overrides, **selection)
    storage = _storage(args)
    if any(t.config["train.export"] for t in trials) and export_root(storage) is None:
        raise ConfigError([("train.export", f"keeping weights needs --storage on a filesystem the nodes share; "
                                            f"{storage} is a URI")])
    gpus = trial_gpus(args)
    if args.dry_run:
        print_plan(args, study, trials, gpus)
        return 0
    if not pretrained_available(trials):
        trials = plan(study, sweep_id, overrides={**overrides, "model.init": "random"}, **selection)
    check_trial_resources(args, gpus)
    prepare_data(trials)  # a bad data file stops the sweep before the database is created or touched
    # the database is checked and locked before anything is written or started; held to the sweep's end
    with ResultsWriter(args.db) as writer:
        resources = start_cluster(args, gpus)
        inits = {t.config["model.init"] for t in trials}
        with writer.transaction():  # the sweep with its whole plan, or nothing
            writer.start_sweep(sweep_row(args, sweep_id, study.name, "grid", len(trials),
                                         inits.pop() if len(inits) == 1 else "mixed", resources, storage))
            writer.plan_trials(trial_row(t.as_spec(), "pending") for t in trials)
            writer.write_memberships(row for t in trials for row in membership_rows(t.as_spec()))
        print(f"sweep {sweep_id}: {len(trials)} trials ({duplicates_removed(trials)} duplicate configurations "
              f"shared, not trained twice), database {args.db}, Ray storage {storage}/{sweep_id}", flush=True)
        code = _run_and_close(lambda: run_tuner(trials, args, sweep_id, storage), writer, sweep_id)
    return code


def _run_and_close(run: Any, writer: ResultsWriter, sweep_id: str) -> int:
    """Run the Tuner, its callbacks writing through the driver's ``writer``, and record how the sweep ended:
    interrupted (and re-raise; a full disk as one clear DiskFullError) or completed, with trial counts. The exit code:
    0, or FAILED_TRIALS_EXIT when trials ended failed (named on stderr)."""
    from sweeps.ray_trial import writing_to

    db = writer.path
    started = time.perf_counter()
    try:
        with writing_to(writer):
            run()
    except BaseException as err:
        marked = writer.end_sweep_if_possible(sweep_id, "interrupted")
        if disk_full(err):
            raise full_disk_error(db, sweep_id, err, marked) from None
        raise
    try:
        writer.end_sweep(sweep_id, "completed")
        counts = writer.trial_counts(sweep_id)
    except Exception as err:
        if disk_full(err):
            raise full_disk_error(db, sweep_id, err, writer.end_sweep_if_possible(sweep_id, "completed")) from None
        raise
    print(f"sweep {sweep_id} ended after {time.perf_counter() - started:.0f} s: {counts}; database {db}", flush=True)
    return report_failed(queries.failed_trials(writer.con, sweep_id), db)


def report_failed(failed: list[dict[str, Any]], db: Path) -> int:
    """Name the trials that ended failed, each with its error's telling line, on stderr; the exit code."""
    from sweeps.ray_trial import error_line

    if not failed:
        return 0
    lines = [f"{len(failed)} trial(s) ended failed (exit code {FAILED_TRIALS_EXIT}); every other result is kept in {db}"
             " (trials.error holds each full error):"]
    lines += [f"  {row['trial_id']}: {error_line(row['error'])}" for row in failed]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return FAILED_TRIALS_EXIT


def full_disk_error(db: Path, sweep_id: str, err: BaseException, marked: bool) -> DiskFullError:
    """One line for a sweep a full disk stopped (the database's filesystem or Ray storage's): where, what the database
    now says, and how to go on."""
    cause = next((e for e in exception_chain(err) if disk_full(e) and not (e.__cause__ or e.__context__)), err)
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
    state = "marked interrupted" if marked else "still marked running (the database could not be written)"
    return DiskFullError(f"{db}: no space left on the device, sweep {sweep_id} stopped ({first}); it is {state}. "
                         f"Free some space, then: python sweeps/launch.py resume --db {db} --sweep {sweep_id}")


def search_space(method: str, n_layer: int, task: str = "") -> dict[str, Any]:
    """What a search varies for each method (flat keys), on scales where the optimum is usually found."""
    from ray import tune

    low, high = {"full": (1e-5, 1e-3), "last_k": (1e-5, 1e-3)}.get(method, (1e-4, 1e-2))
    space: dict[str, Any] = {"optim.lr": tune.loguniform(low, high),
                             "optim.weight_decay": tune.choice([0.0, 0.01, 0.1]),
                             "schedule.warmup_ratio": tune.uniform(0.0, 0.2)}
    if method == "last_k":
        space["method.k"] = tune.randint(1, n_layer + 1)
    if method == "lora":
        space.update({"lora.rank": tune.choice([1, 2, 4, 8, 16, 32, 64]), "lora.alpha": tune.choice([4, 8, 16, 32]),
                      "lora.dropout": tune.uniform(0.0, 0.2), "lora.targets": tune.choice(["attention", "mlp", "all"])})
    if task == "preference":  # DPO: how hard to pull towards the reference
        space["dpo.beta"] = tune.loguniform(0.02, 1.0)
    return space


def search_base(args: argparse.Namespace, study: Study) -> TrialConfig:
    """The TrialConfig every proposal starts from: the study's base and task settings, the method, --set; evaluated
    at the start and every ``train.eval_every`` steps, the points where ASHA compares trials. Bad keys stop here."""
    if args.task not in study.tasks:
        raise ConfigError([("--task", f"{args.task!r} is not in study {study.name} ({', '.join(study.tasks)})")])
    # the search varies the warmup as a ratio (search_space): a study's fixed warmup_steps would contradict it
    base = {**study.base, **study.tasks[args.task], "task.name": args.task, "method.name": args.method,
            "train.eval_at_start": True, "schedule.warmup_steps": 0, **parse_sets(args.set)}
    base.setdefault("train.eval_every", base.get("train.log_every", 10))
    return TrialConfig.from_flat(base)


def cmd_search(args: argparse.Namespace) -> int:
    """Optuna (Ray Tune's OptunaSearch) proposes configurations; ASHA stops the poor ones at evaluation points."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.ray_trial import spec_from_param

    study = load_study(args.study)
    config = search_base(args, study)
    sweep_id = args.name or f"search-{args.task}-{args.method}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    search = {"base": config.to_flat(), "sweep_id": sweep_id, "study": study.name, "group": args.method}
    space = search_space(args.method, config.model.n_layer_known or 12, args.task)
    task_cls = TASKS[args.task]
    metric, mode = metric_key("validation", task_cls.primary_metric), "max" if task_cls.higher_is_better else "min"
    gpus = trial_gpus(args)
    check_trial_resources(args, gpus)
    example = spec_from_param({"search": search, **{k: v.sample() for k, v in space.items()}})
    prepare_data([PlannedTrial(**example)])
    # Decisions at evaluations only (EVAL_STEP is in eval reports alone): step reports carry the last validation
    # metric along for the searcher, and a decision on one could stop a trial after its last step, before its final
    # evaluation. A trial that reaches the end finishes with its final record.
    scheduler = ASHAScheduler(time_attr=EVAL_STEP, max_t=max(config.train.max_steps or 100_000, config.train.eval_every),
                              grace_period=config.train.eval_every, reduction_factor=2, stop_last_trials=False)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # step reports before the first evaluation have none
    with ResultsWriter(args.db) as writer:  # checked and locked before Ray starts; held to the sweep's end
        resources = start_cluster(args, gpus)
        storage = _storage(args)
        writer.start_sweep(sweep_row(args, sweep_id, study.name, "search", args.num_samples, config.model.init,
                                     resources, storage))
        print(f"search {sweep_id}: {args.num_samples} samples of {args.method} on {args.task}, optimising {metric} "
              f"({mode}), database {args.db}", flush=True)
        tuner = make_tuner(args, sweep_id, storage, {"search": search, **space}, {}, metric=metric, mode=mode,
                           search_alg=OptunaSearch(seed=args.seed), scheduler=scheduler,
                           num_samples=args.num_samples)
        code = _run_and_close(tuner.fit, writer, sweep_id)
    return code


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a sweep from Ray's experiment state; trials the database has as finished are not run again. The
    database is --db's, checked and locked before Ray starts and held to the end (wherever it was before)."""
    with ResultsWriter(args.db, existing=True) as writer:
        return _resume(args, writer)


def _resume(args: argparse.Namespace, writer: ResultsWriter) -> int:
    from ray import tune

    row = queries.sweep_to_resume(writer.con, args.sweep)
    if row is None:
        raise LaunchError(f"no sweep {'named ' + args.sweep if args.sweep else 'at all'} in {args.db}")
    sweep_id, storage = row["id"], row["storage_path"]
    path = f"{storage}/{sweep_id}"
    if row["status"] == "completed":
        print(f"sweep {sweep_id} already completed; nothing to resume")
        return 0
    if not tune.Tuner.can_restore(path):
        raise LaunchError(f"{path}: no Ray experiment state to restore from")
    start_ray(args.address, args.node_ip_address)
    writer.reopen_sweep(sweep_id)
    finished = writer.finished_results(sweep_id)
    print(f"resuming sweep {sweep_id} from {path}", flush=True)
    per_trial = json.loads(row["hardware"] or "{}").get("per_trial", {"cpu": 1.0, "gpu": 0.0})
    resources = {"cpu": per_trial["cpu"], "gpu": per_trial["gpu"]}
    args.cpus_per_trial, args.gpus_per_trial = resources["cpu"], resources["gpu"]
    restored = None
    if ray_state_readable(path):
        for note in repair_lost_checkpoints(path):
            print(note, flush=True)
        try:
            restored = tune.Tuner.restore(path, trial_trainable(finished, storage, resources),
                                          resume_unfinished=True, resume_errored=True)
        except (EOFError, pickle.UnpicklingError) as err:  # tuner.pkl cut short (a full disk, a kill mid-write)
            print(f"Ray's saved tuner in {path} is unreadable ({type(err).__name__}: {err}).", flush=True)
    if restored is not None:
        return _run_and_close(lambda: fit_then_rerun_lost(restored, args, writer, sweep_id, storage), writer,
                              sweep_id)
    # Ray writes its experiment state in place; a driver killed mid-write (or a full disk) leaves it torn (and Ray
    # would then restart the experiment with an empty plan). The database knows which trials finished; the rest run
    # again from their plan, in-flight ones from step 0.
    remaining = planned_unfinished(writer.con, sweep_id)
    print(f"Ray's experiment state in {path} is unreadable (the driver was probably killed while writing it, or the "
          f"disk was full); running the {len(remaining)} unfinished trials again from their plan.", flush=True)
    return _run_and_close(lambda: run_tuner(remaining, args, f"{sweep_id}-rerun-{int(time.time())}", storage),
                          writer, sweep_id)


# Ray keeps KEEP_CHECKPOINTS checkpoints per trial: when a trial reports checkpoint_N+1, the driver registers it,
# deletes the oldest one kept, and saves its experiment state (to a staging folder, copied to storage in the
# background) at a later step. A driver killed in between leaves a state on storage that may name a deleted
# checkpoint, and Tuner.restore then fails that trial ("Could not recover from checkpoint as it does not exist on
# storage anymore").


def recorded_checkpoints(path: str | Path) -> dict[str, Path | None]:
    """Per trial folder in Ray's newest experiment state under ``path`` (local storage): the checkpoint the state
    names for it (mapped into ``path``), or None. Reads Ray 2.x's state format (the trial's run metadata, whose
    checkpoint manager Ray stores pickled)."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    states = sorted(Path(path).glob("experiment_state*.json"))
    if not states:
        return {}
    found: dict[str, Path | None] = {}
    for _, run_metadata in json.loads(states[-1].read_text())["trial_data"]:
        manager = _TrainingRunMetadata.from_json_state(run_metadata).checkpoint_manager
        latest = manager.latest_checkpoint_result if manager is not None else None
        if latest is not None:
            named = Path(latest.checkpoint.path)
            found[named.parent.name] = Path(path) / named.parent.name / named.name
    return found


def repair_lost_checkpoints(path: str | Path) -> list[str]:
    """Before ``Tuner.restore``: every trial whose checkpoint Ray's state names but storage no longer has restarts
    from the newest checkpoint its folder still holds (moved to the name the state expects, so the trial's later
    checkpoints keep their numbers), else from scratch (the checkpoint dropped from the state). Local storage only
    (cloud URIs are left to Ray; ``fit_then_rerun_lost`` still catches the failure there). What it did, one line per
    trial."""
    if "://" in str(path):
        return []
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    notes = []
    for state_file in sorted(Path(path).glob("experiment_state*.json")):
        state = json.loads(state_file.read_text())
        changed = False
        for entry in state["trial_data"]:
            meta = _TrainingRunMetadata.from_json_state(entry[1])
            manager = meta.checkpoint_manager
            latest = manager.latest_checkpoint_result if manager is not None else None
            if latest is None:
                continue
            named = Path(latest.checkpoint.path)
            folder = Path(path) / named.parent.name
            wanted = folder / named.name
            if wanted.is_dir():
                continue
            kept = sorted(d for d in folder.glob("checkpoint_*") if d.is_dir()) if folder.is_dir() else []
            if kept:
                kept[-1].rename(wanted)
                notes.append(f"trial folder {folder.name}: its checkpoint {named.name} is gone (the driver died while "
                             f"Ray rotated checkpoints); resuming from {kept[-1].name}, the newest one kept")
                continue
            meta.checkpoint_manager = _CheckpointManager(checkpoint_config=manager.checkpoint_config)
            entry[1] = meta.get_json_state()
            changed = True
            notes.append(f"trial folder {folder.name}: its checkpoint {named.name} is gone and no other is kept; "
                         "it starts again from scratch")
        if changed:
            temp = state_file.with_name(f".{state_file.name}.repair")
            temp.write_text(json.dumps(state))
            os.replace(temp, state_file)
    return notes


# Ray errors that say nothing about the trial itself: a checkpoint storage no longer has, a worker or node lost.
_LOST_CHECKPOINT = "Could not recover from checkpoint"


def infrastructure_error(error: BaseException | None) -> bool:
    """Whether a trial's error is the infrastructure's (never recorded as the trial's ``failed`` result)."""
    from ray import exceptions

    if error is None:
        return False
    lost = (exceptions.RayActorError, exceptions.NodeDiedError, exceptions.WorkerCrashedError,
            exceptions.ObjectLostError, exceptions.OwnerDiedError)
    return any(isinstance(e, lost) or _LOST_CHECKPOINT in str(e) for e in exception_chain(error))


def fit_then_rerun_lost(tuner: Tuner, args: argparse.Namespace, writer: ResultsWriter, sweep_id: str,
                        storage: str) -> None:
    """Run a restored Tuner; then run again, from their plan, the trials Ray ended with an infrastructure error
    (``infrastructure_error``) rather than leave them recorded as failed."""
    from sweeps.ray_trial import spec_from_param

    lost = {spec_from_param(r.config)["trial_id"] for r in tuner.fit() if infrastructure_error(r.error)}
    if not lost:
        return
    rerun = [t for t in planned_unfinished(writer.con, sweep_id) if t.trial_id in lost]
    print(f"{len(lost)} trial(s) ended with an infrastructure error after the restore (not their own failure); "
          f"running them again from their plan: {', '.join(sorted(lost))}", flush=True)
    if rerun:
        run_tuner(rerun, args, f"{sweep_id}-rerun-{int(time.time())}", storage)


def ray_state_readable(path: str) -> bool:
    """Whether Ray's experiment-state files under a local ``path`` parse (cloud URIs are left to Ray)."""
    if "://" in path:
        return True
    states = list(Path(path).glob("experiment_state*.json"))
    try:
        for state in states:
            json.loads(state.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(states)


def planned_unfinished(con: Any, sweep_id: str) -> list[PlannedTrial]:
    """The sweep's planned trials that did not complete or diverge, rebuilt from the ``trials`` table of an open
    connection (the driver's, which holds the file)."""
    rows = queries.unfinished_trials(con, sweep_id)
    memberships = queries.sweep_memberships(con, sweep_id)
    return [PlannedTrial(**{**r, "config": json.loads(r["config"])}, memberships=memberships.get(r["trial_id"], []))
            for r in rows]


def cmd_status(args: argparse.Namespace) -> int:
    con = connect(args.db, read_only=True)
    try:
        sweeps = queries.sweep_progress(con)
    finally:
        con.close()
    if not sweeps:
        print(f"{args.db}: no sweeps yet")
        return 0
    print(f"{'sweep':<36} {'study':<8} {'status':<12} {'model':<10} {'done':>9} {'bad':>5} {'open':>5}")
    for sid, study, status, init, planned, done, bad, open_, _ in sweeps:
        print(f"{sid:<36} {study:<8} {status:<12} {init or '':<10} {f'{done}/{planned}':>9} {bad:>5} {open_:>5}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """A short table of a sweep's results (the guide, issue 6, is the full report)."""
    from analysis.queries import group_summary, latest_sweep

    con = connect(args.db, read_only=True)
    sweep_id = args.sweep or latest_sweep(con)
    if sweep_id is None:
        raise LaunchError(f"{args.db}: no sweeps yet")
    rows = group_summary(con, sweep_id)
    con.close()
    print(f"database: {Path(args.db).resolve()}\nsweep {sweep_id}")
    if rows and rows[0][-1] != "pretrained":
        print(f"!! model_init={rows[0][-1]}: these numbers check the pipeline; they are no finding about pretrained GPT-2")
    print(f"{'task':<10} {'dimension':<13} {'group':<11} {'lr':>8} {'done':>4} {'test metric (mean ± sd)':>28} "
          f"{'trainable':>12} {'s/trial':>8}")
    for task, dim, group, _, lr, done, other, metric, _, mean, sd, params, wall, _ in rows:
        shown = f"{metric} {mean:.4f} ± {sd:.4f}" if mean is not None and sd is not None else (
            f"{metric} {mean:.4f} (1 seed)" if mean is not None else "-")
        print(f"{task:<10} {dim:<13} {group:<11} {lr:>8.1e} {done:>4} {shown:>28} {params or 0:>12,.0f} "
              f"{wall or 0:>8.1f}" + (f"  ({other} not completed)" if other else ""))
    return 0


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _name_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """A sweep id becomes a folder under --storage (Ray's experiment state, checkpoints): only a safe name."""
    named = [("--name", getattr(args, "name", None))]
    if args.command == "resume":
        named.append(("--sweep", args.sweep))
    return [(flag, f"{message}; choose another sweep id") for flag, value in named
            if value is not None and (message := name_problem(value)) is not None]


def _seed_problems(seeds: str | None) -> list[tuple[str, str]]:
    bad = [s for s in _split(seeds) or [] if not re.fullmatch(r"\d+", s)]
    return [("--seeds", f"{', '.join(map(repr, bad))} is not an integer >= 0; pass comma-separated seeds, e.g. 0,1,2")
            ] if bad else []


def _resource_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Per-trial resources Ray could never schedule (it would wait forever) or would refuse after starting."""
    problems = []
    cpus, gpus = getattr(args, "cpus_per_trial", None), getattr(args, "gpus_per_trial", None)
    if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
        problems.append(("--cpus-per-trial", f"must be a number > 0, got {cpus:g}"))
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        problems.append(("--gpus-per-trial", f"must be a number >= 0 (0: CPU only), got {gpus:g}"))
    elif gpus is not None and gpus > 1 and not gpus.is_integer():
        problems.append(("--gpus-per-trial", f"more than one GPU per trial must be a whole number, got {gpus:g}"))
    return problems


def _count_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Counts that have a floor: trials at once, retries, search samples."""
    floors = (("--max-concurrent", "max_concurrent", 1), ("--max-failures", "max_failures", 0),
              ("--num-samples", "num_samples", 1))
    return [(flag, f"must be an integer >= {floor}, got {value}") for flag, attr, floor in floors
            if (value := getattr(args, attr, None)) is not None and value < floor]


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad command-line values, every one at once, before a study is read, the database opened or Ray
    started."""
    problems = [*_name_problems(args), *_seed_problems(getattr(args, "seeds", None)), *_resource_problems(args),
                *_count_problems(args)]
    if problems:
        raise ConfigError(problems, "invalid arguments")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
        p.add_argument("--address", help="a running Ray cluster (e.g. auto); default: start Ray on this machine")
        p.add_argument("--node-ip-address", help="this machine's address as the cluster knows it (multi-homed hosts)")
        p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (default: 1 if "
                                                            "this machine has a GPU, else 0)")
        p.add_argument("--cpus-per-trial", type=float, default=1.0)

    grid = sub.add_parser("grid", help="run every planned trial of a study")
    grid.add_argument("--study", default="smoke", help="a shipped study (smoke, demo, guide) or a YAML path")
    grid.add_argument("--tasks", help="comma-separated subset of the study's tasks")
    grid.add_argument("--dimensions", help="comma-separated subset of the study's dimensions")
    grid.add_argument("--seeds", help="comma-separated seeds instead of the study's")
    grid.add_argument("--model", help="model.name for every trial")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key for all trials")
    grid.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    grid.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial from its checkpoint")
    grid.add_argument("--storage", help=f"Ray storage for experiment state and checkpoints (default {DEFAULT_STORAGE}"
                                        "; a cloud URI such as s3://bucket/path on clusters)")
    grid.add_argument("--name", help="sweep id (default: study name and UTC time)")
    grid.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    grid.add_argument("--dry-run", action="store_true", help="print the plan and its cost estimate only (measured "
                                                             "rates from --db's completed trials where it has them)")
    grid.add_argument("--preflight", type=Path, help="dry run: the rates a GPU preflight measured (sweeps/preflight.py"
                                                     f"'s JSON; default {PREFLIGHT_REPORT} where it exists) for trials "
                                                     "--db has no measured rates of")
    grid.add_argument("--format", choices=("text", "csv", "json"), default="text",
                      help="dry run: the plan as a table (text), or one row per trial as CSV or JSON on stdout (the "
                           "summary then goes to stderr)")
    common(grid)

    search = sub.add_parser("search", help="Optuna search with ASHA over one method's hyperparameters")
    search.add_argument("--task", required=True)
    search.add_argument("--method", required=True, choices=METHODS)
    search.add_argument("--num-samples", type=int, default=16)
    search.add_argument("--study", default="demo", help="the study whose base config and task settings to start from")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--seed", type=int, default=0, help="the search algorithm's seed")
    search.add_argument("--max-concurrent", type=int)
    search.add_argument("--max-failures", type=int, default=2)
    search.add_argument("--storage")
    search.add_argument("--name")
    search.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    common(search)

    resume = sub.add_parser("resume", help="continue an interrupted sweep (Tuner.restore)")
    resume.add_argument("--sweep", help="sweep id (default: the most recent)")
    resume.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    resume.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial from its checkpoint")
    common(resume)

    status = sub.add_parser("status", help="progress of each sweep, from the database")
    status.add_argument("--db", type=Path, default=DEFAULT_DB)

    summary = sub.add_parser("summary", help="a short table of a sweep's results")
    summary.add_argument("--db", type=Path, default=DEFAULT_DB)
    summary.add_argument("--sweep", help="sweep id (default: the most recent)")

    # listed for --help; main() hands everything after the word to sweeps/preflight.py's own parser
    sub.add_parser("preflight", add_help=False, help="check and time this GPU (sweeps/preflight.py; --help there)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["preflight"]:
        from sweeps.preflight import main as preflight_main

        return preflight_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        commands = {"grid": cmd_grid, "search": cmd_search, "resume": cmd_resume, "status": cmd_status,
                    "summary": cmd_summary}
        return commands[args.command](args)
    except (ConfigError, DatabaseError, LaunchError, DataError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

