"""Typed trial records: one way to a Ray report and back, one way to database rows, no live objects."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

from analysis.db import connect
from sweeps.records import (
    CheckpointRecord,
    EvalRecord,
    FinalRecord,
    Generation,
    StepRecord,
    metric_key,
    record_from_report,
    split_metrics,
)


def _final(**changes) -> FinalRecord:
    base = {"status": "completed", "task": "alpaca", "task_kind": "lm", "primary_metric": "perplexity",
            "higher_is_better": False, "step": 12, "trainable_params": 10, "total_params": 100,
            "validation": {"perplexity": 30.0, "loss": 3.4}, "test": {"perplexity": 31.0, "loss": float("nan")},
            "history": [EvalRecord(6, {"perplexity": 40.0, "loss": 3.7})], "method_notes": ["wte is frozen"],
            "generations": [Generation("start", 3, "p", "r", "s"), Generation("final", 3, "p", "r", "g")],
            "notes": {"k": "v"}}
    return FinalRecord(**{**base, **changes})


def test_every_record_survives_its_ray_report() -> None:
    records = [StepRecord(3, 0, 0.5, 1e-3, 1234.5, 96), EvalRecord(3, {"accuracy": 0.75, "loss": 0.6}),
               CheckpointRecord(3, "/tmp/ckpt/step_0000003")]
    for record in records:
        ray_result = {**record.to_report(), "training_iteration": 4, "time_this_iter_s": 0.1}  # Ray adds its keys
        assert record_from_report(ray_result) == record
    final = _final()
    back = record_from_report({**final.to_report(), "training_iteration": 9})
    sent = json.loads(final.to_json())
    assert sent.pop("test_loss") is None  # a non-finite metric travels as null, and comes back as not measured
    assert back.to_dict() == sent
    assert back.test == {"perplexity": 31.0} and back.history == final.history
    assert back.generations == final.generations  # the driver gets them, typed
    assert all(not isinstance(v, list | dict) for v in final.to_report().values())  # Tune's table stays flat


def test_metric_prefix_is_added_and_removed_in_one_place() -> None:
    assert metric_key("validation", "accuracy") == "val_accuracy" and metric_key("test", "loss") == "test_loss"
    flat = {"val_accuracy": 0.5, "val_note": "x", "test_accuracy": 0.4, "validation_size": 3}
    assert split_metrics(flat, "validation") == {"accuracy": 0.5}
    assert split_metrics(flat, "test") == {"accuracy": 0.4}


def test_final_row_fits_the_schema_and_carries_direction(tmp_path: Path) -> None:
    row = _final().to_row()
    columns = {r[0] for r in connect(tmp_path / "db.duckdb").execute("DESCRIBE trials").fetchall()}
    assert set(row) <= columns
    assert row["primary_metric"] == "perplexity" and row["higher_is_better"] is False
    assert row["val_primary"] == 30.0 and row["test_primary"] == 31.0 and math.isnan(row["test_loss"])
    assert json.loads(row["result"])["test_loss"] is None  # the JSON stays valid
    assert _final(status="early_stopped").db_status == "completed"


def test_ended_record_takes_metric_and_direction_from_the_task_registry() -> None:
    record = FinalRecord.ended("preference", "stopped", step=6,
                               last_eval=EvalRecord(4, {"preference_accuracy": 0.625}))
    assert (record.primary_metric, record.higher_is_better, record.task_kind) == (
        "preference_accuracy", True, "preference")
    assert record.to_row()["val_primary"] == 0.625
    assert FinalRecord.ended("alpaca", "failed").higher_is_better is False


def test_metric_rows_cover_final_history_and_skip_non_finite() -> None:
    rows = _final().metric_rows()
    assert (12, "validation", "perplexity", 30.0) in rows and (6, "validation", "perplexity", 40.0) in rows
    assert (12, "test", "perplexity", 31.0) in rows
    assert not any(name == "loss" and split == "test" for _, split, name, _ in rows)


def test_only_evaluations_carry_the_schedulers_time() -> None:
    """ASHA decides on reports that carry EVAL_STEP: evaluations, never a step report (which carries the last
    validation metric along for the searcher and could otherwise stop a trial before its final evaluation)."""
    from sweeps.records import EVAL_STEP

    assert EvalRecord(4, {"accuracy": 0.5}).to_report()[EVAL_STEP] == 4
    for record in (StepRecord(5, 0, 0.5, 1e-3, 10.0, 40), CheckpointRecord(5, "/tmp/x"), _final()):
        assert EVAL_STEP not in record.to_report()


def test_baselines_survive_the_report_and_reach_their_columns(tmp_path: Path) -> None:
    final = _final(baseline_test={"perplexity": 900.0, "loss": 6.8, "tokens": float("inf")}, baseline_majority=None)
    back = record_from_report({**final.to_report(), "training_iteration": 9})
    assert back.baseline_test == {"perplexity": 900.0, "loss": 6.8}  # non-finite: not measured, as for test metrics
    assert back.baseline_majority is None and back.test == {"perplexity": 31.0}  # no test_ key is a baseline's
    row = back.to_row()
    assert row["baseline_step0"] == 900.0 and row["baseline_majority"] is None
    assert (0, "test", "perplexity", 900.0) in back.metric_rows() and (0, "test", "loss", 6.8) in back.metric_rows()
    classified = _final(task="sms_spam", task_kind="classification", primary_metric="accuracy", higher_is_better=True,
                        test={"accuracy": 0.9}, baseline_test={"accuracy": 0.45, "loss": 0.7}, baseline_majority=0.5)
    flat = classified.to_report()
    assert flat["baseline_majority"] == 0.5 and "baseline_test" not in flat  # a dict stays in final_json
    back = record_from_report(flat)
    assert (back.baseline_test, back.baseline_majority) == ({"accuracy": 0.45, "loss": 0.7}, 0.5)
    assert FinalRecord.from_dict(classified.to_dict()) == classified
    row = back.to_row()
    assert (row["baseline_step0"], row["baseline_majority"], row["test_primary"]) == (0.45, 0.5, 0.9)
    columns = {r[0] for r in connect(tmp_path / "db.duckdb").execute("DESCRIBE trials").fetchall()}
    assert {"baseline_step0", "baseline_majority"} <= columns and set(row) <= columns


def test_a_record_without_baselines_reads_back_and_writes_nulls() -> None:
    """Trials that ended before their final record, and final records written before baselines existed."""
    ended = FinalRecord.ended("sms_spam", "stopped", step=4, last_eval=EvalRecord(4, {"accuracy": 0.6}))
    assert ended.baseline_test == {} and ended.baseline_majority is None
    assert record_from_report(ended.to_report()) == ended
    row = ended.to_row()
    assert row["baseline_step0"] is None and row["baseline_majority"] is None
    assert all(step == 4 for step, *_ in ended.metric_rows())
    old = {k: v for k, v in _final().to_dict().items() if not k.startswith("baseline_")}
    assert FinalRecord.from_dict(old).baseline_test == {}


def test_generations_leave_the_result_for_their_own_table(tmp_path: Path) -> None:
    """Generations travel whole in the report and result.json, become rows of the generations table, and stay out of
    the trials.result JSON (like predictions)."""
    final = _final(predictions={"test": {"example": [0], "loss": [1.0], "tokens": [2]}})
    assert final.to_dict()["generations"][0] == {"stage": "start", "example": 3, "prompt": "p", "reference": "r",
                                                 "response": "s"}
    result = json.loads(final.to_row()["result"])
    assert "generations" not in result and "predictions" not in result and result["notes"] == {"k": "v"}
    assert final.generation_rows() == [("start", 3, "p", "r", "s"), ("final", 3, "p", "r", "g")]
    columns = [r[0] for r in connect(tmp_path / "db.duckdb").execute("DESCRIBE generations").fetchall()]
    assert columns == ["trial_id", *(f.name for f in fields(Generation))]  # a row is the trial and a Generation


def test_generations_in_the_form_of_older_results_read_back() -> None:
    """A final record from before Generation (``launch.py resume`` replays those from trials.result): its index in the
    list is the example, and they are the final weights'."""
    old = {**_final(generations=[]).to_dict(), "generations": [
        {"prompt": "p0", "generation": "g0", "reference": "r0"}, {"prompt": "p1", "generation": "g1", "reference": ""}]}
    assert FinalRecord.from_dict(old).generations == [Generation("final", 0, "p0", "r0", "g0"),
                                                      Generation("final", 1, "p1", "", "g1")]
