"""Ray Tune's side of a trial: the function trainable (a thin adapter over ``sweeps.loop.run_trial``) and the
driver-side callback that turns Tune's events into DuckDB rows. Trials report to Ray; only the driver writes the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from analysis.db import WRITE_ERRORS, DatabaseError, ResultsWriter, trial_row
from sweeps import interrupts
from sweeps.checkpoints import NoGoodCheckpoint
from sweeps.config import TrialConfig
from sweeps.costs import trial_cost
from sweeps.loop import TrialResult, run_trial
from sweeps.progress import (
    DEFAULT_PROGRESS_INTERVAL_S,
    PROGRESS_INTERVAL_S,
    estimate_eta,
    progress_line,
    render_progress,
)
from sweeps.records import (
    CheckpointRecord,
    EvalRecord,
    FinalRecord,
    MetricRow,
    Record,
    metric_key,
    record_from_report,
)
from sweeps.study import trial_id
from sweeps.train import export


def spec_from_param(param: dict[str, Any]) -> dict[str, Any]:
    """The planned-trial spec of a Tune config: given as such by grid sweeps; built from the base config and the
    sampled flat keys for searches (the same function on both sides, so ids agree)."""
    if "trial" in param:
        return param["trial"]
    search = param["search"]
    config = TrialConfig.from_flat({**search["base"], **{k: v for k, v in param.items() if "." in k}}).to_flat()
    return {"trial_id": trial_id(search["sweep_id"], config, f"search-{search['group']}"),
            "sweep_id": search["sweep_id"], "study": search["study"], "dimension": "search",
            "group": search["group"], "config": config}


def trainable(param: dict[str, Any], finished: dict[str, str] | None = None, export_root: str | None = None,
              env: dict[str, str] | None = None) -> None:
    """Run one planned trial. Resumes from Tune's checkpoint after a failure; reports every record to Tune.

    A damaged checkpoint falls back to the newest good one Tune kept beside it in the trial folder (local storage;
    ``sweeps.checkpoints.resume``), noted in the final record; when none is good the trial is recorded as failed,
    naming each checkpoint and its damage.

    ``finished`` (given on ``launch.py resume``) holds the final records (JSON) of trials the database already has
    as completed: Ray may schedule such a trial again when the driver died between its last report and its end; it
    then reports its recorded result instead of training again.

    ``env``: the driver's variables for its trials (``sweeps.cluster.trial_env``: the data folder, the token cache),
    set here before anything reads them, in a worker that may run on another machine.
    """
    os.environ.update(env or {})
    spec = spec_from_param(param)
    node_id = ray.get_runtime_context().get_node_id()
    ids = {"node_id": node_id, "trial_id": spec["trial_id"]}
    if finished and spec["trial_id"] in finished:
        record = FinalRecord.from_dict(json.loads(finished[spec["trial_id"]]))
        tune.report({**record.to_report(), **ids, "replayed": True})
        return
    config = TrialConfig.from_flat(spec["config"])
    checkpoint = tune.get_checkpoint()
    latest: dict[str, Any] = {}  # the last validation metrics ride along on every later report (searchers want them)

    def report(record: Record) -> None:
        if isinstance(record, FinalRecord):
            record = dataclasses.replace(record, node_id=node_id)
        if isinstance(record, EvalRecord):
            latest.update({metric_key(record.split, k): v for k, v in record.metrics.items()})
        metrics = {**latest, **record.to_report(), **ids}
        if isinstance(record, CheckpointRecord):
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(record.path))
        else:
            tune.report(metrics)

    with tempfile.TemporaryDirectory(prefix="trial-") as work, (
        checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext()
    ) as resume_dir:
        try:
            result = run_trial(config, report, checkpoint_dir=work, resume_from=resume_dir)
            if config.train.export and export_root and result.record.db_status == "completed":
                export_trial(result, config, Path(export_root) / spec["trial_id"])
        except (MemoryError, torch.cuda.OutOfMemoryError) as err:  # out of memory: recorded once, never retried
            report(FinalRecord.ended(config.task.name, "failed", error=f"out of memory: {err}"))
        except NoGoodCheckpoint as err:  # a retry would find the same damaged files: recorded once, clearly
            report(FinalRecord.ended(config.task.name, "failed", error=str(err)))


def export_trial(result: TrialResult, config: TrialConfig, out: Path) -> None:
    """The final weights where ``dpo.init=<trial id>`` finds them (a retried trial replaces its earlier export)."""
    if out.exists():
        shutil.rmtree(out)
    export(result, config, out)


_driver_writer: ResultsWriter | None = None  # the sweep driver's open database (writing_to), for every callback


@contextlib.contextmanager
def writing_to(writer: ResultsWriter) -> Iterator[None]:
    """Callbacks without a writer of their own write through ``writer`` while this lasts. Ray pickles callbacks
    with the experiment and ``Tuner.restore`` brings them back as they were: the database they write is the one the
    driver holds now (``launch.py resume --db``), never one remembered from an earlier run."""
    global _driver_writer
    previous, _driver_writer = _driver_writer, writer
    try:
        yield
    finally:
        _driver_writer = previous


def _trial_error(trial: Any) -> str:
    """The error text Ray wrote for a failed trial. Read from the driver's staging folder, where Ray writes it first:
    the copy on storage (``Trial.get_error``) only appears with the next upload of the experiment state."""
    local = trial.error_file
    if local and Path(local).is_file():
        return Path(local).read_text(errors="replace")
    error = trial.get_error()
    return str(error) if error is not None else "trial raised an error (see Ray's trial log)"


def error_line(error: str | None) -> str:
    """The line of an error that says what went wrong: the last line of a traceback (the exception and its
    message), else the first non-empty line."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return "no error message recorded"
    tail = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Failure)\b", line)), None)
    return (tail or lines[0])[:300]


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


class DuckDBCallback(tune.Callback):
    """Writes every Tune event of a sweep into the study database, idempotently, from the driver.

    ``db`` None (the launcher): the driver's writer (``writing_to``), opened and locked before Ray started and held
    until the sweep ends. A path (tests, scripts): a writer of its own, closed at the experiment's end.

    A trial's learning-curve rows (its step and evaluation reports) are written together when it reports a checkpoint
    and when it ends (final record, error, stop, the sweep's end), not one statement a report: the driver handles
    every report of every trial in turn, while the trial waits, and a DuckDB statement costs it ~10 ms. Nothing is
    lost to a killed driver: the rows up to a checkpoint are written before Ray registers that checkpoint (Tune calls
    ``on_trial_result`` first), and a resumed trial restarts from its newest registered checkpoint and reports the
    later steps again."""

    def __init__(self, db: str | Path | None, specs: dict[str, dict[str, Any]], progress: bool = True,
                 device: str = "gpu") -> None:
        self._own = ResultsWriter(db) if db is not None else None
        self.specs = specs
        self.progress = progress
        self.device = device  # what the trials run on (gpu or cpu): the ETA weighs each trial by its cost there
        self.finished: set[str] = set()  # trials whose final record arrived
        self.unwritten: dict[str, list[MetricRow]] = {}  # each trial's learning-curve rows since its last checkpoint

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_own": None, "unwritten": {}}  # restored, it writes where the driver says

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"unwritten": {}, **state})  # (a callback pickled before it held rows: none held)

    @property
    def writer(self) -> ResultsWriter:
        writer = getattr(self, "_own", None) or _driver_writer  # (a callback pickled before _own: none)
        if writer is None:
            raise DatabaseError("the sweep's DuckDB callback runs without a database: run it inside "
                                "sweeps.ray_trial.writing_to(writer)")
        return writer

    def _spec(self, trial: Any) -> dict[str, Any]:
        if "trial" in trial.config:
            return self.specs[trial.config["trial"]["trial_id"]]
        return spec_from_param(trial.config)

    # Each event's rows are written inside interrupts.held(): a second Ctrl-C waits for the write to end.

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with interrupts.held():
            self.writer.write_trial(trial_row(self._spec(trial), "running"))
        self._state()["began"][self._spec(trial)["trial_id"]] = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        with interrupts.held():
            self._write_result(trial, result)

    def _write_result(self, trial: Any, result: dict) -> None:
        spec = self._spec(trial)
        record = record_from_report(result)
        if record is None:
            return
        if not isinstance(record, FinalRecord):
            self.unwritten.setdefault(spec["trial_id"], []).extend(record.metric_rows())
            if isinstance(record, CheckpointRecord):
                self._write_rows(spec["trial_id"])
            return
        self.finished.add(spec["trial_id"])
        with self.writer.transaction():
            self._write_rows(spec["trial_id"])
            self.writer.write_final(spec, record)
        began = self._state()["began"].get(spec["trial_id"])
        if record.db_status == "completed" and began is not None and not result.get("replayed"):
            self._state()["ran"].append((self._cost(spec), time.monotonic() - began))  # the ETA's pace
        if record.db_status == "failed":
            self._failed_ids().add(spec["trial_id"])
        if self.progress:
            shown = record.test.get(record.primary_metric)
            self._say(f"trial {spec['trial_id']} {record.db_status}" + (
                f" test {record.primary_metric}={shown:.4f}" if shown is not None else ""))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that ended without its final record was stopped by the scheduler (ASHA) or the user: recorded
        with its task's primary metric and the last validation it reported."""
        spec = self._spec(trial)
        with interrupts.held(), self.writer.transaction():
            self._write_rows(spec["trial_id"])
            if spec["trial_id"] not in self.finished:
                last = trial.last_result or {}
                record = FinalRecord.ended(spec["config"]["task.name"], "stopped", step=int(last.get("step") or 0),
                                           last_eval=EvalRecord.from_report(last),
                                           error="stopped early by the scheduler (ASHA) or the user")
                self.writer.write_trial(trial_row(spec, record.db_status, record.to_row(), error=record.error))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _trial_error(trial)
        with interrupts.held(), self.writer.transaction():
            self._write_rows(self._spec(trial)["trial_id"])
            self.writer.write_trial(trial_row(self._spec(trial), "failed", error=error[-4000:]))
        self._failed_ids().add(self._spec(trial)["trial_id"])
        if self.progress:
            self._say(f"trial {self._spec(trial)['trial_id']} failed: {error_line(error)}")

    # progress (driver output): set up afresh by every run (a callback restored from Ray's pickle included)

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        self._progress = {"started": time.monotonic(), "total": total_num_samples or 0,
                          "shown_at": None, "drawn": False, "failed": set(),
                          "began": {}, "ran": [], "slots": 0, "costs": {},
                          "tty": sys.stdout.isatty(), "interval": float(os.environ.get(PROGRESS_INTERVAL_S) or
                                                                      DEFAULT_PROGRESS_INTERVAL_S)}

    def _state(self) -> dict[str, Any]:
        if getattr(self, "_progress", None) is None:
            self.setup()
        return self._progress

    def _failed_ids(self) -> set[str]:
        return self._state()["failed"]

    def _say(self, text: str) -> None:
        """A line of its own; on a terminal the progress line is cleared first and redrawn at the next step."""
        state = self._state()
        if state["drawn"]:
            sys.stdout.write("\r\x1b[K")
            state["drawn"], state["shown_at"] = False, None
        print(text, flush=True)

    def progress_now(self, trials: list) -> str:
        """The progress line for Tune's current ``trials``."""
        state, now = self._state(), time.monotonic()
        statuses = [getattr(t, "status", "") for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in statuses)
        running = [t for t, s in zip(trials, statuses, strict=True) if s == "RUNNING"]
        pending = [t for t, s in zip(trials, statuses, strict=True) if s == "PENDING"]
        total = max(len(trials), state["total"])
        state["slots"] = max(state["slots"], len(running))
        busy = [(self._cost(spec), now - state["began"].get(spec["trial_id"], now))
                for spec in map(self._spec, running)]
        waiting = [self._cost(self._spec(t)) for t in pending]
        unmade = total - len(trials)  # a search's trials its searcher has not suggested yet
        known = [c for c, _ in busy] + waiting + [c for c, _ in state["ran"]]
        waiting += [sum(known) / len(known) if known else 1.0] * unmade
        eta = estimate_eta(state["ran"], busy, waiting, state["slots"])
        return progress_line(done, len(state["failed"]), len(running), total - done - len(running), total,
                             now - state["started"], eta)

    def _cost(self, spec: dict[str, Any]) -> float:
        """A trial's planned seconds (``sweeps.costs.trial_cost``), the weight it has in the ETA."""
        costs = self._state()["costs"]
        if spec["trial_id"] not in costs:
            costs[spec["trial_id"]] = trial_cost(spec["config"], getattr(self, "device", "gpu")).total_s
        return costs[spec["trial_id"]]

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if not self.progress or not trials:
            return
        state = self._state()
        now = time.monotonic()
        wait = 1.0 if state["tty"] else state["interval"]
        if state["shown_at"] is not None and now - state["shown_at"] < wait:
            return
        if state["shown_at"] is None and not state["tty"]:  # logs: the first line after one interval
            state["shown_at"] = now
            return
        state["shown_at"] = now
        sys.stdout.write(render_progress(self.progress_now(trials), state["tty"], _terminal_width()))
        sys.stdout.flush()
        state["drawn"] = state["tty"]

    def _write_rows(self, trial_id: str) -> None:
        """Write the trial's learning-curve rows held since its last checkpoint."""
        rows = self.unwritten.pop(trial_id, None)
        if rows:
            self.writer.write_metric_rows(trial_id, rows)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Rows still held belong to trials that did not end (a sweep stopped by Ctrl-C or an error): written when the
        # database allows, for the record; a resumed trial reports them again from its checkpoint if not.
        with interrupts.held(), contextlib.suppress(*WRITE_ERRORS):
            for trial_id in list(self.unwritten):
                self._write_rows(trial_id)
        if self.progress and trials and not interrupts.stopping():  # a stop ends trials that did not finish
            self._say(self.progress_now(trials))
        if getattr(self, "_own", None) is not None:  # the driver keeps its writer: it records how the sweep ended
            self._own.close()

