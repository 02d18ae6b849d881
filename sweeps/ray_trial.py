"""Ray Tune's side of a trial: the function trainable (a thin adapter over ``sweeps.loop.run_trial``) and the
driver-side callback that turns Tune's events into DuckDB rows. Trials report to Ray; only the driver writes the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from analysis.db import ResultsWriter, trial_row
from sweeps.config import TrialConfig
from sweeps.loop import run_trial
from sweeps.study import trial_id
from sweeps.train import export

FAIL_ONCE_ENV = "FINETUNE_TEST_FAIL_ONCE_DIR"  # tests only: each trial raises once after its first checkpoint


def _scalars(record: dict[str, Any]) -> dict[str, Any]:
    """Ray results stay flat: numbers and short strings; lists and dicts travel as one JSON string."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool | int | float | str) or value is None:
            out[key] = value
    return out


def spec_from_param(param: dict[str, Any]) -> dict[str, Any]:
    """The planned-trial spec of a Tune config: given as such by grid sweeps; built from the base config and the
    sampled flat keys for searches (the same function on both sides, so ids agree)."""
    if "trial" in param:
        return param["trial"]
    search = param["search"]
    config = TrialConfig.from_flat({**search["base"], **{k: v for k, v in param.items() if "." in k}}).to_flat()
    return {"trial_id": trial_id(search["sweep_id"], "search", search["group"], config),
            "sweep_id": search["sweep_id"], "study": search["study"], "dimension": "search",
            "group": search["group"], "config": config}


def trainable(param: dict[str, Any], finished: dict[str, str] | None = None, export_root: str | None = None) -> None:
    """Run one planned trial. Resumes from Tune's checkpoint after a failure; reports every record to Tune.

    ``finished`` (given on ``launch.py resume``) holds the final records of trials the database already has as
    completed: Ray may schedule such a trial again when the driver died between its last report and its end; it then
    reports its recorded result instead of training again.
    """
    spec = spec_from_param(param)
    if finished and spec["trial_id"] in finished:
        record = json.loads(finished[spec["trial_id"]])
        tune.report({**_scalars(record), "event": "final", "trial_id": spec["trial_id"], "replayed": True,
                     "final_json": finished[spec["trial_id"]]})
        return
    config = TrialConfig.from_flat(spec["config"])
    checkpoint = tune.get_checkpoint()
    node_id = ray.get_runtime_context().get_node_id()
    fail_dir = os.environ.get(FAIL_ONCE_ENV)

    with tempfile.TemporaryDirectory(prefix="trial-") as work, (
        checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext()
    ) as resume_dir:
        resume_from = Path(resume_dir) if resume_dir is not None else None

        latest: dict[str, Any] = {}  # the last validation metrics ride along on every later report (searchers want them)

        def report(record: dict[str, Any]) -> None:
            event = record["event"]
            if event == "eval":
                latest.update({k: v for k, v in record.items() if k.startswith("val_")})
            metrics = {**latest, **_scalars(record), "node_id": node_id, "trial_id": spec["trial_id"]}
            if event == "checkpoint":
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(record["checkpoint"]))
                marker = Path(fail_dir) / spec["trial_id"] if fail_dir else None
                if marker is not None and not marker.exists():
                    marker.touch()
                    raise RuntimeError(f"injected failure after step {record['step']} (test hook {FAIL_ONCE_ENV})")
            elif event == "final":
                metrics["final_json"] = json.dumps(record, default=str)
                tune.report(metrics)
            else:
                tune.report(metrics)

        try:
            result = run_trial(config, report, checkpoint_dir=work, resume_from=resume_from)
            if config.train.export and export_root and result["status"] in ("completed", "early_stopped"):
                export_trial(result, config, Path(export_root) / spec["trial_id"])
        except (MemoryError, torch.cuda.OutOfMemoryError) as err:  # out of memory: recorded once, never retried
            tune.report({"event": "final", "status": "failed", "node_id": node_id, "trial_id": spec["trial_id"],
                         "error": f"out of memory: {err}", "final_json": json.dumps({"status": "failed"})})


def export_trial(result: dict[str, Any], config: TrialConfig, out: Path) -> None:
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
        event = result.get("event")
        step = int(result.get("step") or 0)
        if event == "step":
            self.writer.write_metrics(spec["trial_id"], step, "train",
                                      {k: result.get(k) for k in ("loss", "lr", "tokens_per_s", "tokens_seen")})
        elif event == "eval":
            self.writer.write_metrics(spec["trial_id"], step, "validation",
                                      {k[4:]: v for k, v in result.items() if k.startswith("val_")})
        elif event == "final":
            self.finished.add(spec["trial_id"])
            final = json.loads(result["final_json"])
            final.setdefault("error", result.get("error"))
            status = {"completed": "completed", "early_stopped": "completed", "diverged": "diverged",
                      "failed": "failed"}[final["status"]]
            final["node_id"] = result.get("node_id")
            self.writer.write_trial(trial_row(spec, status, final, error=final.get("error")))
            for split, prefix in (("validation", "val_"), ("test", "test_")):
                self.writer.write_metrics(spec["trial_id"], int(final.get("step") or step), split,
                                          {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)})
            for point in final.get("history") or []:
                self.writer.write_metrics(spec["trial_id"], int(point["step"]), "validation",
                                          {k[4:]: v for k, v in point.items() if k.startswith("val_")})
            if self.progress:
                shown = final.get(f"test_{final.get('primary_metric')}")
                print(f"trial {spec['trial_id']} {status}" + (f" test {final.get('primary_metric')}={shown:.4f}"
                      if isinstance(shown, float) else ""), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that ended without its final record was stopped by the scheduler (ASHA) or the user."""
        spec = self._spec(trial)
        if spec["trial_id"] not in self.finished:
            last = trial.last_result or {}
            seen = {k: v for k, v in last.items() if k.startswith("val_")}
            primary = "perplexity" if "val_perplexity" in seen else "accuracy"
            self.writer.write_trial(trial_row(spec, "stopped", {"step": last.get("step"), "primary_metric": primary,
                                                                **seen},
                                              error="stopped early by the scheduler (ASHA) or the user"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error()
        error = str(error) if error is not None else "trial raised an error (see Ray's trial log)"
        self.writer.write_trial(trial_row(self._spec(trial), "failed", error=error[-4000:]))
        if self.progress:
            print(f"trial {self._spec(trial)['trial_id']} failed", flush=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.close()

