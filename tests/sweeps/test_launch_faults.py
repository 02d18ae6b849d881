"""Faults around a sweep's driver (issue 16): a driver killed while Ray rotates a trial's checkpoints, trials that
fail (a documented non-zero exit naming them), and the progress a running sweep prints. Every Ray process a test
starts is ended by session (tests/sweeps/sessions.py)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from sweeps.driver import FAILED_TRIALS_EXIT, KEEP_CHECKPOINTS
from sweeps.launch import main
from sweeps.ray_trial import error_line
from sweeps.resume import recorded_checkpoints
from tests.sweeps.test_launch import SMOKE, _db, _launch, _launch_wrapped
from tests.sweeps.test_progress import PROGRESS


def test_a_failed_trials_line_names_its_exception() -> None:
    """The line of an error that names it: a traceback's last exception line, else its first line."""
    trace = ("Failure # 1 (occurred at 2026-01-01)\nray::ImplicitFunc.train() (pid=1)\n  File \"x.py\", line 3\n"
             "tests.sweeps.wrapped_launch.InjectedFailure: injected failure of trial t1\n")
    assert error_line(trace) == "tests.sweeps.wrapped_launch.InjectedFailure: injected failure of trial t1"
    assert error_line("out of memory: CUDA\nmore") == "out of memory: CUDA" and error_line(None).startswith("no error")


# --- a trial that fails: exit code 3, named, every other result kept ------------------------------------------------


def test_failed_trial_makes_the_sweep_exit_3_naming_it_and_keeps_the_rest(real_data, tmp_path: Path,
                                                                          sessions) -> None:
    db = tmp_path / "results.duckdb"
    proc = _launch_wrapped(sessions, "grid", "--study", "smoke", "--tasks", "sms_spam", "--dimensions", "method",
                           "--max-failures", "1", "--db", str(db), "--storage", str(tmp_path / "ray"),
                           env={"FINETUNE_TEST_ALWAYS_FAIL": "method-bitfit-", "FINETUNE_PROGRESS_INTERVAL_S": "1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == FAILED_TRIALS_EXIT == 3, out[-3000:]
    con = _db(db)
    rows = dict(con.execute("SELECT id, status FROM trials").fetchall())
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM trials").fetchone() == (5, 5)
    failed = [t for t, s in rows.items() if s == "failed"]
    assert len(failed) == 1 and failed[0].startswith("method-bitfit-")
    assert sorted(rows.values()) == ["completed"] * 4 + ["failed"]  # no stray running/pending, no lost result
    assert con.execute("SELECT count(*) FROM trials WHERE status = 'completed' AND result IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"
    con.close()
    # the culprit, named with its error's line, after the closing counts
    named = re.search(rf"^1 trial\(s\) ended failed \(exit code 3\).*\n  {failed[0]}: (.*)$", out, re.M)
    assert named and "InjectedFailure: injected failure of trial" in named[1], out[-3000:]
    assert f"trial {failed[0]} failed: " in out
    # progress, as plain lines (stdout is a pipe here): counts, elapsed and an ETA, and a last one when it ends
    lines = PROGRESS.findall(out)
    assert len(lines) >= 2, out[-3000:]
    assert re.search(r"^progress: 5/5 trials done \(1 failed\), 0 running, 0 pending; elapsed \d+:\d\d, finished$",
                     out, re.M)


# --- the driver killed while Ray rotates a trial's checkpoints -------------------------------------------------------


def _rotation_study(tmp_path: Path) -> Path:
    """Three trials of sms_spam, checkpointing every step (Ray keeps KEEP_CHECKPOINTS: each new one deletes the
    oldest)."""
    base = {k: v for k, v in SMOKE.items() if k not in ("dimension_tasks", "task_dimensions")}
    base["base"] = {**base["base"], "train.max_steps": 4, "train.checkpoint_every": 1}
    study = {**base, "name": "rotation", "tasks": {"sms_spam": {}}, "learning_rates": {"default": [1e-3]},
             "dimensions": {"rot": {"a": {"method.name": "full"}, "b": {"method.name": "head_only"},
                                    "c": {"method.name": "lora"}}}}
    path = tmp_path / "rotation.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _wait_for_rotated_state(experiment: Path, trials: int, snapshot: Path, timeout: float = 300) -> dict[str, Path]:
    """Until Ray's state on storage names each of ``trials`` trials' checkpoint number KEEP_CHECKPOINTS as its
    newest, with its first one deleted: the moment after a rotation. The held trials report nothing more, but Ray rewrites the state at
    every step (in place: a kill can tear it), so that state's files are kept in ``snapshot``."""
    deadline, named = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir()
        for state in experiment.glob("experiment_state*.json"):
            shutil.copy(state, snapshot / state.name)
        try:
            named = recorded_checkpoints(snapshot)
        except (OSError, ValueError, KeyError):  # copied while Ray was writing it
            named = {}
        rotated = {folder: experiment / folder / path.name for folder, path in named.items() if path is not None}
        rotated = {folder: path for folder, path in rotated.items() if path.name == NAMED
                   and path.is_dir() and not (path.parent / "checkpoint_000000").exists()}
        if len(rotated) == trials:
            return rotated
        time.sleep(0.5)
    pytest.fail(f"Ray's state in {experiment} never named {trials} rotated checkpoints: {named}")


def _force(condition: str, checkpoint: Path) -> None:
    """Leave a trial's checkpoints as a driver killed at that point of a rotation would (``checkpoint`` is the one
    Ray's state names).

    ``deleted``: the state names a checkpoint already deleted, a newer one exists (killed after Ray deleted the old
    checkpoint, before its state naming the new one reached storage). ``none``: the named checkpoint is gone and no
    other exists. ``appearing``: the named one is intact and the next is half written (killed as it appeared)."""
    folder = checkpoint.parent
    if condition == "deleted":
        checkpoint.rename(folder / NEXT)
    elif condition == "none":
        for kept in folder.glob("checkpoint_*"):
            shutil.rmtree(kept)
    else:
        partial = folder / NEXT
        partial.mkdir()
        data = (checkpoint / "state.pt").read_bytes()
        (partial / "state.pt").write_bytes(data[: len(data) // 2])


# The checkpoint Ray's state names when the trials hold (checkpoint_k is step k + 1: one a step), the one after it,
# and what each condition's trial resumes from: the step of the newest checkpoint that exists, or scratch.
HOLD = KEEP_CHECKPOINTS + 1
NAMED, NEXT = f"checkpoint_{HOLD - 1:06d}", f"checkpoint_{HOLD:06d}"
RESUMED_FROM = {"deleted": HOLD, "none": 0, "appearing": HOLD}


@pytest.mark.parametrize("run", range(5))
def test_driver_killed_at_a_checkpoint_rotation_resumes_every_trial_exactly_once(run: int, real_data, tmp_path: Path,
                                                                                 sessions, capsys) -> None:
    """Forced, not hoped for: three trials hold right after checkpoint HOLD (Ray has rotated each once), the
    driver is killed (SIGKILL, whole session), the test leaves each trial's checkpoints as a kill at a point of the
    rotation would (each run deals the conditions out differently), and ``resume`` must finish every trial, each
    exactly once, exit 0 and leave nothing running."""
    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    study = _rotation_study(tmp_path)
    driver = _launch_wrapped(sessions, "grid", "--study", str(study), "--name", f"rot{run}", "--db", str(db),
                             "--storage", str(storage), "--cpus-per-trial", "0.5", "--max-concurrent", "3",
                             env={"FINETUNE_TEST_HOLD_AFTER_CHECKPOINTS": str(HOLD)},
                             own_ray=True)  # the kill takes the driver's Ray, and the held trials, with it
    experiment, snapshot = storage / f"rot{run}", tmp_path / "state-at-rotation"
    rotated = _wait_for_rotated_state(experiment, 3, snapshot)
    sessions.end(driver)
    for state in snapshot.iterdir():  # what storage held at that moment (the kill may have torn Ray's rewrite)
        shutil.copy(state, experiment / state.name)
    conditions = ["deleted", "none", "appearing"]
    conditions = conditions[run % 3:] + conditions[: run % 3]
    expected = {}
    for condition, (folder, checkpoint) in zip(conditions, sorted(rotated.items()), strict=True):
        group = re.search(r"trial_id_rot-(\w)-", folder)[1]
        expected[group] = condition
        _force(condition, checkpoint)
    con = _db(db)
    assert con.execute("SELECT count(*) FROM trials WHERE status = 'completed'").fetchone()[0] == 0
    con.close()

    resume = _launch(sessions, "resume", "--db", str(db))
    out, _ = resume.communicate(timeout=600)
    assert resume.returncode == 0, out[-4000:]
    assert f"resuming from {NEXT}, the newest one kept" in out
    assert "it starts again from scratch" in out
    assert "Could not recover from checkpoint" not in out
    con = _db(db)
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM trials").fetchone() == (3, 3)
    rows = {g: (s, json.loads(r)) for g, s, r in con.execute('SELECT "group", status, result FROM trials').fetchall()}
    assert {g: s for g, (s, _) in rows.items()} == {"a": "completed", "b": "completed", "c": "completed"}, rows
    assert {g: r["resumed_from_step"] for g, (_, r) in rows.items()} == {
        g: RESUMED_FROM[c] for g, c in expected.items()}
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"
    losses = con.execute("""SELECT trial_id, count(*), count(DISTINCT step) FROM metrics
                            WHERE split = 'train' AND name = 'loss' GROUP BY trial_id""").fetchall()
    assert len(losses) == 3 and all(n == distinct == 4 for _, n, distinct in losses)
    con.close()
    # a second resume has nothing left to do
    assert main(["resume", "--db", str(db)]) == 0
    assert "already completed; nothing to resume" in capsys.readouterr().out
