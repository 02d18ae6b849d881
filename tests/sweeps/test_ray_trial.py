"""The driver-side callback: records from Ray's results into DuckDB rows, with the task's own metric."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import duckdb

from sweeps.config import TrialConfig
from sweeps.ray_trial import DuckDBCallback
from sweeps.records import EvalRecord, StepRecord


def test_asha_stopped_dpo_trial_stores_preference_accuracy(tmp_path: Path) -> None:
    """ASHA ends a trial between reports, so no final record arrives: the row must still name the task's primary
    metric (not a guess) and keep the last validation value. The stop is forced here, not left to the scheduler."""
    config = TrialConfig.from_flat({"task.name": "preference", "method.name": "lora", "dpo.beta": 0.3}).to_flat()
    spec = {"trial_id": "search-lora-1", "sweep_id": "s", "study": "smoke", "dimension": "search",
            "group": "lora", "config": config}
    db = tmp_path / "db.duckdb"
    callback = DuckDBCallback(db, {spec["trial_id"]: spec}, progress=False)
    trial = SimpleNamespace(config={"trial": spec}, last_result=None)
    callback.on_trial_start(0, [], trial)
    evaluation = EvalRecord(4, {"preference_accuracy": 0.625, "reward_margin": 0.2, "loss": 0.68}).to_report()
    step = StepRecord(6, 0, 0.61, 1e-3, 900.0, 1536).to_report()
    latest = {k: v for k, v in evaluation.items() if k.startswith("val_")}  # what the trainable carries along
    for report in (evaluation, {**latest, **step}):
        callback.on_trial_result(0, [], trial, {**report, "trial_id": spec["trial_id"], "training_iteration": 1})
        trial.last_result = {**report, "trial_id": spec["trial_id"]}
    callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    con = duckdb.connect(str(db), read_only=True)
    row = con.execute("SELECT status, primary_metric, higher_is_better, val_primary, steps, error FROM trials"
                      ).fetchone()
    assert row[:5] == ("stopped", "preference_accuracy", True, 0.625, 6) and "ASHA" in row[5]
    curves = con.execute("SELECT split, name, step FROM metrics ORDER BY split, name").fetchall()
    assert ("validation", "preference_accuracy", 4) in curves and ("train", "loss", 6) in curves


def test_final_record_writes_predictions_once_even_when_replayed(tmp_path: Path) -> None:
    from sweeps.records import FinalRecord

    config = TrialConfig.from_flat({"task.name": "sms_spam"}).to_flat()
    spec = {"trial_id": "method-full-1", "sweep_id": "s", "study": "smoke", "dimension": "method",
            "group": "full", "config": config}
    db = tmp_path / "db.duckdb"
    callback = DuckDBCallback(db, {spec["trial_id"]: spec}, progress=False)
    trial = SimpleNamespace(config={"trial": spec}, last_result=None)
    record = FinalRecord(status="completed", task="sms_spam", task_kind="classification", primary_metric="accuracy",
                         higher_is_better=True, step=3, test={"accuracy": 2 / 3},
                         predictions={"test": {"example": [0, 1, 2], "label": [1, 0, 1], "prediction": [1, 1, 1]}})
    for _ in range(2):  # Ray replays results after a restore
        callback.on_trial_result(0, [], trial, {**record.to_report(), "trial_id": spec["trial_id"]})
    callback.on_experiment_end([])
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT split, example, label, prediction, correct FROM predictions ORDER BY example").fetchall()
    assert rows == [("test", 0, 1, 1, True), ("test", 1, 0, 1, False), ("test", 2, 1, 1, True)]
    assert con.execute("SELECT result->'predictions' FROM trials").fetchone()[0] is None


def test_final_record_writes_its_generations_to_their_table(tmp_path: Path) -> None:
    """DPO's start and final generations reach the generations table through the report, once, and not
    trials.result."""
    from sweeps.records import FinalRecord, Generation

    config = TrialConfig.from_flat({"task.name": "preference"}).to_flat()
    spec = {"trial_id": "dpo-full-1", "sweep_id": "s", "study": "smoke", "dimension": "dpo", "group": "full",
            "config": config}
    db = tmp_path / "db.duckdb"
    callback = DuckDBCallback(db, {spec["trial_id"]: spec}, progress=False)
    trial = SimpleNamespace(config={"trial": spec}, last_result=None)
    generations = [Generation(stage, i, f"p{i}", f"r{i}", f"{stage}{i}") for stage in ("start", "final")
                   for i in range(2)]
    record = FinalRecord(status="completed", task="preference", task_kind="preference",
                         primary_metric="preference_accuracy", higher_is_better=True, step=3, generations=generations)
    for _ in range(2):  # Ray replays results after a restore
        callback.on_trial_result(0, [], trial, {**record.to_report(), "trial_id": spec["trial_id"]})
    callback.on_experiment_end([])
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT * FROM generations ORDER BY stage DESC, example").fetchall()
    assert rows == [(spec["trial_id"], g.stage, g.example, g.prompt, g.reference, g.response) for g in generations]
    assert con.execute("SELECT result->'generations' FROM trials").fetchone()[0] is None


def test_learning_curve_rows_are_written_at_each_checkpoint_and_when_the_trial_ends(tmp_path: Path) -> None:
    """A trial's step and evaluation rows are held until its next checkpoint (written before Ray registers it, so a
    resumed trial reports again exactly what was not written) or its end: an error, a stop, its final record."""
    from sweeps.records import CheckpointRecord, FinalRecord

    config = TrialConfig.from_flat({"task.name": "sms_spam"}).to_flat()
    specs = {f"method-{g}-1": {"trial_id": f"method-{g}-1", "sweep_id": "s", "study": "smoke", "dimension": "method",
                               "group": g, "config": config} for g in ("full", "lora")}
    callback = DuckDBCallback(tmp_path / "db.duckdb", specs, progress=False)
    full, lora = (SimpleNamespace(config={"trial": spec}, last_result=None, error_file=None,
                                  get_error=lambda: "boom") for spec in specs.values())

    def report(trial: SimpleNamespace, record: object) -> None:
        callback.on_trial_result(0, [], trial, {**record.to_report(), "trial_id": trial.config["trial"]["trial_id"]})

    def steps(trial_id: str) -> list[tuple[int, str, str]]:
        return callback.writer.con.execute("SELECT step, split, name FROM metrics WHERE trial_id = ? AND name IN "
                                           "('loss', 'accuracy') ORDER BY ALL", [trial_id]).fetchall()

    for trial in (full, lora):
        callback.on_trial_start(0, [], trial)
        report(trial, StepRecord(1, 0, 0.7, 1e-3, 900.0, 64))
        report(trial, EvalRecord(1, {"accuracy": 0.5, "loss": 0.69}))
    assert steps("method-full-1") == steps("method-lora-1") == []  # held: one statement at the checkpoint
    report(full, CheckpointRecord(1, str(tmp_path / "checkpoint_000000")))
    assert steps("method-full-1") == [(1, "train", "loss"), (1, "validation", "accuracy"), (1, "validation", "loss")]
    report(full, StepRecord(2, 0, 0.6, 1e-3, 900.0, 128))
    callback.on_trial_error(0, [], full)  # a failed trial keeps every step it reported
    assert steps("method-full-1")[-1] == (2, "train", "loss")
    assert callback.writer.con.execute("SELECT status FROM trials WHERE id = 'method-full-1'").fetchone() == ("failed",)
    record = FinalRecord(status="completed", task="sms_spam", task_kind="classification", primary_metric="accuracy",
                         higher_is_better=True, step=2, test={"accuracy": 0.75})
    report(lora, StepRecord(2, 0, 0.5, 1e-3, 900.0, 128))
    report(lora, record)
    assert steps("method-lora-1") == [(1, "train", "loss"), (1, "validation", "accuracy"), (1, "validation", "loss"),
                                      (2, "test", "accuracy"), (2, "train", "loss")]
    assert callback.unwritten == {}
    callback.on_experiment_end([])
