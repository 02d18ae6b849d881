"""Sweeps on Ray Tune into DuckDB: the smoke study end to end, a two-node cluster, a killed driver resumed, retries
and divergence, and bad input refused before anything starts. Every Ray process a test starts is ended by session."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from sweeps.launch import main
from tests.conftest import REPO_ROOT
from tests.sweeps.sessions import Sessions

PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
SMOKE = yaml.safe_load((REPO_ROOT / "sweeps" / "studies" / "smoke.yaml").read_text())


@pytest.fixture
def sessions():
    s = Sessions()
    yield s
    assert s.end_all() == [], "processes left running"


def _launch(sessions: Sessions, *args: str, env: dict | None = None):
    return sessions.start([PY, "sweeps/launch.py", *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})})


def _finish(proc, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _db(path: Path):
    return duckdb.connect(str(path), read_only=True)


def test_smoke_study_end_to_end(real_data, tmp_path: Path, sessions) -> None:
    db = tmp_path / "results.duckdb"
    out = _finish(_launch(sessions, "grid", "--study", "smoke", "--db", str(db), "--storage", str(tmp_path / "ray")))
    con = _db(db)
    planned = con.execute("SELECT planned_trials, status, git_commit, package_versions->>'$.torch' FROM sweeps"
                          ).fetchone()
    assert planned[0] == 63 and planned[1] == "completed" and planned[2] and planned[3]
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM trials").fetchone() == (63, 63)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY status").fetchall() == [("completed", 63)]
    assert con.execute("SELECT count(DISTINCT task), count(DISTINCT dimension) FROM trials").fetchone() == (5, 7)
    assert con.execute("SELECT count(*) FROM trials WHERE test_primary IS NULL OR trainable_params IS NULL"
                       ).fetchone()[0] == 0
    # baselines: every trial scored its untrained model on test; only tasks with class labels have a majority class
    assert con.execute("""SELECT count(*) FROM trials WHERE baseline_step0 IS NULL
                          OR (baseline_majority IS NULL) <> (task IN ('alpaca', 'preference'))""").fetchone()[0] == 0
    # learning curves: one train loss per step (max_steps 3, log_every 1) and final validation/test values
    per_trial = con.execute("""SELECT trial_id, count(*) FILTER (WHERE split = 'train' AND name = 'loss'),
                                      count(*) FILTER (WHERE split = 'test') FROM metrics GROUP BY trial_id""").fetchall()
    assert len(per_trial) == 63 and all(r[1] == 3 and r[2] >= 2 for r in per_trial)
    assert "ended after" in out
    con.close()
    # the guide builds from what the sweep wrote: every task and dimension, the random-init banner, generations
    run = subprocess.run([PY, "analysis/build_guide.py", "--db", str(db), "--out", str(tmp_path / "guide")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    md = (tmp_path / "guide" / "guide.md").read_text()
    assert "Random-init results" in md.split("## How to read")[0]
    for title in ("## LoRA rank", "## How many layers get LoRA", "## Which projections get LoRA", "## Optimizers",
                  "## Learning-rate schedules", "## How many transformer blocks to train (last-k)",
                  "## Generations side by side", "### Alpaca (instruction tuning)"):
        assert title in md
    assert "Every selected trial completed." in md
    assert "## DPO preference tuning: method and β" in md and "### Preference pairs (DPO)" in md


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray rewrites 127.0.0.1 to the machine's interface address, which is not reachable here; 127.0.0.2 is loopback too
# and Ray takes it as given. Token authentication (Ray's default for `ray start`) with one token for every process.
NODE_IP = "127.0.0.2"


def _alive_nodes(address: str, env: dict) -> int:
    code = (f"import ray; ray.init(address={address!r}, _node_ip_address={NODE_IP!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0


def _launch_wrapped(sessions: Sessions, *args: str, env: dict | None = None):
    """``sweeps/launch.py`` through the test-only wrapper trainable (tests/sweeps/wrapped_launch.py): fault injection
    and the start barrier, switched on by the FINETUNE_TEST_* variables in ``env``."""
    return sessions.start([PY, "-m", "tests.sweeps.wrapped_launch", *args], cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})


def test_two_node_cluster_runs_trials_on_both_nodes(real_data, tmp_path: Path, sessions) -> None:
    """Each node offers 1 CPU and each trial takes 1, so two trials running at once are on different nodes. The test
    barrier holds the first trial until a second one runs beside it: both nodes are needed whatever the machine's load
    (left to the scheduler, all ten trials could run one after another on one node)."""
    import secrets

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    address = f"{NODE_IP}:{port}"
    node = ["--num-cpus=1", f"--node-ip-address={NODE_IP}", "--disable-usage-stats", "--block"]
    sessions.start([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *node], env=env)
    deadline = time.monotonic() + 180
    while _alive_nodes(address, env) < 1:
        assert time.monotonic() < deadline, "head node did not start"
        time.sleep(2)
    sessions.start([RAY, "start", f"--address={address}", *node], env=env)
    while _alive_nodes(address, env) < 2:
        assert time.monotonic() < deadline, "second node did not join"
        time.sleep(2)
    db = tmp_path / "results.duckdb"
    barrier = {"FINETUNE_TEST_BARRIER_DIR": str(tmp_path / "barrier"), "FINETUNE_TEST_BARRIER_COUNT": "2"}
    _finish(_launch_wrapped(sessions, "grid", "--study", "smoke", "--tasks", "sms_spam,nli", "--dimensions", "method",
                            "--address", address, "--node-ip-address", NODE_IP, "--db", str(db),
                            "--storage", str(tmp_path / "storage"), env={**env, **barrier}))
    con = _db(db)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 10)]
    nodes = {r[0] for r in con.execute("SELECT result->>'$.node_id' FROM trials").fetchall()}
    assert len(nodes) == 2, nodes


def test_dpo_starts_from_an_exported_instruction_tuning_trial(real_data, tmp_path: Path, sessions) -> None:
    """Alpaca trials keep their weights (train.export); a DPO sweep names one by trial id and starts from it."""
    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    common = ["--study", "smoke", "--db", str(db), "--storage", str(storage)]
    _finish(_launch(sessions, "grid", *common, "--tasks", "alpaca", "--dimensions", "method", "--set",
                    "train.export=true"))
    con = _db(db)
    sft = con.execute("SELECT id FROM trials WHERE \"group\" = 'full' AND status = 'completed'").fetchone()[0]
    con.close()
    exported = storage / "exports" / sft
    assert (exported / "model" / "config.json").is_file() and (exported / "result.json").is_file()
    _finish(_launch(sessions, "grid", *common, "--tasks", "preference", "--set", f"dpo.init={sft}"))
    con = _db(db)
    rows = con.execute("SELECT status, dpo_init, result->>'$.test_preference_accuracy' FROM trials "
                       "WHERE task = 'preference'").fetchall()
    assert len(rows) == 3 and all(r[0] == "completed" and r[1] == str(exported) and r[2] is not None for r in rows)
    # a trial id that never kept its weights is refused before anything starts
    other = con.execute("SELECT id FROM trials WHERE task = 'preference' LIMIT 1").fetchone()[0]
    con.close()
    run = subprocess.run([PY, "sweeps/launch.py", "grid", *common, "--tasks", "preference", "--set",
                          f"dpo.init={other}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "run it with --set train.export=true first" in run.stderr


def test_killed_driver_resumes_without_rerunning_or_duplicating(real_data, tmp_path: Path, sessions) -> None:
    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    driver = _launch(sessions, "grid", "--study", "smoke", "--dimensions", "method,lora_rank,optimizer",
                     "--db", str(db), "--storage", str(storage))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in driver.stdout], daemon=True).start()
    finished, seen, deadline = 0, [], time.monotonic() + 300
    while finished < 6:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            pytest.fail("driver did not finish 6 trials in time:\n" + "".join(seen[-40:]))
        seen.append(line)
        finished += line.startswith("trial ")
    sessions.end(driver)  # SIGKILL to the driver and everything it started
    con = _db(db)
    before = dict(con.execute("SELECT id, updated_at FROM trials WHERE status = 'completed'").fetchall())
    planned = con.execute("SELECT planned_trials FROM sweeps").fetchone()[0]
    con.close()
    assert 6 <= len(before) < planned == 36  # (5 + 2 + 2 variants) x 4 tasks

    _finish(_launch(sessions, "resume", "--db", str(db)))
    con = _db(db)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 36)]
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"
    after = dict(con.execute("SELECT id, updated_at FROM trials").fetchall())
    assert all(after[t] == when for t, when in before.items()), "a finished trial was run again"
    losses = con.execute("""SELECT trial_id, count(*), count(DISTINCT step) FROM metrics
                            WHERE split = 'train' AND name = 'loss' GROUP BY trial_id""").fetchall()
    assert len(losses) == 36 and all(n == distinct == 3 for _, n, distinct in losses)


def test_resume_when_rays_experiment_state_is_torn(real_data, tmp_path: Path, sessions) -> None:
    """Ray writes its state file in place; a driver killed mid-write leaves it empty. The database still knows which
    trials finished, and resume runs the rest."""
    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    driver = _launch(sessions, "grid", "--study", "smoke", "--tasks", "sms_spam", "--dimensions", "method,lora_rank",
                     "--db", str(db), "--storage", str(storage))
    for line in driver.stdout:
        if line.startswith("trial "):
            break
    sessions.end(driver)
    states = list(storage.glob("*/experiment_state*.json"))
    assert states
    for state in states:
        state.write_text("")
    out = _finish(_launch(sessions, "resume", "--db", str(db)))
    assert "unreadable" in out
    con = _db(db)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 7)]
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"


def test_failed_trial_retries_from_checkpoint_and_diverged_one_is_recorded(real_data, tmp_path: Path,
                                                                            sessions) -> None:
    base = {k: v for k, v in SMOKE.items() if k not in ("dimension_tasks", "task_dimensions")}
    study = {**base, "name": "faults", "tasks": {"sms_spam": {}}, "learning_rates": {"default": [1e-3]},
             "dimensions": {"fault": {"ok": {}, "boom": {"optim.name": "sgd", "optim.lr": 1e30,
                                                         "train.max_grad_norm": None}}}}
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(study))
    markers = tmp_path / "markers"
    markers.mkdir()
    db = tmp_path / "results.duckdb"
    _finish(_launch_wrapped(sessions, "grid", "--study", str(path), "--db", str(db), "--storage", str(tmp_path / "ray"),
                            env={"FINETUNE_TEST_FAIL_ONCE_DIR": str(markers)}))
    con = _db(db)
    rows = {g: (s, json.loads(r) if r else None) for g, s, r in
            con.execute('SELECT "group", status, result FROM trials').fetchall()}
    assert rows["ok"][0] == "completed" and rows["ok"][1]["resumed_from_step"] == 2  # resumed, not restarted
    assert len(list(markers.iterdir())) == 1  # exactly one injected failure happened
    assert rows["boom"][0] == "diverged" and rows["boom"][1]["diverged_at_step"] >= 2
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"


def test_optuna_search_with_asha_lands_in_the_same_database(real_data, tmp_path: Path, sessions) -> None:
    db = tmp_path / "results.duckdb"
    _finish(_launch(sessions, "search", "--study", "smoke", "--task", "sms_spam", "--method", "lora",
                    "--num-samples", "5", "--set", "train.max_steps=6", "--set", "train.eval_every=2",
                    "--db", str(db), "--storage", str(tmp_path / "ray")))
    con = _db(db)
    assert con.execute("SELECT kind, status, planned_trials FROM sweeps").fetchone() == ("search", "completed", 5)
    rows = con.execute("SELECT status, dimension, lora_rank, optim_lr, val_accuracy FROM trials").fetchall()
    assert len(rows) == 5 and {r[0] for r in rows} <= {"completed", "stopped"}
    assert {r[1] for r in rows} == {"search"}
    assert len({(r[2], r[3]) for r in rows}) == 5  # five different proposals
    assert all(r[4] is not None for r in rows)  # stopped ones keep their last validation score


# --- bad input: exit 2, nothing started ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("study_text", "args", "expected"),
    [
        ("name: x\ntasks: {sms_spam: {}\n", [], "not valid YAML"),
        ("name: x\ntasks: {sms_spam: {}}\ndimensions: {m: {a: {lora.rnk: 4}}}\nlearning_rates: {default: [0.1]}\n",
         [], "sms_spam / m.a: lora.rnk: unknown key"),
        ("name: x\ntaks: {}\n", [], "taks: unknown section"),
        (None, ["--set", "optim.lr=-1"], "optim.lr: must be a finite number > 0"),
        (None, ["--gpus-per-trial", "1"], "asked 1 GPU per trial; this machine has 0"),
        (None, ["--tasks", "mnist"], "'mnist' is not in study smoke"),
    ],
    ids=["malformed-yaml", "unknown-key-in-study", "unknown-section", "bad-set", "unsatisfiable-gpu", "unknown-task"],
)
def test_bad_input_exits_2_and_starts_nothing(study_text, args, expected, tmp_path: Path, capsys) -> None:
    study = "smoke"
    if study_text is not None:
        study = str(tmp_path / "study.yaml")
        Path(study).write_text(study_text)
    db = tmp_path / "results.duckdb"
    assert main(["grid", "--study", study, "--db", str(db), "--storage", str(tmp_path / "ray"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not db.exists() and not (tmp_path / "ray").exists()
    import ray

    assert not ray.is_initialized()


def test_dry_run_prints_plan_and_cost_only(tmp_path: Path, capsys) -> None:
    db = tmp_path / "results.duckdb"
    assert main(["grid", "--study", "guide", "--dry-run", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "918 trials" in out and "GPU-hours" in out and "CPU-hours" in out
    assert "lora_rank" in out and "sms_spam" in out
    assert not db.exists()


def test_status_reads_the_database_and_reports_a_held_file(tmp_path: Path, capsys) -> None:
    from analysis.db import ResultsWriter

    db = tmp_path / "results.duckdb"
    writer = ResultsWriter(db)
    writer.start_sweep({"id": "s1", "study": "smoke", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                        "status": "running", "planned_trials": 0})
    writer.close()
    assert main(["status", "--db", str(db)]) == 0
    assert "s1" in capsys.readouterr().out
    holder = subprocess.Popen([PY, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('held', "
                               "flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["status", "--db", str(db)]) == 2
        assert "in use by another process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_resume_and_status_ask_the_database_through_analysis(tmp_path: Path, capsys) -> None:
    """What resume reads (the sweep, its unfinished trials) and writes (reopening it), and the driver's closing
    counts, go through analysis/ (queries.py and ResultsWriter); the trials come back as they were planned."""
    from analysis import queries
    from analysis.db import ResultsWriter, connect, trial_row
    from sweeps.launch import unfinished_trials
    from sweeps.study import load_study, plan

    db = tmp_path / "results.duckdb"
    trials = plan(load_study("smoke"), "s1", tasks=["sms_spam"], dimensions=["method"])[:3]
    writer = ResultsWriter(db)
    for sweep_id, started in (("s0", "2026-01-01 00:00:00"), ("s1", "2026-01-02 00:00:00")):
        writer.start_sweep({"id": sweep_id, "study": "smoke", "kind": "grid", "started_at": started,
                            "status": "running", "planned_trials": 3, "storage_path": str(tmp_path / "ray"),
                            "hardware": {"per_trial": {"cpu": 1.0, "gpu": 0.0}}})
    writer.plan_trials(trial_row(t.as_spec(), "pending") for t in trials)
    writer.write_trial(trial_row(trials[0].as_spec(), "completed"))
    writer.end_sweep("s1", "interrupted")
    writer.reopen_sweep("s1")
    assert writer.trial_counts("s1") == {"completed": 1, "pending": 2}
    writer.close()
    con = connect(db, read_only=True)
    latest, named, missing = (queries.sweep_to_resume(con, s) for s in (None, "s0", "nope"))
    con.close()
    assert latest["id"] == "s1" and latest["status"] == "running" and named["id"] == "s0" and missing is None
    assert json.loads(latest["hardware"])["per_trial"] == {"cpu": 1.0, "gpu": 0.0}
    assert unfinished_trials(db, "s1") == sorted(trials[1:], key=lambda t: t.trial_id)
    assert main(["status", "--db", str(db)]) == 0
    assert "s1" in capsys.readouterr().out


def test_only_the_vanished_ray_temp_file_sync_error_is_hidden() -> None:
    """Ray's upload of the experiment state can race its own temp-file rename (sweeps/launch.py says why that is
    harmless); that one traceback is filtered, every other sync error still shows."""
    import logging

    from sweeps.launch import _not_a_vanished_ray_temp_file as shown

    def record(err: Exception) -> logging.LogRecord:
        try:
            raise err
        except Exception:
            return logging.LogRecord("ray.train._internal.syncer", logging.WARNING, __file__, 1,
                                     "Last sync command failed with the following error:", None, sys.exc_info())

    temp = "/tmp/ray/session_1/artifacts/driver_artifacts/.0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0-tmp-basic-variant-state.json"
    assert not shown(record(FileNotFoundError(2, "No such file or directory", temp)))
    assert shown(record(FileNotFoundError(2, "No such file or directory", "/data/ray/sweep/experiment_state.json")))
    assert shown(record(PermissionError(13, "Permission denied", temp)))


def test_a_reused_worker_reports_each_trials_own_memory(real_data, tmp_path: Path, sessions) -> None:
    """One trial at a time, actors reused (the launcher's setting): full fine-tuning of a wider tiny model runs first,
    then head-only on a narrower one. The second reports less memory; a process-wide peak would report at least the
    first trial's."""
    base = {k: v for k, v in SMOKE.items() if k not in ("dimension_tasks", "task_dimensions")}
    study = {**base, "name": "memory", "tasks": {"sms_spam": {}}, "learning_rates": {"default": [1e-3]},
             "dimensions": {"m": {"big_full": {"method.name": "full", "model.n_embd": 128},
                                  "small_head": {"method.name": "head_only", "model.n_embd": 32}}}}
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    db = tmp_path / "results.duckdb"
    _finish(_launch(sessions, "grid", "--study", str(path), "--db", str(db), "--storage", str(tmp_path / "ray"),
                    "--max-concurrent", "1"))
    con = _db(db)
    rows = con.execute("""SELECT "group", peak_memory_mb, memory_source, memory_account_bytes, optimizer_state_bytes,
                                 trainable_params FROM trials ORDER BY updated_at""").fetchall()
    assert [r[0] for r in rows] == ["big_full", "small_head"]  # the order the grid plans, one at a time
    (_, big_mb, source, big_bytes, big_optim, big_params), (_, small_mb, _, small_bytes, small_optim, small_params) = rows
    assert source == "account" and small_mb < big_mb and small_bytes < big_bytes
    assert big_optim == 8 * big_params and small_optim == 8 * small_params  # AdamW, float32
