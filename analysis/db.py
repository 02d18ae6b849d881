"""The DuckDB study database: opening it (clear message when another process holds it) and idempotent writes.

Writers: the sweep driver, through ``ResultsWriter`` (used by the Ray Tune callback in ``sweeps/``), and
``analysis/judge.py`` (the ``judgments`` table only). Readers (``launch.py status``, ``build_guide.py``, people with
SQL) open it read-only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

try:
    import duckdb
except ImportError:  # json_text serves the trial side (sweeps/records.py), which runs where DuckDB may be missing
    duckdb = None  # (a bare GPU machine running sweeps/preflight.py); opening a database says so

SCHEMA = Path(__file__).with_name("schema.sql")
DEFAULT_DB = Path("results/results.duckdb")  # relative to the working directory; every CLI's --db default
TERMINAL = ("completed", "failed", "diverged", "stopped")
FINAL = ("completed", "diverged")
STATUSES = ("pending", "running", *TERMINAL)


class DatabaseError(RuntimeError):
    """The database cannot be opened (missing, locked by a running sweep, not a DuckDB file)."""


def connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the study database; writers also create the schema. Lock conflicts become one clear message."""
    if duckdb is None:
        raise DatabaseError("the study database needs DuckDB, which is not installed here (pip install duckdb)")
    path = Path(path)
    if read_only and not path.is_file():
        raise DatabaseError(f"{path}: no such database; run a sweep first (python sweeps/launch.py grid ...)")
    try:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            raise DatabaseError(
                f"{path} is in use by another process (a sweep driver holds it while it runs). Wait for the sweep "
                f"to end, or query a copy: cp {path} /tmp/snapshot.duckdb. ({str(err).splitlines()[0]})"
            ) from None
        raise DatabaseError(f"{path}: cannot open ({err})") from None
    except duckdb.Error as err:
        raise DatabaseError(f"{path}: not a readable DuckDB database ({err})") from None
    if not read_only:
        con.execute(SCHEMA.read_text())
        con.execute(f"INSERT INTO generations {GENERATIONS_IN_RESULT} ON CONFLICT DO NOTHING")
    else:
        _memberships_of_an_older_file(con)
        _generations_of_an_older_file(con)
    return con


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() AND "
                       "schema_name = 'main' AND table_name = ?", [name]).fetchone()[0] > 0


def _memberships_of_an_older_file(con: duckdb.DuckDBPyConnection) -> None:
    """A database from before ``trial_groups``, opened read-only (no writer has migrated it): a temporary view of
    the same name gives each trial its own dimension and group as its one membership, so every query still works."""
    if _has_table(con, "trials") and not _has_table(con, "trial_groups"):
        con.execute('CREATE TEMP VIEW trial_groups AS SELECT id AS trial_id, dimension, "group" FROM trials')


# Databases written before the generations table kept each trial's generations in its result: a JSON list of
# {prompt, generation, reference}, the final weights', the index in the list the example. Their rows, one place for
# both uses: copied into the table whenever a writer opens the file (a no-op for results without generations, as
# every result is since), and a reader's temporary view of an older file that no writer opened since.
GENERATIONS_IN_RESULT = """
SELECT t.id AS trial_id, 'final' AS stage, CAST(g.i - 1 AS INTEGER) AS example, g.item ->> 'prompt' AS prompt,
       g.item ->> 'reference' AS reference, g.item ->> 'generation' AS response
FROM trials AS t, unnest(CAST(t.result -> 'generations' AS JSON[])) WITH ORDINALITY AS g(item, i)
WHERE g.item ->> 'prompt' IS NOT NULL AND g.item ->> 'generation' IS NOT NULL
"""


def _generations_of_an_older_file(con: duckdb.DuckDBPyConnection) -> None:
    """A database from before the ``generations`` table, opened read-only: a temporary view of the same name gives
    the generations its trials kept in their result, so queries of the table still work."""
    if _has_table(con, "trials") and not _has_table(con, "generations"):
        con.execute(f"CREATE TEMP VIEW generations AS {GENERATIONS_IN_RESULT}")


def column_name(flat_key: str) -> str:
    """``lora.rank`` -> ``lora_rank``: the trials column of a hyperparameter."""
    return flat_key.replace(".", "_")


def _sql_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any) -> str | None:
    """JSON text in which non-finite floats are null: valid for DuckDB's JSON type and every reader."""
    return json.dumps(_finite(value), default=str, allow_nan=False) if value is not None else None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def membership_rows(spec: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``trial_groups`` rows of a planned trial: every (dimension, group) it serves; a spec without ``memberships``
    (a search trial, an older plan) serves its own dimension and group."""
    memberships = spec.get("memberships") or [(spec["dimension"], spec["group"])]
    return [(spec["trial_id"], str(dimension), str(group)) for dimension, group in memberships]


def trial_row(spec: Mapping[str, Any], status: str, measured: Mapping[str, Any] | None = None,
              error: str | None = None) -> dict[str, Any]:
    """A ``trials`` row from a planned trial (``spec``) and, once it ended, its measured columns (what
    ``sweeps.records.FinalRecord.to_row`` gives: scalars, and the whole record as a JSON ``result``)."""
    if status not in STATUSES:
        raise ValueError(f"unknown trial status {status!r}")
    config = spec["config"]
    row: dict[str, Any] = {
        "id": spec["trial_id"], "sweep_id": spec["sweep_id"], "study": spec["study"],
        "dimension": spec["dimension"], "group": spec["group"], "task": config["task.name"],
        "method": config["method.name"], "model": config["model.name"], "seed": config["train.seed"],
        "status": status, "error": error, "config": json_text(config),
        "updated_at": datetime.now(UTC).replace(tzinfo=None),
    }
    row.update({column_name(k): _sql_value(v) for k, v in config.items()})
    for key, value in (measured or {}).items():
        row[key] = json_text(value) if isinstance(value, dict | list) else _sql_value(value)
    return row


GENERATIONS_INSERT = """
INSERT OR REPLACE INTO generations
SELECT ?, unnest(?::VARCHAR[]), unnest(?::INTEGER[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[])
"""
PREDICTIONS_INSERT = """
INSERT OR REPLACE INTO predictions
SELECT ?, unnest(?::VARCHAR[]), unnest(?::INTEGER[]), unnest(?::INTEGER[]), unnest(?::INTEGER[]),
       unnest(?::BOOLEAN[]), unnest(?::DOUBLE[]), unnest(?::INTEGER[])
"""


class ResultsWriter:
    """The driver's handle on the database. Picklable (Ray pickles callbacks with the experiment); the connection is
    opened on first use and held until ``close``, so readers get the clear lock message instead of a torn read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._con: duckdb.DuckDBPyConnection | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_con": None}

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = connect(self.path)
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def _upsert(self, table: str, row: Mapping[str, Any]) -> None:
        columns = ", ".join(f'"{c}"' for c in row)
        marks = ", ".join("?" for _ in row)
        self.con.execute(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({marks})", list(row.values()))

    def start_sweep(self, row: Mapping[str, Any]) -> None:
        existing = self.con.execute("SELECT started_at FROM sweeps WHERE id = ?", [row["id"]]).fetchone()
        data = dict(row)
        if existing is not None:  # a resumed sweep keeps its original start
            data["started_at"] = existing[0]
        for key in ("package_versions", "hardware"):
            if isinstance(data.get(key), dict):
                data[key] = json_text(data[key])
        self._upsert("sweeps", data)

    def end_sweep(self, sweep_id: str, status: str) -> None:
        self.con.execute("UPDATE sweeps SET ended_at = ?, status = ? WHERE id = ?",
                         [datetime.now(UTC).replace(tzinfo=None), status, sweep_id])

    def write_trial(self, row: Mapping[str, Any]) -> None:
        """Upsert a trial. Replayed events change nothing: a row that ended is never set back to pending or running,
        and a completed or diverged row is final (only a failed one may later complete, after a retry)."""
        current = self.con.execute("SELECT status FROM trials WHERE id = ?", [row["id"]]).fetchone()
        if current is not None and (current[0] in FINAL or (current[0] in TERMINAL and row["status"] not in TERMINAL)):
            return
        self._upsert("trials", row)
        self.write_memberships([(row["id"], row["dimension"], row["group"])])

    def finished_results(self, sweep_id: str) -> dict[str, str]:
        """Final records of the sweep's trials that completed or diverged (a resumed sweep does not run them again)."""
        rows = self.con.execute("SELECT id, result FROM trials WHERE sweep_id = ? AND status IN ('completed', "
                                "'diverged') AND result IS NOT NULL", [sweep_id]).fetchall()
        return dict(rows)

    def plan_trials(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Record planned trials as pending, leaving the ones already recorded (a resumed sweep) as they are."""
        known = {r[0] for r in self.con.execute("SELECT id FROM trials").fetchall()}
        for row in rows:
            if row["id"] not in known:
                self._upsert("trials", row)
                self.write_memberships([(row["id"], row["dimension"], row["group"])])

    def write_memberships(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """``trial_groups`` rows ``(trial_id, dimension, group)`` (``membership_rows``); one already there stays."""
        columns = [list(c) for c in zip(*rows, strict=True)]
        if columns:  # one statement over list parameters (executemany is slow in DuckDB)
            self.con.execute("INSERT INTO trial_groups SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), "
                             "unnest(?::VARCHAR[]) ON CONFLICT DO NOTHING", columns)

    def write_metrics(self, trial_id: str, step: int, split: str, values: Mapping[str, Any]) -> None:
        """One step's values of a split; what is not a finite number is left out."""
        self.write_metric_rows(trial_id, [(step, split, name, v) for name, v in values.items()
                                          if isinstance(v, int | float) and not isinstance(v, bool)])

    def write_predictions(self, trial_id: str, rows: Iterable[tuple]) -> None:
        """A trial's per-example outcomes ``(split, example, label, prediction, correct, loss, tokens)``; a replayed
        row replaces itself."""
        columns = [list(c) for c in zip(*rows, strict=True)]
        if columns:  # one statement over list parameters: executemany takes ~40 s for IMDB's 25,000 test rows
            self.con.execute(PREDICTIONS_INSERT, [trial_id, *columns])

    def write_final(self, spec: Mapping[str, Any], record: Any) -> None:
        """Everything a trial's final record (``sweeps.records.FinalRecord``) puts in the database: its ``trials``
        row, per-example predictions, kept generations and metric rows."""
        trial_id = spec["trial_id"]
        self.write_trial(trial_row(spec, record.db_status, record.to_row(), error=record.error))
        self.write_predictions(trial_id, record.prediction_rows())
        self.write_generations(trial_id, record.generation_rows())
        self.write_metric_rows(trial_id, record.metric_rows())

    def write_generations(self, trial_id: str, rows: Iterable[tuple[str, int, str, str, str]]) -> None:
        """A trial's kept generations ``(stage, example, prompt, reference, response)`` (``FinalRecord.
        generation_rows``); a replayed row replaces itself."""
        columns = [list(c) for c in zip(*rows, strict=True)]
        if columns:  # one statement over list parameters (executemany is slow in DuckDB)
            self.con.execute(GENERATIONS_INSERT, [trial_id, *columns])

    def write_metric_rows(self, trial_id: str, rows: Iterable[tuple[int, str, str, float]]) -> None:
        """Learning-curve rows ``(step, split, name, value)``; a replayed row replaces itself."""
        data = [(trial_id, step, split, name, float(v)) for step, split, name, v in rows if math.isfinite(v)]
        if data:
            self.con.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)", data)

    def reopen_sweep(self, sweep_id: str) -> None:
        """Mark a sweep running again (``launch.py resume``): it keeps its row and start, and loses its end."""
        self.con.execute("UPDATE sweeps SET status = 'running', ended_at = NULL WHERE id = ?", [sweep_id])

    def trial_counts(self, sweep_id: str) -> dict[str, int]:
        """How many of the sweep's trials ended in each status (the driver's closing line)."""
        rows = self.con.execute("SELECT status, count(*) FROM trials WHERE sweep_id = ? GROUP BY status "
                                "ORDER BY status", [sweep_id]).fetchall()
        return dict(rows)
