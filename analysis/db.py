"""The DuckDB study database: opening it (clear message when another process holds it) and idempotent writes.

Every open first looks at the file read-only: a study database carries a marker (the ``study_database`` table: this
application and its schema version); another application's file, a damaged one or a newer version's is refused with
one line naming it, left byte for byte as it was. Files from before the marker are recognised by their tables and
migrated when a writer opens them. DuckDB never installs or loads extensions on its own here.

Writers: the sweep driver, through ``ResultsWriter`` (used by the Ray Tune callback in ``sweeps/``), and
``analysis/judge.py`` (the ``judgments`` table only). Readers (``launch.py status``, ``build_guide.py``, people with
SQL) open it read-only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
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
# Still to run: planned, running, or stopped by a signal while running (``launch.py resume`` runs them).
OPEN = ("pending", "running", "interrupted")
STATUSES = (*OPEN, *TERMINAL)


class DatabaseError(RuntimeError):
    """The database cannot be opened or written (missing, locked by a running sweep, not a study database, damaged,
    from a newer version, a full disk): the CLIs print it as one line and exit 2."""


class DiskFullError(DatabaseError):
    """No space left on the device (the database's, or Ray's storage): the sweep is left interrupted, to resume."""


# What a failed write raises: a clear error of ours, the filesystem's, or DuckDB's own.
WRITE_ERRORS: tuple[type[Exception], ...] = (DatabaseError, OSError, *((duckdb.Error,) if duckdb else ()))


# What marks a file as ours: the one row of the ``study_database`` table (schema.sql). Files written before the
# marker have our tables without it (version 0); a writer migrates them. A newer version is refused.
APPLICATION = "gpt2-finetune-guide study database"
SCHEMA_VERSION = 5
# Trials columns a version added (schema.sql's ALTERs bring older files up to date): not required of older files.
ADDED_IN_VERSION = {2: frozenset({"model_init_seed"}), 3: frozenset({"lora_lr_ratio"}),
                    4: frozenset({"model_frozen_dtype", "model_quantize", "lora_dora", "lora_init", "train_activation_checkpointing"})}
# DuckDB would otherwise install (download) and load extensions on its own, e.g. sqlite_scanner for a SQLite file.
CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
INSERT_CHUNK = 100  # rows of one INSERT statement (ResultsWriter._insert)
LOCK_PATIENCE_S = 3.0  # a writer retries a lock this long: two starts at once both look before either takes it
_LEGACY_ADDED = frozenset(re.findall(r"ALTER TABLE trials ADD COLUMN IF NOT EXISTS (\w+)", SCHEMA.read_text()))
_ALWAYS_THERE = ("sweeps", "trials")  # the tables of every release; the others a writer creates when missing
MARKER = "study_database"


def connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the study database; writers also create or migrate the schema. The file is checked read-only first, so
    one that is not ours, damaged or newer is refused untouched (byte for byte, no ``.wal``)."""
    if duckdb is None:
        raise DatabaseError("the study database needs DuckDB, which is not installed here (pip install duckdb)")
    path = Path(path)
    if read_only:
        con = _open(path, read_only=True)
        try:
            check_database(con, path)
            _memberships_of_an_older_file(con)
            _generations_of_an_older_file(con)
        except BaseException:
            con.close()
            raise
        return con
    return _open_writer(path)


def _open_writer(path: Path) -> duckdb.DuckDBPyConnection:
    """Check the file, then take DuckDB's write lock and bring the schema to this version in one transaction."""
    deadline = time.monotonic() + LOCK_PATIENCE_S
    while True:
        try:
            version = inspect_file(path)
            con = _open(path, read_only=False)
            break
        except _Locked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        _migrate(con, version)
    except duckdb.Error as err:
        con.close()
        raise database_error(path, err, "could not create or migrate the study tables") from None
    return con


def inspect_file(path: Path) -> int | None:
    """The schema version of an existing study database (0: written before the marker), None where there is none
    yet (a writer creates it). Raises DatabaseError for a file that is not ours, damaged or newer."""
    if not path.exists() or (path.is_file() and path.stat().st_size == 0 and _remove_empty(path)):
        return None
    con = _open(path, read_only=True)
    try:
        return check_database(con, path)
    finally:
        con.close()


def _remove_empty(path: Path) -> bool:
    """A zero-byte file (``touch``ed) holds nothing; DuckDB refuses it, so a writer starts a new file there."""
    path.unlink()
    return True


class _Locked(DatabaseError):
    """Another process holds the file."""


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A connection, after the file's first bytes show a DuckDB database (DuckDB is never handed another format)."""
    if read_only and not path.is_file():
        raise DatabaseError(f"{path}: no such database; run a sweep first (python sweeps/launch.py grid ...)")
    if path.is_file():
        _check_header(path)
    try:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            raise _Locked(
                f"{path} is in use by another process (a sweep driver holds it while it runs). Wait for the sweep "
                f"to end, or query a copy: cp {path} /tmp/snapshot.duckdb. ({str(err).splitlines()[0]})"
            ) from None
        raise database_error(path, err, "cannot open it") from None
    except duckdb.Error as err:
        raise database_error(path, err, "cannot open it") from None
    for name, value in CONFIG.items():  # SET, not connect(config=...): a connection this process already holds
        con.execute(f"SET {name} = {str(value).lower()}")  # to the file (a notebook's) must not make ours fail
    return con


def database_error(path: Path, err: BaseException, doing: str) -> DatabaseError:
    """One line naming the file and what to do; a full disk is a DiskFullError."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if disk_full(err):
        return DiskFullError(f"{path}: no space left on the device ({doing}: {first}). Free some space, then "
                             "resume the sweep: python sweeps/launch.py resume --db " + str(path))
    return DatabaseError(f"{path}: {doing} ({first}). It may be damaged or not a study database: pass --db a "
                         "study database or a new path, or restore it from a copy")


def exception_chain(err: BaseException | None) -> list[BaseException]:
    """An exception and those it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while err is not None and not any(err is seen for seen in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def disk_full(err: BaseException | None) -> bool:
    """Whether an exception, or one it was raised from, says the device is full (OSError ENOSPC, or DuckDB's and
    Ray's wrapped texts of it)."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
               or f"[Errno {errno.ENOSPC}]" in str(e) for e in exception_chain(err))


_SQLITE = b"SQLite format 3\x00"


def _check_header(path: Path) -> None:
    """Refuse what is no DuckDB file (SQLite, text, ...) before DuckDB opens it."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(_SQLITE):
        raise DatabaseError(f"{path} is a SQLite database, not a study database (DuckDB): pass --db a study "
                            "database or a new path")
    if head[8:12] != b"DUCK":
        raise DatabaseError(f"{path} is not a DuckDB database (no DuckDB header): pass --db a study database or a "
                            "new path")


def _check_blocks(con: duckdb.DuckDBPyConnection, path: Path, found: dict[str, set[str]]) -> None:
    """A truncated file often still reads its catalog (kept at the start): every block its tables' data lives in
    must be inside the file (3 headers of 4 KiB, then the blocks)."""
    block_size = con.execute("SELECT block_size FROM pragma_database_size() WHERE database_name = "
                             "current_database()").fetchone()[0]
    last = max((con.execute("SELECT max(block_id) FROM pragma_storage_info(?)", [table]).fetchone()[0] or -1
                for table in found if _has_table(con, table)), default=-1)
    needed, size = 3 * 4096 + (last + 1) * block_size, path.stat().st_size
    if last >= 0 and size < needed:
        raise DatabaseError(f"{path} is damaged: truncated to {size:,} bytes, its tables' data reaching to byte "
                            f"{needed:,}. Restore it from a copy, or pass --db a new path")


def _reference_columns() -> dict[str, set[str]]:
    """Every table of this version's schema and its columns, from schema.sql run in memory."""
    global _REFERENCE
    if _REFERENCE is None:
        con = duckdb.connect(":memory:", config=CONFIG)
        con.execute(SCHEMA.read_text())
        _REFERENCE = _columns(con)
        con.close()
    return _REFERENCE


_REFERENCE: dict[str, set[str]] | None = None


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    rows = con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = "
                       "current_database() AND schema_name = 'main'").fetchall()
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return tables


def check_database(con: duckdb.DuckDBPyConnection, path: Path) -> int | None:
    """What an open file is: its schema version (0: ours from before the marker), or None (no tables: new). Raises
    DatabaseError for another application's file, a newer version's, or ours with columns missing."""
    try:
        found = _columns(con)
        marker = con.execute(f"SELECT application, schema_version FROM {MARKER}").fetchall() if MARKER in found \
            else None
        _check_blocks(con, path, found)
    except duckdb.Error as err:
        raise database_error(path, err, "cannot read its tables") from None
    if marker is None and not found:
        return None
    reference = {t: c for t, c in _reference_columns().items() if t != MARKER}
    if marker is None and not all(t in found for t in _ALWAYS_THERE):
        raise DatabaseError(f"{path} is not a study database (it has tables {', '.join(sorted(found))}, not "
                            f"{' and '.join(_ALWAYS_THERE)}): another application's file? Pass --db a study "
                            "database or a new path")
    if marker is not None:
        if len(marker) != 1 or marker[0][0] != APPLICATION:
            raise DatabaseError(f"{path} is another application's DuckDB file ({MARKER} names "
                                f"{marker[0][0] if marker else 'nothing'!r}): pass --db a study database or a new path")
        version = int(marker[0][1])
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"{path} was written by a newer version of this code (schema {version}; this one "
                                f"knows up to {SCHEMA_VERSION}): update the code, or pass --db another file")
    else:
        version = 0
    missing = [t for t in _ALWAYS_THERE if t not in found]
    missing += [f"{t}.{c}" for t, columns in reference.items() for c in sorted(columns)
                if _required(t, c, version, found) and c not in found[t]]
    if missing:
        raise DatabaseError(f"{path} is damaged or not a study database: it lacks {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                            + ". Restore it from a copy, or pass --db a new path")
    return version


def _required(table: str, column: str, version: int, found: dict[str, set[str]]) -> bool:
    """Whether a file of ``version`` must already have this column of a table it has (a missing table other than
    sweeps and trials, a writer creates): every one at this version; before the marker, all but the trials columns
    added later (the schema's ALTERs add them)."""
    if table not in found:
        return False
    if table == "trials" and any(column in added for v, added in ADDED_IN_VERSION.items() if v > version):
        return False
    return version >= 1 or not (table == "trials" and column in _LEGACY_ADDED)


def _migrate(con: duckdb.DuckDBPyConnection, version: int | None) -> None:
    """Create the schema (a new file) or bring an older one to this version, and mark the file, all or nothing.
    Version 0 (before the marker) to 1, 1 to 2 (``model_init_seed``), 2 to 3 (``lora_lr_ratio``), 3 to 4 (bf16 frozen
    weights, NF4, DoRA, the LoRA start, activation checkpointing), 4 to 5 (the ``interrupted`` trial status, whose
    CHECK DuckDB cannot alter: the trials table is rebuilt with every row; ``trial_retries``): schema.sql's ALTERs and
    copies, then the marker."""
    con.execute("BEGIN TRANSACTION")
    try:
        rebuilt = _trials_without_interrupted(con)
        if rebuilt:
            con.execute(f"ALTER TABLE trials RENAME TO {_OLD_TRIALS}")
        con.execute(SCHEMA.read_text())
        if rebuilt:
            con.execute(f"INSERT INTO trials BY NAME SELECT * FROM {_OLD_TRIALS}; DROP TABLE {_OLD_TRIALS}")
        con.execute(f"INSERT INTO generations {GENERATIONS_IN_RESULT} ON CONFLICT DO NOTHING")
        if version != SCHEMA_VERSION:
            con.execute(f"DELETE FROM {MARKER}")
            con.execute(f"INSERT INTO {MARKER} VALUES (?, ?, ?, ?)", [APPLICATION, SCHEMA_VERSION,
                        datetime.now(UTC).replace(tzinfo=None), None if version is None else version])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


_OLD_TRIALS = "trials_before_v5"


def _trials_without_interrupted(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the file's trials table (an older file's) has a status CHECK without ``interrupted``."""
    checks = con.execute("SELECT expression FROM duckdb_constraints() WHERE database_name = current_database() AND "
                         "schema_name = 'main' AND table_name = 'trials' AND constraint_type = 'CHECK'").fetchall()
    return any("'running'" in text and "'interrupted'" not in text for (text,) in checks)


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
METRICS_INSERT = """
INSERT OR REPLACE INTO metrics
SELECT ?, unnest(?::INTEGER[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::DOUBLE[])
"""
PREDICTIONS_INSERT = """
INSERT OR REPLACE INTO predictions
SELECT ?, unnest(?::VARCHAR[]), unnest(?::INTEGER[]), unnest(?::INTEGER[]), unnest(?::INTEGER[]),
       unnest(?::BOOLEAN[]), unnest(?::DOUBLE[]), unnest(?::INTEGER[])
"""


class ResultsWriter:
    """The driver's handle on the database. Picklable (Ray pickles callbacks with the experiment); the connection is
    opened on first use and held until ``close``, so readers get the clear lock message instead of a torn read."""

    def __init__(self, path: str | Path, existing: bool = False) -> None:
        self.path = Path(path)
        self.existing = existing  # refuse to create the file (resume: a mistyped --db is no new database)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._depth = 0  # open transaction() blocks
        self._column_names: dict[str, list[str]] = {}  # each table's columns in the open file (_table_columns)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "existing": self.existing, "_con": None, "_depth": 0, "_column_names": {}}

    def __enter__(self) -> ResultsWriter:
        """Open (check, lock, migrate) now: the driver holds the file from before Ray starts to the sweep's end."""
        self.con  # noqa: B018 - opening is the point
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            if self.existing and not self.path.is_file():
                raise DatabaseError(f"{self.path}: no such database; run a sweep first (python sweeps/launch.py "
                                    "grid ...) or pass --db the file it wrote")
            self._con = connect(self.path)
        return self._con

    def close(self) -> None:
        if self._con is not None:
            con, self._con, self._depth, self._column_names = self._con, None, 0, {}
            with contextlib.suppress(duckdb.Error):  # a connection a failed write invalidated closes all the same
                con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside, or none: a failure mid-way (a full disk) leaves whole rows. Nested uses join the
        outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        con = self.con
        con.execute("BEGIN TRANSACTION")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        self._depth = 0
        con.execute("COMMIT")

    def end_sweep_if_possible(self, sweep_id: str, status: str) -> bool:
        """``end_sweep`` once more on a fresh connection if it fails (a failed write can leave DuckDB's connection
        unusable); False when it still fails (a disk still full): the sweep then stays marked running."""
        for _ in range(2):
            try:
                self.end_sweep(sweep_id, status)
                return True
            except (duckdb.Error, DatabaseError):
                self.close()
        return False

    def _upsert(self, table: str, row: Mapping[str, Any], exists: bool | None = None) -> None:
        """Insert ``row`` (a ``sweeps`` or ``trials`` row), or replace the row with its id whole, every column it does
        not name set null, as INSERT OR REPLACE would. A replacement is an UPDATE: DuckDB's INSERT OR REPLACE of a wide
        row costs ~80 ms (a delete and an insert on the key's index) against ~10 ms, and the sweep driver replaces a
        trials row at every trial's start and end. ``exists``: whether the row is there, when the caller knows."""
        if exists is None:
            exists = self.con.execute(f"SELECT 1 FROM {table} WHERE id = ?", [row["id"]]).fetchone() is not None
        if not exists:
            self._insert(table, [row])
            return
        named = [c for c in row if c != "id"]
        unnamed = [c for c in self._table_columns(table) if c != "id" and c not in row]
        assignments = ", ".join([*(f'"{c}" = ?' for c in named), *(f'"{c}" = NULL' for c in unnamed)])
        self.con.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", [*(row[c] for c in named), row["id"]])

    def _insert(self, table: str, rows: list[Mapping[str, Any]]) -> None:
        """New rows, INSERT_CHUNK to a statement (rows with the same columns; one row's statement costs about as much
        as a hundred's: 2,349 planned trials are recorded in seconds, not minutes)."""
        by_columns: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:
            by_columns.setdefault(tuple(row), []).append(row)
        for columns, same in by_columns.items():
            names = ", ".join(f'"{c}"' for c in columns)
            one = f"({', '.join('?' for _ in columns)})"
            for start in range(0, len(same), INSERT_CHUNK):
                chunk = same[start : start + INSERT_CHUNK]
                self.con.execute(f"INSERT INTO {table} ({names}) VALUES {', '.join([one] * len(chunk))}",
                                 [row[c] for row in chunk for c in columns])

    def _table_columns(self, table: str) -> list[str]:
        """The columns of ``table`` in the open file (read once a connection)."""
        if table not in self._column_names:
            self._column_names[table] = sorted(_columns(self.con)[table])
        return self._column_names[table]

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
        """Record how a sweep ended; an ``interrupted`` one takes its running trials with it (no trial stays marked
        running for ever), in one transaction."""
        with self.transaction():
            self.con.execute("UPDATE sweeps SET ended_at = ?, status = ? WHERE id = ?",
                             [datetime.now(UTC).replace(tzinfo=None), status, sweep_id])
            if status == "interrupted":
                self.con.execute("UPDATE trials SET status = 'interrupted', updated_at = ? WHERE sweep_id = ? AND "
                                 "status = 'running'", [datetime.now(UTC).replace(tzinfo=None), sweep_id])

    def retry_failed(self, sweep_id: str) -> list[str]:
        """Set the sweep's ``failed`` trials back to pending to run again (``launch.py resume --retry-failed``), each
        error kept first as a ``trial_retries`` row; their ids."""
        now = datetime.now(UTC).replace(tzinfo=None)
        with self.transaction():
            ids = [r[0] for r in self.con.execute("SELECT id FROM trials WHERE sweep_id = ? AND status = 'failed' "
                                                  "ORDER BY id", [sweep_id]).fetchall()]
            self.con.execute("INSERT INTO trial_retries SELECT id, sweep_id, ?, error FROM trials WHERE sweep_id = ? "
                             "AND status = 'failed'", [now, sweep_id])
            self.con.execute("UPDATE trials SET status = 'pending', updated_at = ? WHERE sweep_id = ? AND "
                             "status = 'failed'", [now, sweep_id])
        return ids

    def write_trial(self, row: Mapping[str, Any]) -> None:
        """Upsert a trial. Replayed events change nothing: a row that ended is never set back to pending or running,
        and a completed or diverged row is final (only a failed one may later complete, after a retry)."""
        current = self.con.execute("SELECT status FROM trials WHERE id = ?", [row["id"]]).fetchone()
        if current is not None and (current[0] in FINAL or (current[0] in TERMINAL and row["status"] not in TERMINAL)):
            return
        with self.transaction():
            self._upsert("trials", row, exists=current is not None)
            self.write_memberships([(row["id"], row["dimension"], row["group"])])

    def finished_results(self, sweep_id: str) -> dict[str, str]:
        """Final records of the sweep's trials that completed or diverged (a resumed sweep does not run them again)."""
        rows = self.con.execute("SELECT id, result FROM trials WHERE sweep_id = ? AND status IN ('completed', "
                                "'diverged') AND result IS NOT NULL", [sweep_id]).fetchall()
        return dict(rows)

    def plan_trials(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Record planned trials as pending, leaving the ones already recorded (a resumed sweep) as they are."""
        known = {r[0] for r in self.con.execute("SELECT id FROM trials").fetchall()}
        new = list({row["id"]: row for row in rows if row["id"] not in known}.values())
        with self.transaction():
            self._insert("trials", new)
            self.write_memberships([(row["id"], row["dimension"], row["group"]) for row in new])

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
        with self.transaction():  # a trial is completed with all of its rows, or not at all
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
        latest = {(step, split, name): float(v) for step, split, name, v in rows if math.isfinite(v)}
        if latest:  # one statement over list parameters: executemany cost ~45 ms a report, the sweep driver's largest
            steps, splits, names = (list(c) for c in zip(*latest, strict=True))
            self.con.execute(METRICS_INSERT, [trial_id, steps, splits, names, list(latest.values())])

    def reopen_sweep(self, sweep_id: str) -> None:
        """Mark a sweep running again (``launch.py resume``): it keeps its row and start, and loses its end."""
        self.con.execute("UPDATE sweeps SET status = 'running', ended_at = NULL WHERE id = ?", [sweep_id])

    def trial_counts(self, sweep_id: str) -> dict[str, int]:
        """How many of the sweep's trials ended in each status (the driver's closing line)."""
        rows = self.con.execute("SELECT status, count(*) FROM trials WHERE sweep_id = ? GROUP BY status "
                                "ORDER BY status", [sweep_id]).fetchall()
        return dict(rows)
