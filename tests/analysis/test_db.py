"""The study database: schema covers every hyperparameter, writes are idempotent, a held file gives a clear message."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.db import DatabaseError, ResultsWriter, column_name, connect, trial_row
from sweeps.config import TrialConfig
from sweeps.records import FinalRecord


def _spec(seed: int = 0) -> dict:
    config = TrialConfig.from_flat({"method.name": "lora", "lora.targets": "all", "train.seed": seed}).to_flat()
    return {"trial_id": f"t{seed}", "sweep_id": "s1", "study": "smoke", "dimension": "method", "group": "lora",
            "config": config}


def test_every_config_key_has_its_own_typed_column(tmp_path: Path) -> None:
    con = connect(tmp_path / "db.duckdb")
    columns = {r[0]: r[1] for r in con.execute("DESCRIBE trials").fetchall()}
    for key, value in TrialConfig().to_flat().items():
        assert column_name(key) in columns, f"schema.sql lacks a column for {key}"
        if isinstance(value, bool):
            assert columns[column_name(key)] == "BOOLEAN", key
        elif isinstance(value, float):
            assert columns[column_name(key)] == "DOUBLE", key


def test_replayed_writes_never_duplicate_or_regress(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "db.duckdb")
    writer.plan_trials([trial_row(_spec(s), "pending") for s in (0, 1)])
    final = FinalRecord.from_dict({
        "status": "completed", "task": "sms_spam", "task_kind": "classification", "higher_is_better": True,
        "step": 5, "primary_metric": "accuracy", "val_accuracy": 0.8, "test_accuracy": 0.75,
        "trainable_params": 10, "total_params": 100, "val_loss": float("nan"), "generations": []})
    for _ in range(2):  # Ray replays results after a restore
        writer.write_trial(trial_row(_spec(0), "completed", final.to_row()))
        writer.write_metrics("t0", 5, "train", {"loss": 0.3, "lr": 1e-3, "status": "x"})
    writer.write_trial(trial_row(_spec(0), "running"))  # a late replay of an earlier event
    writer.plan_trials([trial_row(_spec(s), "pending") for s in (0, 1)])  # a resumed sweep plans again
    con = writer.con
    assert con.execute("SELECT id, status FROM trials ORDER BY id").fetchall() == [("t0", "completed"),
                                                                                   ("t1", "pending")]
    assert con.execute("SELECT count(*) FROM metrics").fetchone()[0] == 2
    row = con.execute("SELECT test_primary, val_loss, lora_targets, lora_rank, optim_lr FROM trials WHERE id='t0'")
    assert row.fetchone() == (0.75, None, "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", 8, 5e-5)
    assert con.execute("SELECT result->>'$.val_accuracy' FROM trials WHERE id='t0'").fetchone()[0] == "0.8"


def test_a_database_held_by_another_process_gives_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    ResultsWriter(path).con.close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(path)!r}); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(DatabaseError, match=r"in use by another process .*query a copy"):
            connect(path, read_only=True)
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    connect(path, read_only=True).close()  # free again once the holder is gone


def test_missing_database_for_readers(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no such database"):
        connect(tmp_path / "none.duckdb", read_only=True)
