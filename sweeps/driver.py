"""The sweep driver: run a study's plan on Ray Tune, every result written through one DuckDB writer it
holds from before Ray starts to the sweep's end, and how the sweep ended recorded."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import queries
from analysis.db import (
    TERMINAL,
    DiskFullError,
    ResultsWriter,
    disk_full,
    exception_chain,
    membership_rows,
    trial_row,
)
from model import CheckpointError, ConfigError
from model.checkpoint import resolve_checkpoint
from sweeps import interrupts
from sweeps.cluster import check_trial_resources, start_cluster, trial_env, trial_gpus
from sweeps.dry_run import print_plan
from sweeps.study import PlannedTrial, Study, duplicates_removed, load_study, plan, resolve_init
from sweeps.train import parse_sets

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



def trial_trainable(finished: dict[str, str], storage: str, resources: dict[str, float]) -> Any:
    """The shipped trainable with its resources and this driver's variables for its trials (``trial_env``);
    imported when called, so a test wrapper installed there is used."""
    from ray import tune

    from sweeps.ray_trial import trainable

    return tune.with_resources(tune.with_parameters(trainable, finished=finished, export_root=export_root(storage),
                                                    env=trial_env(os.environ)), resources)


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
            callbacks=[DuckDBCallback(None, specs, device="gpu" if args.gpus_per_trial else "cpu"),  # the driver's writer
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
    interrupts.fit(make_tuner(args, sweep_id, storage, {"trial": tune.grid_search(list(specs.values()))}, specs))


def export_root(storage: str) -> str | None:
    """Where trials with ``train.export`` keep their final weights (``<storage>/exports/<trial id>``)."""
    return None if "://" in storage else str(Path(storage) / "exports")


def storage_path(args: argparse.Namespace) -> str:
    value = args.storage or str(DEFAULT_STORAGE)
    return value if "://" in value else str(Path(value).resolve())



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
    selection = {"tasks": split_list(args.tasks), "dimensions": split_list(args.dimensions),
                 "seeds": [int(s) for s in split_list(args.seeds)] if args.seeds else None}
    trials = plan(study, sweep_id, overrides=overrides, **selection)
    storage = storage_path(args)
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
        try:  # a signal from here on leaves the sweep interrupted, to resume (before: nothing written)
            print(f"sweep {sweep_id}: {len(trials)} trials ({duplicates_removed(trials)} duplicate configurations "
                  f"shared, not trained twice), database {args.db}, Ray storage {storage}/{sweep_id}", flush=True)
            return run_and_close(lambda: run_tuner(trials, args, sweep_id, storage), writer, sweep_id)
        except interrupts.Interrupted as stop:
            return report_interrupted(writer, sweep_id, stop, 0.0)


def run_and_close(run: Any, writer: ResultsWriter, sweep_id: str) -> int:
    """Run the Tuner, its callbacks writing through the driver's ``writer``, and record how the sweep ended.

    - SIGINT or SIGTERM (``sweeps.interrupts``): the sweep and its running trials ``interrupted``, one line with the
      resume command, and exit code 130 or 143.
    - Any other error: the sweep ``interrupted``, and the error raised again (a full disk as one clear DiskFullError).
    - Otherwise ``completed``, with trial counts: exit code 0, or FAILED_TRIALS_EXIT when trials ended failed (named on
      stderr)."""
    from sweeps.ray_trial import writing_to

    db = writer.path
    started = time.perf_counter()
    try:
        with writing_to(writer):
            run()
    except interrupts.Interrupted as stop:
        return report_interrupted(writer, sweep_id, stop, time.perf_counter() - started)
    except BaseException as err:
        if (stop := interrupts.interrupt_in(err)) is not None:  # a signal raised inside compiled code, then wrapped
            return report_interrupted(writer, sweep_id, stop, time.perf_counter() - started)
        interrupts.ignore()  # the closing writes are not cut short by a signal
        marked = writer.end_sweep_if_possible(sweep_id, "interrupted")
        if disk_full(err):
            raise full_disk_error(db, sweep_id, err, marked) from None
        raise
    interrupts.ignore()  # Ray is done: a signal now would only cut the closing writes in half
    try:
        writer.end_sweep(sweep_id, "completed")
        counts = writer.trial_counts(sweep_id)
    except Exception as err:
        if disk_full(err):
            raise full_disk_error(db, sweep_id, err, writer.end_sweep_if_possible(sweep_id, "completed")) from None
        raise
    print(f"sweep {sweep_id} ended after {time.perf_counter() - started:.0f} s: {counts}; database {db}", flush=True)
    return report_failed(queries.failed_trials(writer.con, sweep_id), db)


def resume_command(db: Path, sweep_id: str) -> str:
    return f"python sweeps/launch.py resume --db {shlex.quote(str(db))} --sweep {shlex.quote(sweep_id)}"


def report_interrupted(writer: ResultsWriter, sweep_id: str, stop: interrupts.Interrupted, seconds: float) -> int:
    """Mark the sweep and its running trials interrupted; one line on stderr (trials finished, the command that
    resumes); the exit code, 128 + the signal's number."""
    interrupts.ignore()  # the closing writes are not cut short by a third signal
    marked = writer.end_sweep_if_possible(sweep_id, "interrupted")
    try:
        counts = writer.trial_counts(sweep_id)
    except Exception:  # the line is still owed to the user
        counts = {}
    finished = sum(n for status, n in counts.items() if status in TERMINAL)
    state = "" if marked else " (the database could not be written: it still says running)"
    print(f"sweep {sweep_id} interrupted by {stop.name} after {seconds:.0f} s{state}: {finished} of "
          f"{sum(counts.values())} trials finished; resume with: {resume_command(writer.path, sweep_id)}",
          file=sys.stderr, flush=True)
    return stop.exit_code


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
                         f"Free some space, then: {resume_command(db, sweep_id)}")



def split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None
