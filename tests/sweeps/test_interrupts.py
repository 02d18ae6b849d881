"""Ctrl-C and SIGTERM on the sweep driver (issue 25), through the real CLI: the sweep and its running trials end
``interrupted``, the exit code is 130 or 143 with one line naming the resume command, and ``resume`` then runs every
planned trial exactly once. Each signal is sent at a forced moment: one trial finished and two held in flight by the
test wrapper's gate (tests/sweeps/wrapped_launch.py), never after a sleep."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.sweeps.sessions import TWO_AT_ONCE
from tests.sweeps.test_launch import PY, SMOKE, _db, _launch, _launch_wrapped

GATE = {"FINETUNE_TEST_GATE_PASS": "1"}  # the first trial runs; every later one is held until its worker dies
RESUME_LINE = re.compile(r"^sweep (\S+) interrupted by (SIG\w+) after \d+ s: (\d+) of (\d+) trials finished; resume "
                         r"with: (python sweeps/launch\.py resume --db \S+ --sweep \S+)$", re.M)


def _study(tmp_path: Path) -> Path:
    """Four sms_spam trials of the smoke study's tiny model (two at a time where a test asks: ``TWO_AT_ONCE``)."""
    base = {k: v for k, v in SMOKE.items() if k not in ("dimension_tasks", "task_dimensions")}
    study = {**base, "name": "signals", "tasks": {"sms_spam": {}}, "learning_rates": {"default": [1e-3]},
             "dimensions": {"sig": {"a": {"method.name": "full"}, "b": {"method.name": "head_only"},
                                    "c": {"method.name": "lora"}, "d": {"method.name": "bitfit"}}}}
    path = tmp_path / "signals.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


class Driver:
    """A launcher whose output a thread collects, so the test can wait for a line while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self.seen = proc, queue.Queue(), []
        threading.Thread(target=lambda: [self.lines.put(x) for x in proc.stdout], daemon=True).start()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, x)) for x in self.seen) < count:
            try:
                self.seen.append(self.lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
            except queue.Empty:
                pytest.fail(f"no {count} lines matching {pattern!r} in time:\n" + "".join(self.seen[-40:]))

    def finish(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        while True:
            try:
                self.seen.append(self.lines.get(timeout=5))
            except queue.Empty:
                return "".join(self.seen)


def _wait_held(gate: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list(gate.glob("held-*"))) < count:
        assert time.monotonic() < deadline, f"{count} trials were not held at the gate {gate} in time"
        time.sleep(0.2)


def _interrupted_sweep(sessions, tmp_path: Path, signals: list[signal.Signals]) -> tuple[int, str, float, Path]:
    """Start the four-trial sweep, send ``signals`` (the next one after the driver's first line about the last)
    once one trial finished and two are held in flight; (exit code, output, seconds from first signal to exit, db)."""
    db, gate = tmp_path / "results.duckdb", tmp_path / "gate"
    driver = Driver(_launch_wrapped(sessions, "grid", "--study", str(_study(tmp_path)), "--db", str(db), "--storage",
                                    str(tmp_path / "ray"), *TWO_AT_ONCE,
                                    env={**GATE, "FINETUNE_TEST_GATE_DIR": str(gate)}))
    driver.wait_for(r"^trial \S+ completed")
    _wait_held(gate, 2)
    sent = time.monotonic()
    for n, signum in enumerate(signals):
        if n:
            driver.wait_for(r"received: stopping the sweep")
        driver.proc.send_signal(signum)
    out = driver.finish()
    return driver.proc.returncode, out, time.monotonic() - sent, db


def _statuses(db: Path) -> tuple[str, dict[str, int]]:
    con = _db(db)
    try:
        sweep = con.execute("SELECT status FROM sweeps").fetchone()[0]
        return sweep, dict(con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall())
    finally:
        con.close()


def _resume_finishes_every_trial_once(sessions, db: Path, line: re.Match) -> str:
    """Run the printed resume command; every planned trial completed once, its rows written once."""
    con = _db(db)
    before = dict(con.execute("SELECT id, updated_at FROM trials WHERE status = 'completed'").fetchall())
    con.close()
    command = shlex.split(line[5])
    assert command[:3] == ["python", "sweeps/launch.py", "resume"]
    proc = _launch(sessions, *command[2:])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert _statuses(db) == ("completed", {"completed": 4})
    con = _db(db)
    after = dict(con.execute("SELECT id, updated_at FROM trials").fetchall())
    assert all(after[t] == when for t, when in before.items()), "a finished trial was run again"
    losses = con.execute("""SELECT trial_id, count(*), count(DISTINCT step) FROM metrics
                            WHERE split = 'train' AND name = 'loss' GROUP BY trial_id""").fetchall()
    assert len(losses) == 4 and all(n == distinct == 3 for _, n, distinct in losses), losses
    assert con.execute("SELECT count(*), count(DISTINCT trial_id) FROM predictions WHERE example = 0 AND split = "
                       "'test'").fetchone() == (4, 4)
    con.close()
    return out


@pytest.mark.parametrize(("signals", "code"), [([signal.SIGINT], 130), ([signal.SIGTERM], 143),
                                               ([signal.SIGINT, signal.SIGINT], 130)],
                         ids=["sigint", "sigterm", "double-sigint"])
def test_a_signalled_sweep_is_interrupted_exits_128_plus_n_and_resumes_every_trial_once(
        signals: list[signal.Signals], code: int, real_data, tmp_path: Path, sessions) -> None:
    returncode, out, seconds, db = _interrupted_sweep(sessions, tmp_path, signals)
    print(f"\n{'+'.join(s.name for s in signals)}: exit {returncode} {seconds:.1f} s after the first signal")
    assert returncode == code, out[-3000:]
    [line] = RESUME_LINE.finditer(out)
    assert line[2] == signals[0].name and (line[3], line[4]) == ("1", "4"), line[0]
    assert "Tuner.restore" not in out and "Traceback" not in out, out[-3000:]
    sweep, trials = _statuses(db)
    assert sweep == "interrupted"
    assert trials == {"completed": 1, "interrupted": 2, "pending": 1}, trials
    resumed = _resume_finishes_every_trial_once(sessions, db, line)
    print(f"resume: {resumed.count(' completed test ')} trials run, {resumed.count('resuming sweep')} restore")


def test_make_demo_stops_at_an_interrupted_sweep_and_builds_no_guide(real_data, tmp_path: Path, sessions) -> None:
    """The demo's recipe (grid, summary, guide, as make runs them) with its grid interrupted: make stops there."""
    db, gate, guide = tmp_path / "demo.duckdb", tmp_path / "gate", tmp_path / "guide"
    makefile = tmp_path / "Makefile"
    wrapped = f"{PY} -m tests.sweeps.wrapped_launch"
    makefile.write_text(f"demo:\n\t{wrapped} grid --study {_study(tmp_path)} --db {db} --storage {tmp_path / 'ray'}\n"
                        f"\t{PY} sweeps/launch.py summary --db {db}\n"
                        f"\t{PY} analysis/build_guide.py --db {db} --out {guide}\n")
    driver = Driver(sessions.start(["make", "-f", str(makefile), "demo"], cwd=REPO_ROOT,
                                   env={**os.environ, **GATE, "FINETUNE_TEST_GATE_DIR": str(gate)}))
    driver.wait_for(r"^trial \S+ completed")
    _wait_held(gate, 2)
    launcher = [p for p in _children(driver.proc.pid) if "wrapped_launch" in p[1]]
    assert len(launcher) == 1, launcher
    os.kill(launcher[0][0], signal.SIGINT)  # Ctrl-C reaches the launcher; make sees its exit code
    out = driver.finish()
    assert driver.proc.returncode != 0 and RESUME_LINE.search(out), out[-3000:]
    assert "launch.py summary" not in out and not guide.exists()


def _children(pid: int) -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [(int(p), args) for p, parent, args in rows if int(parent) == pid]


# --- a second signal inside Ray's compiled code -----------------------------------------------------------------


class _CompiledWaitTuner:
    """A Tuner whose fit receives both signals, the second inside "compiled code": the Interrupted it raises comes
    out as the SystemError CPython reports for a C function that returned with an exception set (as ray.wait does)."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals, self.stopped = signals, 0

    def fit(self) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "stopped", self.stopped + 1))  # Ray's graceful stop
        os.kill(os.getpid(), self.signals[0])
        try:
            for signum in self.signals[1:]:
                os.kill(os.getpid(), signum)
        except BaseException as err:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from err


@pytest.mark.parametrize("signals", [[signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGINT]],
                         ids=["sigint+sigint", "sigterm+sigint"])
def test_a_second_signal_inside_compiled_code_still_ends_the_fit_as_interrupted(signals, capsys) -> None:
    from sweeps import interrupts

    tuner = _CompiledWaitTuner(signals)
    with interrupts.guard(), pytest.raises(interrupts.Interrupted) as stop:
        interrupts.fit(tuner)
    assert tuner.stopped == 1  # the first signal asked Ray to stop gracefully
    assert stop.value.exit_code == 128 + signals[0]  # the first signal names the exit code
    assert "received: stopping the sweep" in capsys.readouterr().err


def test_an_error_with_no_signal_behind_it_is_not_taken_for_an_interrupt() -> None:
    from sweeps import interrupts

    class Failing:
        def fit(self) -> None:
            raise SystemError("a real error")

    with interrupts.guard(), pytest.raises(SystemError, match="a real error"):
        interrupts.fit(Failing())
    try:
        try:
            raise interrupts.Interrupted(signal.SIGTERM)
        except interrupts.Interrupted:
            raise RuntimeError("raised while the stop was handled")  # noqa: B904 -- the implicit __context__
    except RuntimeError as err:
        assert interrupts.interrupt_in(err).name == "SIGTERM"
    assert interrupts.interrupt_in(ValueError("plain")) is None


# --- launch.py status: exit codes scripts can test ------------------------------------------------------------------


def test_status_exits_4_for_an_unfinished_sweep_3_for_failed_trials_and_0_otherwise(tmp_path: Path, capsys) -> None:
    from analysis.db import ResultsWriter, trial_row
    from sweeps.launch import main
    from sweeps.status import UNFINISHED_EXIT
    from sweeps.study import load_study, plan

    db = tmp_path / "results.duckdb"
    trials = plan(load_study("smoke"), "x", tasks=["sms_spam"], dimensions=["method"])[:2]
    writer = ResultsWriter(db)
    for n, (sweep_id, status) in enumerate((("done", "completed"), ("bad", "completed"), ("cut", "interrupted"))):
        writer.start_sweep({"id": sweep_id, "study": "smoke", "kind": "grid", "started_at": f"2026-01-0{n + 1}",
                            "status": "running", "planned_trials": 2})
        specs = [{**t.as_spec(), "trial_id": f"{sweep_id}-{i}", "sweep_id": sweep_id} for i, t in enumerate(trials)]
        writer.plan_trials(trial_row(spec, "pending") for spec in specs)
        writer.write_trial(trial_row(specs[0], "completed"))
        writer.write_trial(trial_row(specs[1], "failed" if sweep_id == "bad" else "completed" if sweep_id == "done"
                                     else "running", error="RuntimeError: boom" if sweep_id == "bad" else None))
        writer.end_sweep(sweep_id, status)
    writer.close()
    codes = {sweep: main(["status", "--db", str(db), "--sweep", sweep]) for sweep in ("done", "bad", "cut")}
    assert codes == {"done": 0, "bad": 3, "cut": UNFINISHED_EXIT} and UNFINISHED_EXIT == 4
    assert main(["status", "--db", str(db)]) == 4  # every sweep: the worst one decides
    out = capsys.readouterr()
    assert re.search(r"^cut\s+smoke\s+interrupted\s+1/2\s+0\s+1$", out.out, re.M), out.out
    assert "unfinished (exit code 4): cut; python sweeps/launch.py resume" in out.err
    assert "ended with failed trials (exit code 3): bad; python sweeps/launch.py resume --retry-failed" in out.err
    assert main(["status", "--db", str(db), "--sweep", "nope"]) == 2


# --- resume --retry-failed: only what failed runs again, its earlier error kept -------------------------------------


def test_retry_failed_reruns_only_the_failed_trial_keeps_its_error_and_writes_nothing_twice(
        real_data, tmp_path: Path, sessions, capsys) -> None:
    from sweeps.launch import main

    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    proc = _launch_wrapped(sessions, "grid", "--study", str(_study(tmp_path)), "--db", str(db), "--storage",
                           str(storage), "--max-failures", "0", env={"FINETUNE_TEST_ALWAYS_FAIL": "sig-b-"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out[-3000:]
    assert _statuses(db) == ("completed", {"completed": 3, "failed": 1})
    con = _db(db)
    before = dict(con.execute("SELECT id, updated_at FROM trials WHERE status = 'completed'").fetchall())
    [(failed, error)] = con.execute("SELECT id, error FROM trials WHERE status = 'failed'").fetchall()
    con.close()
    assert failed.startswith("sig-b-") and "InjectedFailure" in error

    assert main(["resume", "--db", str(db)]) == 0  # no retry unasked (in this process: it starts nothing)
    assert "already completed; nothing to resume" in capsys.readouterr().out
    retry = _launch(sessions, "resume", "--retry-failed", "--db", str(db))
    out, _ = retry.communicate(timeout=600)
    assert retry.returncode == 0, out[-3000:]
    assert f"retrying 1 failed trial(s) from step 0 (each earlier error is kept in trial_retries): {failed}" in out
    assert re.findall(r"^trial (\S+) completed", out, re.M) == [failed]  # the others are not run again
    assert _statuses(db) == ("completed", {"completed": 4})
    con = _db(db)
    assert con.execute("SELECT trial_id, error FROM trial_retries").fetchall() == [(failed, error)]
    after = dict(con.execute("SELECT id, updated_at FROM trials").fetchall())
    assert all(after[t] == when for t, when in before.items())
    assert con.execute("SELECT error FROM trials WHERE id = ?", [failed]).fetchone() == (None,)
    losses = con.execute("""SELECT trial_id, count(*), count(DISTINCT step) FROM metrics
                            WHERE split = 'train' AND name = 'loss' GROUP BY trial_id""").fetchall()
    assert len(losses) == 4 and all(n == distinct == 3 for _, n, distinct in losses), losses
    con.close()
    assert main(["resume", "--retry-failed", "--db", str(db)]) == 0
    assert "already completed; nothing to retry" in capsys.readouterr().out
    con = _db(db)
    assert con.execute("SELECT count(*) FROM trial_retries").fetchone() == (1,)
    con.close()
