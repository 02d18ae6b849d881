"""Ray Tune's side of a trial: the function trainable (a thin adapter over ``sweeps.loop.run_trial``) and the
driver-side callback that turns Tune's events into DuckDB rows. Trials report to Ray; only the driver writes the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from analysis.db import ResultsWriter, trial_row
from sweeps.config import TrialConfig
from sweeps.loop import TrialResult, run_trial
from sweeps.records import CheckpointRecord, EvalRecord, FinalRecord, Record, metric_key, record_from_report
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


def trainable(param: dict[str, Any], finished: dict[str, str] | None = None, export_root: str | None = None) -> None:
    """Run one planned trial. Resumes from Tune's checkpoint after a failure; reports every record to Tune.

    ``finished`` (given on ``launch.py resume``) holds the final records (JSON) of trials the database already has
    as completed: Ray may schedule such a trial again when the driver died between its last report and its end; it
    then reports its recorded result instead of training again.
    """
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


def export_trial(result: TrialResult, config: TrialConfig, out: Path) -> None:
    """The final weights where ``dpo.init=<trial id>`` finds them (a retried trial replaces its earlier export)."""
    if out.exists():
        shutil.rmtree(out)
    export(result, config, out)


class DuckDBCallback(tune.Callback):
    """Writes every Tune event of a sweep into the study database, idempotently, from the driver."""

    def __init__(self, db_path: str | Path, specs: dict[str, dict[str, Any]], progress: bool = True) -> None:
        self.writer = ResultsWriter(db_path)
        self.specs = specs
        self.progress = progress
        self.finished: set[str] = set()  # trials whose final record arrived

    def _spec(self, trial: Any) -> dict[str, Any]:
        if "trial" in trial.config:
            return self.specs[trial.config["trial"]["trial_id"]]
        return spec_from_param(trial.config)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.writer.write_trial(trial_row(self._spec(trial), "running"))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        spec = self._spec(trial)
        record = record_from_report(result)
        if record is None:
            return
        if not isinstance(record, FinalRecord):
            self.writer.write_metric_rows(spec["trial_id"], record.metric_rows())
            return
        self.finished.add(spec["trial_id"])
        self.writer.write_final(spec, record)
        if self.progress:
            shown = record.test.get(record.primary_metric)
            print(f"trial {spec['trial_id']} {record.db_status}" + (
                f" test {record.primary_metric}={shown:.4f}" if shown is not None else ""), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that ended without its final record was stopped by the scheduler (ASHA) or the user: recorded
        with its task's primary metric and the last validation it reported."""
        spec = self._spec(trial)
        if spec["trial_id"] not in self.finished:
            last = trial.last_result or {}
            record = FinalRecord.ended(spec["config"]["task.name"], "stopped", step=int(last.get("step") or 0),
                                       last_eval=EvalRecord.from_report(last),
                                       error="stopped early by the scheduler (ASHA) or the user")
            self.writer.write_trial(trial_row(spec, record.db_status, record.to_row(), error=record.error))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error()
        error = str(error) if error is not None else "trial raised an error (see Ray's trial log)"
        self.writer.write_trial(trial_row(self._spec(trial), "failed", error=error[-4000:]))
        if self.progress:
            print(f"trial {self._spec(trial)['trial_id']} failed", flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.close()

