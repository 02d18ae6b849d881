"""Sweeps on Ray Tune into DuckDB: the smoke study end to end, a two-node cluster, a killed driver resumed, retries
and divergence, and bad input refused before anything starts. Every Ray process a test starts is ended by session."""

from __future__ import annotations

import io
import json
import os
import queue
import re
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
from tests.sweeps.sessions import NODE_IP, Sessions, start_cluster

PY = sys.executable
SMOKE = yaml.safe_load((REPO_ROOT / "sweeps" / "studies" / "smoke.yaml").read_text())


def _launch(sessions: Sessions, *args: str, env: dict | None = None, own_ray: bool = False):
    """``sweeps/launch.py`` in a session of its own, on the session's shared Ray cluster unless ``own_ray``."""
    return sessions.launch([PY, "sweeps/launch.py"], args, env=env, own_ray=own_ray)


def _finish(proc, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _db(path: Path):
    return duckdb.connect(str(path), read_only=True)


def test_smoke_study_end_to_end(real_data, tmp_path: Path, sessions) -> None:
    from sweeps.study import load_study, plan, planned_memberships

    db = tmp_path / "results.duckdb"
    # the data folder relative to the launcher's working directory, as CI names it (../shared/data): its trials run in
    # a working directory of Ray's, so the launcher hands them the absolute path
    relative = {"FINETUNE_DATA_DIR": os.path.relpath(real_data, REPO_ROOT)}
    out = _finish(_launch(sessions, "grid", "--study", "smoke", "--db", str(db), "--storage", str(tmp_path / "ray"),
                          env=relative))
    con = _db(db)
    planned = con.execute("SELECT planned_trials, status, git_commit, package_versions->>'$.torch' FROM sweeps"
                          ).fetchone()
    # a configuration several groups ask for (reference groups repeat across dimensions) is run once
    study = load_study("smoke")
    trials = plan(study, "x")
    n = len(trials)
    assert (n, planned_memberships(trials), len(study.dimensions)) == (97, 127, 14)  # sweeps/studies/smoke.yaml
    assert planned[0] == n and planned[1] == "completed" and planned[2] and planned[3]
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM trials").fetchone() == (n, n)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY status").fetchall() == [("completed", n)]
    assert con.execute("SELECT count(*) FROM trial_groups").fetchone()[0] == planned_memberships(trials) > n
    assert con.execute("SELECT count(DISTINCT task) FROM trials").fetchone()[0] == 5
    assert con.execute("SELECT count(DISTINCT dimension) FROM trial_groups").fetchone()[0] == len(study.dimensions)
    assert con.execute("SELECT count(*) FROM trials WHERE test_primary IS NULL OR trainable_params IS NULL"
                       ).fetchone()[0] == 0
    # baselines: every trial scored its untrained model on test; only tasks with class labels have a majority class
    assert con.execute("""SELECT count(*) FROM trials WHERE baseline_step0 IS NULL
                          OR (baseline_majority IS NULL) <> (task IN ('alpaca', 'preference'))""").fetchone()[0] == 0
    # learning curves: one train loss per step (max_steps 3, log_every 1) and final validation/test values
    per_trial = con.execute("""SELECT trial_id, count(*) FILTER (WHERE split = 'train' AND name = 'loss'),
                                      count(*) FILTER (WHERE split = 'test') FROM metrics GROUP BY trial_id""").fetchall()
    assert len(per_trial) == n and all(r[1] == 3 and r[2] >= 2 for r in per_trial)
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
                  "## LoRA alpha and rsLoRA", "## LoRA dropout", "## How much labelled data", "## Model size",
                  "## Batch size", "## Generations side by side", "### Alpaca (instruction tuning)"):
        assert title in md
    assert "Every selected trial completed." in md
    assert "## DPO preference tuning: method and β" in md and "### Preference pairs (DPO)" in md
    # no judgments yet: no judged section; once a judge (a local OpenAI-compatible server) has read the kept
    # generations, the guide has it, for instruction tuning (against the reference) and DPO (against its start)
    assert "## Judged quality" not in md
    from tests.analysis.judge_server import Behaviour, JudgeServer

    with JudgeServer(Behaviour(models=("judge-1", "judge-first"), first_models=("judge-first",))) as server:
        for judge, mode in (("judge-1", "both"), ("judge-first", "pairwise")):  # judge-first: pure position bias
            run = subprocess.run([PY, "analysis/judge.py", "--db", str(db), "--endpoint", server.url, "--model",
                                  judge, "--mode", mode, "--limit", "2", "--max-concurrency", "8"],
                                 cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stdout + run.stderr
    con = _db(db)
    judged = dict(con.execute("SELECT opponent, count(*) FROM judgments WHERE mode = 'pairwise' GROUP BY ALL"
                              ).fetchall())
    con.close()
    assert set(judged) == {"reference", "start"}
    run = subprocess.run([PY, "analysis/build_guide.py", "--db", str(db), "--out", str(tmp_path / "guide")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    judged_md = (tmp_path / "guide" / "guide.md").read_text().split("## Judged quality")[1]
    assert "### Alpaca (instruction tuning): judged by judge-1" in judged_md
    assert "### Preference pairs (DPO): judged by judge-1" in judged_md
    biased = judged_md.split("### Alpaca (instruction tuning): judged by judge-first")[1].split("\n### ")[0]
    assert "Swapping the order of the two answers changed the verdict on 100% of the compared pairs" in biased
    assert "0 / 2 / 0 | 100% (2 of 2)" in biased  # every group: two prompts, both ties


def _launch_wrapped(sessions: Sessions, *args: str, env: dict | None = None, own_ray: bool = False):
    """``sweeps/launch.py`` through the test-only wrapper trainable (tests/sweeps/wrapped_launch.py): fault injection
    and the start barrier, switched on by the FINETUNE_TEST_* variables in ``env``."""
    return sessions.launch([PY, "-m", "tests.sweeps.wrapped_launch"], args, env=env, own_ray=own_ray)


def test_two_node_cluster_runs_trials_on_both_nodes(real_data, tmp_path: Path, sessions) -> None:
    """Each node offers 1 CPU and each trial takes 1, so two trials running at once are on different nodes. The test
    barrier holds the first trial until a second one runs beside it: both nodes are needed whatever the machine's load
    (left to the scheduler, all ten trials could run one after another on one node)."""
    address, token = start_cluster(sessions, nodes=2, cpus_per_node=1)  # this test's own, ended with it
    env = {**os.environ, **token}
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
    # Ray of its own, as `make demo` has: the kill takes the driver's Ray with it
    driver = _launch(sessions, "grid", "--study", "smoke", "--dimensions", "method,lora_rank,optimizer",
                     "--db", str(db), "--storage", str(storage), own_ray=True)
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
    assert 6 <= len(before) < planned == 44  # (5 methods + 2 new ranks) x 4 tasks + 4 optimizers x 2 lr x 2 tasks

    _finish(_launch(sessions, "resume", "--db", str(db)))  # on another Ray: the session's shared cluster
    con = _db(db)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 44)]
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"
    after = dict(con.execute("SELECT id, updated_at FROM trials").fetchall())
    assert all(after[t] == when for t, when in before.items()), "a finished trial was run again"
    losses = con.execute("""SELECT trial_id, count(*), count(DISTINCT step) FROM metrics
                            WHERE split = 'train' AND name = 'loss' GROUP BY trial_id""").fetchall()
    assert len(losses) == 44 and all(n == distinct == 3 for _, n, distinct in losses)


@pytest.mark.parametrize("torn", ["experiment_state", "tuner"])
def test_resume_when_rays_experiment_state_is_torn(torn: str, real_data, tmp_path: Path, sessions) -> None:
    """Ray writes its state file in place; a driver killed mid-write leaves it empty (or a full disk cuts its saved
    tuner short). The database still knows which trials finished, and resume runs the rest."""
    db, storage = tmp_path / "results.duckdb", tmp_path / "ray"
    # killed with the Ray it started, after its first trial; one trial at a time (one Ray worker to start, not two)
    driver = _launch(sessions, "grid", "--study", "smoke", "--tasks", "sms_spam", "--dimensions", "method,lora_rank",
                     "--db", str(db), "--storage", str(storage), "--max-concurrent", "1", own_ray=True)
    for line in driver.stdout:
        if line.startswith("trial "):
            break
    sessions.end(driver)
    if torn == "experiment_state":
        states = list(storage.glob("*/experiment_state*.json"))
        assert states
        for state in states:
            state.write_text("")
    else:
        [tuner] = storage.glob("*/tuner.pkl")
        tuner.write_bytes(tuner.read_bytes()[: tuner.stat().st_size // 2])
    out = _finish(_launch(sessions, "resume", "--db", str(db)))
    assert "unreadable" in out
    con = _db(db)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 7)]
    assert con.execute("SELECT status FROM sweeps").fetchone()[0] == "completed"


def test_failed_trial_retries_from_checkpoint_and_diverged_one_is_recorded(real_data, tmp_path: Path,
                                                                            sessions) -> None:
    base = {k: v for k, v in SMOKE.items() if k not in ("dimension_tasks", "task_dimensions")}
    base["base"] = {**base["base"], "schedule.warmup_steps": 0}  # boom must blow up at its first steps, not warm up
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


def test_dry_run_prints_plan_and_cost_only(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a preflight report at the default path would change the estimate
    from sweeps.study import config_key, duplicates_removed, load_study, plan, planned_memberships

    db = tmp_path / "results.duckdb"
    assert main(["grid", "--study", "guide", "--dry-run", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    study = load_study("guide")
    trials = plan(study, "g")
    assert len({config_key(t.config) for t in trials}) == len(trials)  # no duplicates among planned trials
    assert (f"{len(trials):,} distinct trials planned from {planned_memberships(trials):,} (trial, group) "
            f"memberships; {duplicates_removed(trials):,} duplicate configurations removed") in out
    # per dimension: a shared trial counts in each dimension it serves; the total counts it once
    numbers = r"\s+([\d,]+)\s+([\d,]+)\s+[\d.,]+$"
    shown = {m[1]: (int(m[2].replace(",", "")), int(m[3].replace(",", "")))
             for m in re.finditer(r"^(\S+)" + numbers, out, re.M)}
    assert shown == {dim: (sum(dim in dict(t.memberships) for t in trials),
                           sum(dim in dict(t.memberships) and len(dict(t.memberships)) > 1 for t in trials))
                     for dim in study.dimensions}
    assert re.search(rf"^distinct total\s+{len(trials):,}\s+[\d.,]+$", out, re.M)
    assert re.search(r"Estimated cost: [\d.,]+ GPU-hours \(training [\d.,]+, evaluation [\d.,]+, setup [\d.,]+\)", out)
    assert "CPU-hours" in out and f"Rates: assumed for {len(trials):,} planned trials" in out
    assert f"no database at {db}" in out
    shared = next(t for t in trials if len(t.memberships) > 1)
    (dim, group), (other_dim, other_group) = shared.memberships[:2]
    assert re.search(rf"^{shared.config['task.name']}\s+{dim}\s+{group}\s.*\s{other_dim}/{other_group}\b", out, re.M)
    assert not db.exists()


@pytest.mark.slow
def test_dry_run_writes_the_plan_as_csv_and_json(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a preflight report at the default path would change the estimate
    from sweeps.dry_run import read_plan_csv
    from sweeps.study import duplicates_removed, load_study, plan, planned_memberships

    db = tmp_path / "results.duckdb"
    trials = plan(load_study("guide"), "g1")
    dry = ["grid", "--study", "guide", "--dry-run", "--name", "g1", "--db", str(db)]
    assert main([*dry, "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert read_plan_csv(io.StringIO(out)) == trials
    assert f"{len(trials):,} distinct trials" in err  # the summary goes to stderr, stdout is the plan alone
    assert main([*dry, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["trials"], data["memberships"], data["duplicates_removed"]) == (
        len(trials), planned_memberships(trials), duplicates_removed(trials))
    assert [r["trial_id"] for r in data["plan"]] == [t.trial_id for t in trials]
    assert [r["memberships"] for r in data["plan"]] == [[list(m) for m in t.memberships] for t in trials]
    assert sum(r["estimated_seconds"] for r in data["plan"]) / 3600 == pytest.approx(data["hours"], rel=1e-3)
    assert data["unit"] == "GPU-hours"
    assert main(["grid", "--study", "guide", "--format", "csv", "--db", str(db)]) == 2
    assert "--format: csv writes a plan; it needs --dry-run" in capsys.readouterr().err
    assert not db.exists()


SHARED_STUDY = "tests/sweeps/shared_study.yaml"


def _measured_db(path: Path) -> Path:
    """The shared study's full fine-tuning trials, completed at 1,000 training tokens/s, with 20 s of evaluation and
    5 s of setup each (on a GPU)."""
    from analysis.db import ResultsWriter, trial_row
    from sweeps.study import load_study, plan

    writer = ResultsWriter(path)
    writer.start_sweep({"id": "m", "study": "shared", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                        "status": "completed", "planned_trials": 2})
    for trial in plan(load_study(str(REPO_ROOT / SHARED_STUDY)), "m"):
        if trial.config["method.name"] == "full":
            writer.write_trial(trial_row(trial.as_spec(), "completed", {
                "tokens_seen": 50_000, "train_seconds": 50.0, "tokens_per_s": 1000.0, "eval_seconds": 20.0,
                "setup_seconds": 5.0, "result": {"device": "cuda:0"}}))
    writer.close()
    return path


def test_dry_run_uses_measured_rates_where_the_database_has_them(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a preflight report at the default path would change the estimate
    from sweeps.costs import estimate_eval_tokens, estimate_tokens
    from sweeps.study import load_study, plan

    db = _measured_db(tmp_path / "measured.duckdb")
    trials = plan(load_study(str(REPO_ROOT / SHARED_STUDY)), "g1")
    full = [t for t in trials if t.config["method.name"] == "full"]
    assert len(full) == 2 and len(trials) == 3
    dry = ["grid", "--study", str(REPO_ROOT / SHARED_STUDY), "--dry-run", "--name", "g1"]
    assert main([*dry, "--db", str(tmp_path / "none.duckdb"), "--format", "json"]) == 0
    assumed = {r["trial_id"]: r["estimated_seconds"] for r in json.loads(capsys.readouterr().out)["plan"]}
    assert main([*dry, "--db", str(db), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    measured = {r["trial_id"]: r["estimated_seconds"] for r in data["plan"]}
    assert data["rates"].startswith(f"Rates: measured from 2 trials in {db} (gpt2 n_layer=2 n_embd=32/full; ran on "
                                    "cuda:0) for 2 planned trials")
    assert "; assumed for 1 planned trials (FLOP-based" in data["rates"]
    # the measured evaluation rate: the recorded trials' evaluation tokens (as the estimate counts them) per second
    eval_rate = sum(estimate_eval_tokens(t.config) for t in full) / 40.0
    for trial in trials:
        if trial in full:
            expected = estimate_tokens(trial.config) / 1000 + estimate_eval_tokens(trial.config) / eval_rate + 5
            assert measured[trial.trial_id] == pytest.approx(expected, abs=0.1)
            assert measured[trial.trial_id] != pytest.approx(assumed[trial.trial_id], rel=0.01)
        else:
            assert measured[trial.trial_id] == assumed[trial.trial_id]
    assert main([*dry, "--db", str(db)]) == 0
    assert "Rates: measured from 2 trials in" in capsys.readouterr().out


def test_a_configuration_two_dimensions_share_trains_once_and_is_in_both(real_data, tmp_path: Path,
                                                                          sessions) -> None:
    """tests/sweeps/shared_study.yaml: method/full is optimizer/adamw. One trials row, two memberships, and the
    guide's views show it in both dimensions with the same numbers."""
    from analysis import queries
    from analysis.db import connect

    db = tmp_path / "results.duckdb"
    out = _finish(_launch(sessions, "grid", "--study", SHARED_STUDY, "--db", str(db),
                          "--storage", str(tmp_path / "ray")))
    assert "3 trials (1 duplicate configurations shared, not trained twice)" in out
    con = connect(db, read_only=True)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 3)]
    shared = con.execute("SELECT id FROM trials WHERE method = 'full' AND optim_name = 'adamw'").fetchall()
    assert len(shared) == 1 and shared[0][0].startswith("method-full-")
    assert con.execute("SELECT dimension, \"group\" FROM trial_groups WHERE trial_id = ? ORDER BY dimension",
                       [shared[0][0]]).fetchall() == [("method", "full"), ("optimizer", "adamw")]
    queries.select_sweeps(con, [con.execute("SELECT id FROM sweeps").fetchone()[0]])
    rows = con.execute("SELECT dimension, \"group\", id, test_primary FROM guide_trials ORDER BY ALL").fetchall()
    assert [r[:2] for r in rows] == [("method", "full"), ("method", "head_only"), ("optimizer", "adamw"),
                                     ("optimizer", "sgd")]
    assert rows[0][2:] == rows[2][2:] and rows[0][2] == shared[0][0]
    con.close()


def test_status_reads_the_database_and_reports_a_held_file(tmp_path: Path, capsys) -> None:
    from analysis.db import ResultsWriter

    db = tmp_path / "results.duckdb"
    writer = ResultsWriter(db)
    writer.start_sweep({"id": "s1", "study": "smoke", "kind": "grid", "started_at": "2026-01-01 00:00:00",
                        "status": "running", "planned_trials": 0})
    writer.close()
    assert main(["status", "--db", str(db)]) == 4  # marked running, and no driver holds the file: unfinished
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
    from sweeps.resume import open_trials
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
    con = connect(db, read_only=True)
    assert open_trials(con, "s1") == sorted(trials[1:], key=lambda t: t.trial_id)
    con.close()
    assert main(["status", "--db", str(db)]) == 4  # both sweeps are marked running and no driver holds the file
    assert "s1" in capsys.readouterr().out


def test_only_the_vanished_ray_temp_file_sync_error_is_hidden() -> None:
    """Ray's upload of the experiment state can race its own temp-file rename (sweeps/launch.py says why that is
    harmless); that one traceback is filtered, every other sync error still shows."""
    import logging

    from sweeps.cluster import _not_a_vanished_ray_temp_file as shown

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
