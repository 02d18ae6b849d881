"""The study database: schema covers every hyperparameter, writes are idempotent, a held file gives a clear message."""

from __future__ import annotations

import json
import statistics
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


def test_a_rewritten_trial_row_is_replaced_whole_and_a_plan_is_inserted_once(tmp_path: Path) -> None:
    """A trials row written again holds exactly the new row: a column the new one does not name is null again (as
    INSERT OR REPLACE would leave it; the writer updates in place, which DuckDB does faster). A plan is inserted in
    statements of many rows, a trial listed twice once, and planning again inserts nothing."""
    writer = ResultsWriter(tmp_path / "db.duckdb")
    specs = [_spec(s) for s in range(250)]  # more than one statement's rows
    writer.plan_trials([trial_row(spec, "pending") for spec in [*specs, specs[0]]])
    writer.plan_trials([trial_row(spec, "completed") for spec in specs])
    con = writer.con
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("pending", 250)]
    assert con.execute("SELECT count(*) FROM trial_groups").fetchone() == (250,)
    writer.write_trial(trial_row(specs[0], "running", {"steps": 3, "train_seconds": 1.5}, error="transient"))
    writer.write_trial(trial_row(specs[0], "completed", {"steps": 5}))
    assert con.execute("SELECT status, steps, train_seconds, error, lora_rank FROM trials WHERE id = 't0'"
                       ).fetchone() == ("completed", 5, None, None, 8)
    assert con.execute("SELECT count(*) FROM trials").fetchone() == (250,)


def test_metric_rows_are_one_statement_whose_repeats_and_replays_replace(tmp_path: Path) -> None:
    """Rows go in as one statement over lists: a key repeated in one call keeps its last value (one statement may not
    insert a key twice), a replayed call replaces, and what is not finite is left out."""
    writer = ResultsWriter(tmp_path / "db.duckdb")
    writer.write_metric_rows("t0", [(1, "train", "loss", 2.0), (1, "train", "loss", 1.5), (1, "train", "lr", 1e-3),
                                    (2, "validation", "loss", float("inf")), (2, "validation", "accuracy", 0.5)])
    writer.write_metric_rows("t0", [(1, "train", "loss", 1.25)])
    writer.write_metric_rows("t0", [(3, "train", "loss", float("nan"))])
    rows = writer.con.execute("SELECT trial_id, step, split, name, value FROM metrics ORDER BY ALL").fetchall()
    assert rows == [("t0", 1, "train", "loss", 1.25), ("t0", 1, "train", "lr", 1e-3),
                    ("t0", 2, "validation", "accuracy", 0.5)]


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


def test_an_older_database_gains_the_baseline_columns(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    con = connect(path)
    for column in ("baseline_majority", "baseline_step0", "train_baseline_eval"):
        con.execute(f"ALTER TABLE trials DROP COLUMN {column}")  # as a database from before them
    con.execute("DROP TABLE study_database")  # which had no marker either
    con.close()
    columns = {r[0]: r[1] for r in connect(path).execute("DESCRIBE trials").fetchall()}
    assert (columns["baseline_majority"], columns["baseline_step0"], columns["train_baseline_eval"]) == (
        "DOUBLE", "DOUBLE", "BOOLEAN")


def test_baselines_per_task_over_the_selected_completed_trials(tmp_path: Path) -> None:
    """The BASELINES query averages what each trial recorded, per task; trials that did not complete and sweeps not
    selected stay out."""
    from analysis.queries import baselines, select_sweeps

    # (sweep, task, group, seed, status, majority, step-0 test primary metric)
    planted = [
        ("s1", "sms_spam", "full", 0, "completed", 0.5, 0.40),
        ("s1", "sms_spam", "full", 1, "completed", 0.5, 0.55),
        ("s1", "sms_spam", "lora", 0, "completed", 0.5, 0.40),  # same seed, same untrained model
        ("s1", "sms_spam", "lora", 1, "diverged", 0.5, 0.99),  # not completed: left out
        ("s1", "alpaca", "full", 0, "completed", None, 950.0),
        ("s1", "alpaca", "full", 1, "completed", None, 1010.0),
        ("s1", "alpaca", "lora", 0, "completed", None, None),  # train.baseline_eval=false
        ("s2", "sms_spam", "full", 0, "completed", 0.9, 0.10),  # another sweep, not selected
    ]
    writer = ResultsWriter(tmp_path / "db.duckdb")
    for sweep, task, group, seed, status, majority, step0 in planted:
        config = TrialConfig.from_flat({"task.name": task, "method.name": group, "train.seed": seed,
                                        "train.baseline_eval": step0 is not None}).to_flat()
        spec = {"trial_id": f"{sweep}-{task}-{group}-{seed}", "sweep_id": sweep, "study": "x", "dimension": "method",
                "group": group, "config": config}
        metric = "perplexity" if task == "alpaca" else "accuracy"
        record = FinalRecord(status=status, task=task, task_kind="x", primary_metric=metric,
                             higher_is_better=task != "alpaca", step=10, test={metric: 1.0},
                             baseline_test={} if step0 is None else {metric: step0, "loss": 2.0},
                             baseline_majority=majority)
        writer.write_trial(trial_row(spec, record.db_status, record.to_row()))
        writer.write_metric_rows(spec["trial_id"], record.metric_rows())
    con = writer.con
    stored = con.execute("SELECT baseline_majority, baseline_step0, train_baseline_eval FROM trials "
                         "WHERE id IN ('s1-sms_spam-full-1', 's1-alpaca-lora-0') ORDER BY id").fetchall()
    assert stored == [(None, None, False), (0.5, 0.55, True)]
    assert con.execute("SELECT value FROM metrics WHERE trial_id = 's1-alpaca-full-1' AND step = 0 AND split = 'test' "
                       "AND name = 'perplexity'").fetchone() == (1010.0,)
    select_sweeps(con, ["s1"])
    rows = {r["task"]: r for r in baselines(con)}
    assert list(rows) == ["alpaca", "sms_spam"]
    sms, alpaca = rows["sms_spam"], rows["alpaca"]
    assert (sms["metric"], sms["higher_is_better"], alpaca["metric"], alpaca["higher_is_better"]) == (
        "accuracy", True, "perplexity", False)
    assert sms["majority"] == pytest.approx(0.5) and sms["n_majority"] == 3
    assert sms["step0_mean"] == pytest.approx(statistics.mean([0.40, 0.55, 0.40]))
    assert sms["step0_sd"] == pytest.approx(statistics.stdev([0.40, 0.55, 0.40]))
    assert (sms["n_step0"], sms["n_step0_seeds"]) == (3, 2)
    assert alpaca["majority"] is None and alpaca["n_majority"] == 0
    assert alpaca["step0_mean"] == pytest.approx(980.0) and alpaca["step0_sd"] == pytest.approx(
        statistics.stdev([950.0, 1010.0]))
    assert (alpaca["n_step0"], alpaca["n_step0_seeds"]) == (2, 2)


# --- a configuration several dimensions share: one trials row, a trial_groups row per membership ---------------------

# (trial, its memberships in study order, test accuracy per seed): lora (rank 8, every projection) is method/lora and
# lora_targets/all at once
SHARED = {
    "lora": ([("method", "lora"), ("lora_targets", "all")], {"method.name": "lora", "lora.targets": "all"},
             [0.80, 0.82, 0.84]),
    "full": ([("method", "full")], {"method.name": "full"}, [0.90, 0.91, 0.92]),
    "attn": ([("lora_targets", "attention")], {"method.name": "lora", "lora.targets": "attention"}, [0.70, 0.71, 0.72]),
}


def _shared_db(path: Path) -> Path:
    """Three configurations × three seeds on SMS spam, written as the sweep driver writes them."""
    from analysis.db import membership_rows
    from tests.analysis.synthetic import prediction_rows

    writer = ResultsWriter(path)
    writer.start_sweep({"id": "s1", "study": "x", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                        "status": "completed", "planned_trials": 9, "model_init": "pretrained"})
    for name, (memberships, settings, accuracies) in SHARED.items():
        for seed, accuracy in enumerate(accuracies):
            config = TrialConfig.from_flat({**settings, "task.name": "sms_spam", "train.seed": seed,
                                            "optim.lr": 1e-3}).to_flat()
            spec = {"trial_id": f"{name}-{seed}", "sweep_id": "s1", "study": "x", "dimension": memberships[0][0],
                    "group": memberships[0][1], "config": config, "memberships": memberships}
            writer.plan_trials([trial_row(spec, "pending")])
            writer.write_memberships(membership_rows(spec))
            record = FinalRecord(status="completed", task="sms_spam", task_kind="classification",
                                 primary_metric="accuracy", higher_is_better=True, step=10,
                                 validation={"accuracy": accuracy}, test={"accuracy": accuracy},
                                 trainable_params=1000, total_params=10_000, train_seconds=10.0 + seed)
            writer.write_trial(trial_row(spec, "completed", record.to_row()))
            writer.write_predictions(spec["trial_id"], prediction_rows("sms_spam", seed, "accuracy", accuracy))
    writer.close()
    return path


def test_a_trial_two_dimensions_share_is_stored_once_and_in_both_dimensions_of_the_guide(tmp_path: Path) -> None:
    from analysis.guide import collect
    from analysis.queries import BEST_ALL, records, select_sweeps

    con = connect(_shared_db(tmp_path / "db.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM trials WHERE id LIKE 'lora-%'").fetchone()[0] == 3
    assert con.execute("SELECT dimension, \"group\" FROM trial_groups WHERE trial_id = 'lora-0' ORDER BY ALL"
                       ).fetchall() == [("lora_targets", "all"), ("method", "lora")]
    select_sweeps(con, ["s1"])
    rows = con.execute("SELECT dimension, \"group\", id, test_primary FROM guide_trials WHERE id LIKE 'lora-%' "
                       "ORDER BY ALL").fetchall()
    assert [r[:3] for r in rows] == [("lora_targets", "all", f"lora-{s}") for s in range(3)] + [
        ("method", "lora", f"lora-{s}") for s in range(3)]
    assert [r[3] for r in rows[:3]] == [r[3] for r in rows[3:]] == [0.80, 0.82, 0.84]
    best = {(r["dimension"], r["group"]): r for r in records(con, BEST_ALL)}
    assert set(best) == {("method", "lora"), ("method", "full"), ("lora_targets", "all"), ("lora_targets", "attention")}
    for column in ("test_mean", "test_sd", "val_mean", "n_completed", "train_seconds"):  # (summed in any order)
        assert best[("method", "lora")][column] == pytest.approx(best[("lora_targets", "all")][column], rel=1e-12)
    # the guide: the shared group is in both dimensions' sections, with the same numbers
    guide = collect(con)
    tables = {s.key: {row[0]: row[1:] for row in s.blocks[0].table.rows} for s in guide.sections}
    assert {"method", "lora_targets"} <= set(tables)
    assert tables["method"]["lora"] == tables["lora_targets"]["all"]
    assert set(tables["lora_targets"]) == {"all", "attention"}
    con.close()


def test_an_older_database_without_trial_groups_still_reads_and_is_migrated(tmp_path: Path) -> None:
    """Trials written before trial_groups existed serve their own dimension and group: through a temporary view when
    opened read-only, and as rows once a writer opens the file."""
    from analysis.queries import select_sweeps

    path = _shared_db(tmp_path / "db.duckdb")
    con = connect(path)
    con.execute("DROP TABLE trial_groups")  # as a database from before it
    con.close()
    reader = connect(path, read_only=True)
    select_sweeps(reader, ["s1"])
    assert reader.execute("SELECT dimension, count(*) FROM guide_trials GROUP BY ALL ORDER BY ALL").fetchall() == [
        ("lora_targets", 3), ("method", 6)]  # lora-* only in its own (first) dimension: nothing recorded more
    reader.close()
    writer = connect(path)
    assert writer.execute("SELECT count(*), count(DISTINCT trial_id) FROM trial_groups").fetchone() == (9, 9)
    writer.close()


def test_a_failed_shared_trial_is_listed_once_with_every_group_it_serves(tmp_path: Path) -> None:
    from analysis.db import membership_rows
    from analysis.queries import PROBLEM_TRIALS, records, select_sweeps

    writer = ResultsWriter(tmp_path / "db.duckdb")
    writer.start_sweep({"id": "s1", "study": "x", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                        "status": "completed", "planned_trials": 1, "model_init": "pretrained"})
    config = TrialConfig.from_flat({"task.name": "sms_spam", "method.name": "lora", "train.seed": 0}).to_flat()
    spec = {"trial_id": "lora-0", "sweep_id": "s1", "study": "x", "dimension": "method", "group": "lora",
            "config": config, "memberships": [("method", "lora"), ("lora_targets", "all")]}
    writer.plan_trials([trial_row(spec, "pending")])
    writer.write_memberships(membership_rows(spec))
    writer.write_trial(trial_row(spec, "failed", None, error="RuntimeError: boom\ntraceback"))
    con = writer.con
    select_sweeps(con, ["s1"])
    [row] = records(con, PROBLEM_TRIALS)
    assert (row["id"], row["dimension"], row["group"], row["error"]) == (
        "lora-0", "lora_targets, method", "all, lora", "RuntimeError: boom")
    writer.close()


# --- kept generations: their own table, and those of an older file's trials.result ---------------------------------

def test_generations_are_written_once_per_row(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "db.duckdb")
    rows = [("start", 0, "p0", "r0", "s0"), ("final", 0, "p0", "r0", "f0"), ("final", 1, "p1", None, "f1")]
    for _ in range(2):  # Ray replays results after a restore
        writer.write_generations("t0", rows)
    writer.write_generations("t0", [("final", 1, "p1", None, "again")])  # a replayed row replaces itself
    writer.write_generations("t0", [])
    assert writer.con.execute("SELECT * FROM generations ORDER BY example, stage").fetchall() == [
        ("t0", "final", 0, "p0", "r0", "f0"), ("t0", "start", 0, "p0", "r0", "s0"),
        ("t0", "final", 1, "p1", None, "again")]
    writer.close()


def _older_file_with_generations(path: Path) -> Path:
    """A database from before the generations table: a trial whose result keeps its generations (index in the list
    = example), and one whose result has none."""
    writer = ResultsWriter(path)
    old = [{"prompt": "p0", "generation": "g0", "reference": "r0"}, {"prompt": "p1", "generation": "", "reference": ""}]
    for seed, generations in ((0, old), (1, None)):
        record = FinalRecord(status="completed", task="alpaca", task_kind="lm", primary_metric="perplexity",
                             higher_is_better=False, step=5, test={"perplexity": 20.0})
        row = record.to_row()
        if generations is not None:
            row["result"] = json.dumps({**json.loads(row["result"]), "generations": generations})
        writer.write_trial(trial_row(_spec(seed), "completed", row))
    writer.con.execute("DROP TABLE generations")
    writer.close()
    return path


OLD_ROWS = [("t0", "final", 0, "p0", "r0", "g0"), ("t0", "final", 1, "p1", "", "")]


def test_an_older_database_reads_its_generations_and_a_writer_moves_them_to_the_table(tmp_path: Path) -> None:
    path = _older_file_with_generations(tmp_path / "db.duckdb")
    reader = connect(path, read_only=True)
    assert reader.execute("SELECT * FROM generations ORDER BY ALL").fetchall() == OLD_ROWS  # a temporary view
    reader.close()
    writer = ResultsWriter(path)
    assert writer.con.execute("SELECT * FROM generations ORDER BY ALL").fetchall() == OLD_ROWS  # the table now
    writer.write_generations("t0", [("final", 0, "p0", "r0", "newer")])
    writer.close()
    writer = ResultsWriter(path)  # opening it again copies nothing over what the table has
    assert writer.con.execute("SELECT response FROM generations ORDER BY example").fetchall() == [("newer",), ("",)]
    writer.close()
    reader = connect(path, read_only=True)
    assert reader.execute("SELECT count(*) FROM generations").fetchone() == (2,)
    assert reader.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'generations'"
                          ).fetchall() == [("BASE TABLE",)]
    reader.close()


def test_a_new_database_copies_nothing_from_results(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "db.duckdb")
    record = FinalRecord(status="completed", task="alpaca", task_kind="lm", primary_metric="perplexity",
                         higher_is_better=False, step=5)
    writer.write_trial(trial_row(_spec(0), "completed", record.to_row()))
    writer.close()
    writer = ResultsWriter(tmp_path / "db.duckdb")
    assert writer.con.execute("SELECT count(*) FROM generations").fetchone() == (0,)
    writer.close()


# --- what a writer may open: our files (marked, or older unmarked ones it migrates); everything else untouched -------

def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files no command may write, each with what its refusal says: a truncated study database, a SQLite file,
    another application's DuckDB file with its own ``trials`` table, ours minus a column, a newer version's, text.
    Also used by tests/sweeps/test_launch_db.py."""
    import sqlite3

    import duckdb

    files: dict[str, tuple[Path, str]] = {}
    full = _shared_db(tmp_path / "full.duckdb")
    data = full.read_bytes()
    (tmp_path / "truncated.duckdb").write_bytes(data[: len(data) // 2])
    files["truncated"] = (tmp_path / "truncated.duckdb", "is damaged: truncated to")
    lite = sqlite3.connect(tmp_path / "lite.duckdb")
    lite.execute("CREATE TABLE trials (id TEXT)")
    lite.commit()
    lite.close()
    files["sqlite"] = (tmp_path / "lite.duckdb", "is a SQLite database")
    other = duckdb.connect(str(tmp_path / "other.duckdb"))
    other.execute("CREATE TABLE trials (patient VARCHAR, arm VARCHAR); INSERT INTO trials VALUES ('p1', 'a')")
    other.close()
    files["foreign"] = (tmp_path / "other.duckdb", "not a study database (it has tables trials")
    connect(tmp_path / "minus.duckdb").close()
    con = duckdb.connect(str(tmp_path / "minus.duckdb"))
    con.execute("ALTER TABLE trials DROP COLUMN optim_lr")
    con.close()
    files["minus-a-column"] = (tmp_path / "minus.duckdb", "lacks trials.optim_lr")
    connect(tmp_path / "newer.duckdb").close()
    con = duckdb.connect(str(tmp_path / "newer.duckdb"))
    con.execute("UPDATE study_database SET schema_version = schema_version + 1")
    con.close()
    files["newer"] = (tmp_path / "newer.duckdb", "written by a newer version")
    (tmp_path / "notes.duckdb").write_text("id,status\nt1,completed\n")
    files["text"] = (tmp_path / "notes.duckdb", "is not a DuckDB database")
    return files


@pytest.mark.parametrize("kind", ["truncated", "sqlite", "foreign", "minus-a-column", "newer", "text"])
def test_a_file_that_is_not_a_study_database_of_this_version_is_refused_untouched(kind: str, tmp_path: Path) -> None:
    path, says = bad_files(tmp_path)[kind]
    before = _sha(path)
    for read_only in (False, True):
        with pytest.raises(DatabaseError) as err:
            connect(path, read_only=read_only)
        message = str(err.value)
        assert str(path) in message and says in message and "\n" not in message, message
    with pytest.raises(DatabaseError):
        ResultsWriter(path).start_sweep({"id": "s", "study": "x", "kind": "grid", "started_at": "2026-01-01",
                                         "status": "running", "planned_trials": 1})
    assert _sha(path) == before
    assert not Path(f"{path}.wal").exists()


def test_duckdb_never_installs_or_loads_an_extension_on_its_own(tmp_path: Path) -> None:
    con = connect(tmp_path / "db.duckdb")
    settings = dict(con.execute("SELECT name, value FROM duckdb_settings() WHERE name IN "
                                "('autoinstall_known_extensions', 'autoload_known_extensions')").fetchall())
    assert settings == {"autoinstall_known_extensions": "false", "autoload_known_extensions": "false"}
    con.close()


def test_a_new_or_empty_file_is_created_and_marked(tmp_path: Path) -> None:
    from analysis.db import APPLICATION, SCHEMA_VERSION

    empty = tmp_path / "empty.duckdb"
    empty.touch()
    for path in (tmp_path / "new" / "db.duckdb", empty):
        con = connect(path)
        assert con.execute("SELECT application, schema_version, migrated_from FROM study_database").fetchall() == [
            (APPLICATION, SCHEMA_VERSION, None)]
        con.close()


def test_a_database_from_before_the_marker_reads_as_it_was_and_a_writer_migrates_it(tmp_path: Path) -> None:
    """Files written before ``study_database`` (and before later columns and tables): readers read them untouched;
    the first writer adds what is missing and the marker, once, keeping every row."""
    import duckdb

    from analysis.db import SCHEMA_VERSION

    path = _shared_db(tmp_path / "db.duckdb")
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE study_database; DROP TABLE trial_groups; DROP TABLE generations")
    con.execute("ALTER TABLE trials DROP COLUMN kept_bytes; ALTER TABLE trials DROP COLUMN baseline_step0")
    con.close()
    before = _sha(path)
    reader = connect(path, read_only=True)
    assert reader.execute("SELECT count(*) FROM trials").fetchone() == (9,)
    assert reader.execute("SELECT count(*) FROM trial_groups").fetchone() == (9,)  # a temporary view
    reader.close()
    assert _sha(path) == before
    for _ in range(2):
        writer = connect(path)
        assert writer.execute("SELECT schema_version, migrated_from FROM study_database").fetchall() == [
            (SCHEMA_VERSION, 0)]
        assert writer.execute("SELECT count(*), count(kept_bytes), count(baseline_step0) FROM trials").fetchone() == (
            9, 0, 0)
        assert writer.execute("SELECT count(*) FROM trial_groups").fetchone() == (9,)
        writer.close()
    check = connect(path, read_only=True)
    assert check.execute("SELECT count(*) FROM generations").fetchone() == (0,)
    check.close()



V4 = ("model_frozen_dtype", "model_quantize", "lora_dora", "lora_init", "train_activation_checkpointing")


@pytest.mark.parametrize(("version", "dropped"), [(1, ("model_init_seed", "lora_lr_ratio", *V4)),
                                                  (2, ("lora_lr_ratio", *V4)), (3, V4)])
def test_an_older_file_opens_read_only_as_it_is_and_a_writer_brings_it_to_this_version(
        tmp_path: Path, version: int, dropped: tuple[str, ...]) -> None:
    """Version 2 added trials.model_init_seed, version 3 trials.lora_lr_ratio, version 4 NF4's, DoRA's, the LoRA
    start's and activation checkpointing's columns: an older file is no damaged file; a
    reader leaves it untouched, the first writer adds the columns (empty for the old rows) and marks the file with
    this version, keeping every row."""
    import duckdb

    from analysis.db import SCHEMA_VERSION

    path = _shared_db(tmp_path / "db.duckdb")
    con = duckdb.connect(str(path))
    for column in dropped:
        con.execute(f"ALTER TABLE trials DROP COLUMN {column}")
    con.execute("UPDATE study_database SET schema_version = ?", [version])
    con.close()
    before = _sha(path)
    reader = connect(path, read_only=True)
    assert reader.execute("SELECT count(*) FROM trials").fetchone() == (9,)
    reader.close()
    assert _sha(path) == before
    writer = connect(path)
    assert SCHEMA_VERSION == 5
    assert writer.execute("SELECT schema_version, migrated_from FROM study_database").fetchall() == [(5, version)]
    counts = ", ".join(f"count({c})" for c in dropped)
    assert writer.execute(f"SELECT count(*), {counts} FROM trials").fetchone() == (9, *[0] * len(dropped))
    writer.close()


def test_a_version_4_file_is_rebuilt_with_the_interrupted_status_keeping_every_row(tmp_path: Path) -> None:
    """Version 5 added the ``interrupted`` trial status to the trials table's CHECK, which DuckDB cannot alter: the
    first writer rebuilds the table with every row and column (and its primary key); a reader leaves the file as it
    is."""
    import duckdb

    from analysis.db import SCHEMA

    path = _shared_db(tmp_path / "db.duckdb")
    con = duckdb.connect(str(path))
    before = con.execute("SELECT * FROM trials ORDER BY id").fetchall()
    con.execute("ALTER TABLE trials RENAME TO current")
    schema = SCHEMA.read_text()
    old = schema.replace("'pending', 'running', 'interrupted', 'completed'", "'pending', 'running', 'completed'")
    assert old != schema
    trials_sql = old[old.index("CREATE TABLE IF NOT EXISTS trials"):old.index("-- Columns added after")]
    con.execute(trials_sql)
    con.execute("INSERT INTO trials SELECT * FROM current; DROP TABLE current; DROP TABLE trial_retries")
    con.execute("UPDATE study_database SET schema_version = 4")
    with pytest.raises(duckdb.ConstraintException):
        con.execute("UPDATE trials SET status = 'interrupted' WHERE id = (SELECT min(id) FROM trials)")
    con.close()
    before_sha = _sha(path)
    connect(path, read_only=True).close()
    assert _sha(path) == before_sha
    writer = connect(path)
    assert writer.execute("SELECT schema_version, migrated_from FROM study_database").fetchall() == [(5, 4)]
    assert writer.execute("SELECT * FROM trials ORDER BY id").fetchall() == before
    writer.execute("UPDATE trials SET status = 'interrupted' WHERE id = (SELECT min(id) FROM trials)")
    with pytest.raises(duckdb.ConstraintException):  # the primary key came with it
        writer.execute("INSERT INTO trials SELECT * FROM trials LIMIT 1")
    assert writer.execute("SELECT count(*) FROM trial_retries").fetchone() == (0,)
    writer.close()


def test_an_interrupted_sweep_takes_its_running_trials_with_it_and_a_retry_keeps_the_error(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path / "db.duckdb")
    writer.start_sweep({"id": "s1", "study": "smoke", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                        "status": "running", "planned_trials": 3})
    writer.plan_trials([trial_row(_spec(s), "pending") for s in (0, 1, 2)])
    writer.write_trial(trial_row(_spec(0), "running"))
    writer.write_trial(trial_row(_spec(1), "failed", error="Traceback ...\nRuntimeError: boom"))
    writer.end_sweep("s1", "interrupted")
    statuses = dict(writer.con.execute("SELECT id, status FROM trials").fetchall())
    assert statuses == {"t0": "interrupted", "t1": "failed", "t2": "pending"}
    writer.write_trial(trial_row(_spec(0), "running"))  # resumed: an interrupted trial runs again
    assert writer.retry_failed("s1") == ["t1"]
    assert writer.retry_failed("s1") == []  # nothing twice
    assert writer.con.execute("SELECT trial_id, sweep_id, error FROM trial_retries").fetchall() == [
        ("t1", "s1", "Traceback ...\nRuntimeError: boom")]
    statuses = dict(writer.con.execute("SELECT id, status FROM trials").fetchall())
    assert statuses == {"t0": "running", "t1": "pending", "t2": "pending"}
    writer.close()


def test_a_final_record_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk half-way through a trial's final rows: none of them stay (the trial is still running), and the
    database stays readable and writable."""
    import errno

    from analysis.db import disk_full

    writer = ResultsWriter(tmp_path / "db.duckdb")
    writer.plan_trials([trial_row(_spec(0), "pending")])
    writer.write_trial(trial_row(_spec(0), "running"))
    record = FinalRecord(status="completed", task="sms_spam", task_kind="classification", primary_metric="accuracy",
                         higher_is_better=True, step=3, test={"accuracy": 1.0},
                         predictions={"test": {"example": [0, 1], "label": [1, 0], "prediction": [1, 0]}})

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(writer.path))

    monkeypatch.setattr(ResultsWriter, "write_generations", full)
    with pytest.raises(OSError) as err:
        writer.write_final(_spec(0), record)
    assert disk_full(err.value)
    assert writer.con.execute("SELECT status FROM trials").fetchall() == [("running",)]
    assert writer.con.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
    monkeypatch.undo()
    writer.write_final(_spec(0), record)  # space is back
    assert writer.con.execute("SELECT status FROM trials").fetchall() == [("completed",)]
    assert writer.con.execute("SELECT count(*) FROM predictions").fetchone() == (2,)
    writer.close()


def test_disk_full_is_recognised_through_wrapping() -> None:
    import errno

    from analysis.db import disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("The Ray Tune run failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert disk_full(RuntimeError('TransactionException: Failed to commit: could not write "x.wal": No space left '
                                  "on device"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
