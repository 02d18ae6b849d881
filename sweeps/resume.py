"""``launch.py resume``: continue a sweep from Ray's experiment state, repairing what a killed driver
leaves behind (a checkpoint lost at a rotation, a torn state file, trials lost to the infrastructure)."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis import queries
from analysis.db import OPEN, ResultsWriter, exception_chain
from sweeps import interrupts
from sweeps.cluster import start_ray
from sweeps.driver import LaunchError, report_interrupted, run_and_close, run_tuner, trial_trainable
from sweeps.study import PlannedTrial

if TYPE_CHECKING:
    from ray.tune import Tuner


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a sweep from Ray's experiment state; trials the database has as finished are not run again. The
    database is --db's, checked and locked before Ray starts and held to the end (wherever it was before)."""
    with ResultsWriter(args.db, existing=True) as writer:
        return _resume(args, writer)


def _resume(args: argparse.Namespace, writer: ResultsWriter) -> int:
    row = queries.sweep_to_resume(writer.con, args.sweep)
    if row is None:
        raise LaunchError(f"no sweep {'named ' + args.sweep if args.sweep else 'at all'} in {args.db}")
    sweep_id = row["id"]
    retry = getattr(args, "retry_failed", False)
    failed = [r["trial_id"] for r in queries.failed_trials(writer.con, sweep_id)] if retry else []
    if row["status"] == "completed" and not failed:
        print(f"sweep {sweep_id} already completed; nothing to " + ("retry" if retry else "resume"))
        return 0
    start_ray(args.address, args.node_ip_address)
    per_trial = json.loads(row["hardware"] or "{}").get("per_trial", {"cpu": 1.0, "gpu": 0.0})
    resources = {"cpu": per_trial["cpu"], "gpu": per_trial["gpu"]}
    args.cpus_per_trial, args.gpus_per_trial = resources["cpu"], resources["gpu"]
    try:  # a signal from here on leaves the sweep interrupted again, to resume
        with interrupts.held():
            writer.reopen_sweep(sweep_id)
            if failed:
                writer.retry_failed(sweep_id)
        return _continue(args, writer, row, failed)
    except interrupts.Interrupted as stop:
        return report_interrupted(writer, sweep_id, stop, 0.0)


def _continue(args: argparse.Namespace, writer: ResultsWriter, row: dict[str, Any], failed: list[str]) -> int:
    """Resume's run, once the sweep is reopened: restore Ray's experiment where it can, then the open trials."""
    from ray import tune

    sweep_id, storage = row["id"], row["storage_path"]
    path = f"{storage}/{sweep_id}"
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    if failed:
        print(f"retrying {len(failed)} failed trial(s) from step 0 (each earlier error is kept in trial_retries): "
              f"{', '.join(failed)}", flush=True)
    finished = writer.finished_results(sweep_id)
    restored = None
    if row["status"] == "completed":  # only the retried trials run: Ray's experiment has nothing else to do
        return run_and_close(lambda: run_open(args, writer, sweep_id, storage), writer, sweep_id)
    print(f"resuming sweep {sweep_id} from {path}", flush=True)
    if tune.Tuner.can_restore(path) and ray_state_readable(path):
        for note in repair_lost_checkpoints(path):
            print(note, flush=True)
        try:
            restored = tune.Tuner.restore(path, trial_trainable(finished, storage, resources),
                                          resume_unfinished=True, resume_errored=False)
        except (EOFError, pickle.UnpicklingError) as err:  # tuner.pkl cut short (a full disk, a kill mid-write)
            print(f"Ray's saved tuner in {path} is unreadable ({type(err).__name__}: {err}).", flush=True)
    if restored is not None:
        return run_and_close(lambda: fit_then_run_open(restored, args, writer, sweep_id, storage), writer,
                              sweep_id)
    # Ray writes its experiment state in place; a driver killed mid-write (or a full disk) leaves it torn (and Ray
    # would then restart the experiment with an empty plan), and a driver stopped before Ray started left none. The
    # database knows which trials finished; the rest run again from their plan, in-flight ones from step 0.
    print(f"Ray's experiment state in {path} is missing or unreadable (the driver was probably stopped before Ray "
          "saved it, or killed while writing it, or the disk was full); running the "
          f"{len(open_trials(writer.con, sweep_id))} unfinished trials again from their plan.", flush=True)
    return run_and_close(lambda: run_open(args, writer, sweep_id, storage), writer, sweep_id)


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
    (cloud URIs are left to Ray; ``fit_then_run_open`` still catches the failure there). What it did, one line per
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


def fit_then_run_open(tuner: Tuner, args: argparse.Namespace, writer: ResultsWriter, sweep_id: str,
                      storage: str) -> None:
    """Run a restored Tuner; then run from their plan the trials it left to do: those Ray ended with an
    infrastructure error (``infrastructure_error``) rather than leave them recorded as failed, and those still open
    in the database that Ray's experiment does not run (retried failures, trials of an earlier rerun)."""
    from sweeps.ray_trial import spec_from_param

    lost = {spec_from_param(r.config)["trial_id"] for r in interrupts.fit(tuner) if infrastructure_error(r.error)}
    if lost:
        print(f"{len(lost)} trial(s) ended with an infrastructure error after the restore (not their own failure); "
              f"running them again from their plan: {', '.join(sorted(lost))}", flush=True)
    run_open(args, writer, sweep_id, storage, also=lost)


def run_open(args: argparse.Namespace, writer: ResultsWriter, sweep_id: str, storage: str,
             also: set[str] | frozenset[str] = frozenset()) -> None:
    """Run from their plan, as a Ray experiment of their own, the sweep's open trials (and ``also``), if any."""
    rerun = open_trials(writer.con, sweep_id, also)
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


def open_trials(con: Any, sweep_id: str, also: set[str] | frozenset[str] = frozenset()) -> list[PlannedTrial]:
    """The sweep's planned trials still open (pending, running, interrupted), and those of ``also`` that did not
    complete or diverge, rebuilt from the ``trials`` table of an open connection (the driver's, which holds the
    file)."""
    rows = [r for r in queries.unfinished_trials(con, sweep_id) if r.pop("status") in OPEN or r["trial_id"] in also]
    memberships = queries.sweep_memberships(con, sweep_id)
    return [PlannedTrial(**{**r, "config": json.loads(r["config"])}, memberships=memberships.get(r["trial_id"], []))
            for r in rows]
