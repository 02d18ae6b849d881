"""The launcher and the study database (issue 16 items 4-7): resume writes the database named on the command line;
a second launcher on a held file writes nothing; a file that is not a study database of this version is refused
before Ray starts, untouched; a full disk stops the sweep as interrupted, with whole rows, and resume finishes it."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from sweeps.launch import main
from tests.analysis.test_db import bad_files
from tests.conftest import REPO_ROOT
from tests.sweeps.sessions import Sessions

PY = sys.executable
SMALL = ["--study", "smoke", "--tasks", "sms_spam", "--dimensions", "method"]  # five tiny trials


def _launch(sessions: Sessions, *args: str, module: str | None = None, env: dict | None = None,
            own_ray: bool = False):
    """The launcher (or a test wrapper ``module`` of it) in a session of its own, on the session's shared Ray unless
    ``own_ray``."""
    command = [PY, "-m", module] if module else [PY, "sweeps/launch.py"]
    return sessions.launch(command, args, env=env, own_ray=own_ray)


def _rows(db: Path) -> tuple[list, list]:
    """(sweeps (id, status), trials (status, count)) of a database, read on a copy-free read-only connection."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        sweeps = con.execute("SELECT id, status FROM sweeps ORDER BY id").fetchall()
        trials = con.execute("SELECT status, count(*) FROM trials GROUP BY ALL ORDER BY ALL").fetchall()
        assert con.execute("SELECT count(*) = count(DISTINCT id) FROM trials").fetchone()[0]
        return sweeps, trials
    finally:
        con.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- item 6: foreign, damaged, newer files are refused before anything starts, untouched ------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "sqlite", "foreign", "minus-a-column", "newer", "text"])
def test_grid_refuses_a_file_that_is_no_study_database_before_ray_starts(kind: str, tmp_path: Path,
                                                                         capsys) -> None:
    path, says = bad_files(tmp_path)[kind]
    before = _sha(path)
    assert main(["grid", *SMALL, "--db", str(path), "--storage", str(tmp_path / "ray")]) == 2
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert str(path) in line and says in line, err
    assert main(["status", "--db", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
    guide = subprocess.run([PY, "analysis/build_guide.py", "--db", str(path), "--out", str(tmp_path / "guide")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert guide.returncode == 2 and str(path) in guide.stderr and "Traceback" not in guide.stderr, guide.stderr
    assert _sha(path) == before and not Path(f"{path}.wal").exists()
    assert not (tmp_path / "ray").exists()
    import ray

    assert not ray.is_initialized()


# --- item 7: a full disk stops the sweep as interrupted, with whole rows; resume finishes it ----------------------------

def test_a_full_disk_under_ray_storage_marks_the_sweep_interrupted_with_one_clear_line(tmp_path: Path) -> None:
    """Ray's fit fails on its storage (ENOSPC wrapped in Ray's own error): the sweep is interrupted, the message is
    one line naming the database and saying how to go on."""
    from analysis.db import DiskFullError, ResultsWriter
    from sweeps.driver import run_and_close as _run_and_close

    db = tmp_path / "results.duckdb"

    def fit() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ray" / "experiment_state.json"))
        except OSError as err:
            raise RuntimeError("The Ray Tune run failed.") from err

    with ResultsWriter(db) as writer:
        writer.start_sweep({"id": "s1", "study": "smoke", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                            "status": "running", "planned_trials": 1})
        with pytest.raises(DiskFullError) as err:
            _run_and_close(fit, writer, "s1")
    message = str(err.value)
    assert "\n" not in message and str(db) in message and "no space left" in message and "resume --db" in message
    assert _rows(db) == ([("s1", "interrupted")], [])


def test_a_full_disk_while_writing_results_leaves_whole_rows_and_resume_finishes(real_data, tmp_path: Path,
                                                                                  sessions) -> None:
    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    args = ["grid", *SMALL, "--db", str(db), "--storage", str(storage), "--max-concurrent", "1"]
    proc = _launch(sessions, *args, module="tests.sweeps.full_disk_launch", env={"FINETUNE_TEST_FULL_DISK_AT": "2"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    [line] = [x for x in out.splitlines() if x.startswith("error: ")]
    assert str(db) in line and "no space left" in line and "marked interrupted" in line, out[-3000:]
    assert "Traceback" not in out.split("error: ")[-1]
    sweeps, trials = _rows(db)
    assert [s[1] for s in sweeps] == ["interrupted"]
    assert dict(trials).get("completed") == 1 and sum(n for _, n in trials) == 5, trials
    con = duckdb.connect(str(db), read_only=True)
    # whole rows: the completed trial has its predictions; the one the disk stopped has none and is not completed
    assert con.execute("SELECT t.status, count(p.trial_id) > 0 FROM trials t LEFT JOIN predictions p ON p.trial_id "
                       "= t.id GROUP BY t.id, t.status HAVING t.status = 'completed' OR count(p.trial_id) > 0"
                       ).fetchall() == [("completed", True)]
    con.close()
    assert sessions.end_all() == []
    resumed = _launch(sessions, "resume", "--db", str(db))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    sweeps, trials = _rows(db)
    assert [s[1] for s in sweeps] == ["completed"] and trials == [("completed", 5)]
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(DISTINCT trial_id) FROM predictions").fetchone() == (5,)
    con.close()


# --- item 5: a second launcher on a held database writes nothing ------------------------------------------------------

def test_two_launchers_at_once_one_runs_the_other_writes_nothing(real_data, tmp_path: Path, sessions) -> None:
    db = tmp_path / "results.duckdb"
    procs = [_launch(sessions, "grid", *SMALL, "--name", f"sweep-{i}", "--db", str(db),
                     "--storage", str(tmp_path / f"ray{i}")) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    [line] = [x for x in loser.splitlines() if x.startswith("error: ")]
    assert str(db) in line and "in use by another process" in line, loser[-3000:]
    winner = [p.returncode for p in procs].index(0)
    sweeps, trials = _rows(db)
    assert sweeps == [(f"sweep-{winner}", "completed")] and trials == [("completed", 5)]
    assert not (tmp_path / f"ray{1 - winner}").exists()


# --- item 4: resume writes the database named on the command line -----------------------------------------------------

def test_resume_writes_the_database_it_is_given_after_the_file_moved(real_data, tmp_path: Path, sessions) -> None:
    db, storage = tmp_path / "A.duckdb", tmp_path / "ray"
    driver = _launch(sessions, "grid", *SMALL, "--db", str(db), "--storage", str(storage), "--max-concurrent", "1",
                     own_ray=True)  # killed with the Ray it started
    deadline = time.monotonic() + 300
    for line in driver.stdout:
        if line.startswith("trial ") or time.monotonic() > deadline:
            break
    sessions.end(driver)  # SIGKILL to the driver and everything it started
    moved = tmp_path / "moved" / "B.duckdb"
    moved.parent.mkdir()
    db.rename(moved)
    if Path(f"{db}.wal").exists():
        Path(f"{db}.wal").rename(f"{moved}.wal")
    out, _ = (proc := _launch(sessions, "resume", "--db", str(moved))).communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert not db.exists() and not Path(f"{db}.wal").exists(), "resume wrote the database's old path"
    sweeps, trials = _rows(moved)
    assert [s[1] for s in sweeps] == ["completed"] and trials == [("completed", 5)]
