"""analysis/judge.py against a local OpenAI-compatible server (tests/analysis/judge_server.py), through the real
``openai`` client."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from analysis import judge
from analysis.db import connect
from tests.analysis.judge_server import GARBLED, Behaviour, JudgeServer, expected_choice, expected_score

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Below is an instruction.\n\n### Instruction:\nName {topic}.\n\n### Response:\n"
TOPICS = ["three primary colours", "a large planet", "the capital of France", "two noble gases"]
REFERENCES = ["red yellow blue", "Jupiter is a large planet", "Paris", "helium and neon"]


def add_trial(path: Path, trial: str, responses: list[str], start: list[str] | None = None,
              sweep: str = "s1", status: str = "completed") -> None:
    """A trial row and its generations (``start``: the starting weights' generations, as DPO keeps)."""
    con = connect(path)
    con.execute("INSERT OR IGNORE INTO sweeps (id, study, kind, started_at, status, planned_trials) "
                "VALUES (?, 'smoke', 'grid', now(), 'completed', 1)", [sweep])
    con.execute("INSERT INTO trials (id, sweep_id, study, dimension, \"group\", task, method, model, seed, status, "
                "config, updated_at) VALUES (?, ?, 'smoke', 'method', ?, 'alpaca', 'full', 'gpt2', 0, ?, '{}', now())",
                [trial, sweep, trial, status])
    stages = [("final", responses)] + ([("start", start)] if start is not None else [])
    for stage, texts in stages:
        for i, text in enumerate(texts):
            con.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?)",
                        [trial, stage, i, PROMPT.format(topic=TOPICS[i]), REFERENCES[i], text])
    con.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "results.duckdb"
    add_trial(path, "t1", ["red and blue", "Jupiter", "Berlin", "helium neon argon"])
    add_trial(path, "t2", ["blue", "a large planet is Saturn", "Paris France", "none"])
    return path


def run_judge(db: Path, server: JudgeServer | None, *extra: str, model: str = "judge-1") -> int:
    endpoint = server.url if server is not None else "http://127.0.0.1:9/v1"
    return judge.main(["--db", str(db), "--endpoint", endpoint, "--model", model, "--retries", "2", *extra])


def rows(db: Path, where: str = "TRUE") -> list[dict]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(f"SELECT * FROM judgments WHERE {where} ORDER BY trial_id, example, mode, position")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def generations(db: Path) -> dict[tuple[str, int], tuple[str, str, str]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        data = con.execute("SELECT trial_id, example, prompt, reference, response FROM generations "
                           "WHERE stage = 'final'").fetchall()
    finally:
        con.close()
    return {(t, e): (p, r, g) for t, e, p, r, g in data}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Parsing the judge's replies
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "value"), [("85", 85.0), ("Score: 70", 70.0), ("90/100", 90.0), (" 0\n", 0.0),
                                              ("100.", 100.0), ("seven", None), ("150", None), ("-5", None),
                                              ("", None), (None, None)])
def test_parse_score(reply: str | None, value: float | None) -> None:
    assert judge.parse_score(reply) == value


@pytest.mark.parametrize(("reply", "letter"), [("A", "A"), ("B.", "B"), ("**B**", "B"), ("Response A is better", "A"),
                                               ('"A"', "A"), ("Both are good", None), ("a better one", None),
                                               ("AB", None), ("I prefer B", None), ("", None)])
def test_parse_choice(reply: str, letter: str | None) -> None:
    assert judge.parse_choice(reply) == letter


# --------------------------------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------------------------------


def test_scores_and_verdicts_are_what_the_server_computed(db: Path, capsys: pytest.CaptureFixture) -> None:
    os.environ["OPENAI_API_KEY"] = "sk-test-secret-7"
    try:
        with JudgeServer() as server:
            assert run_judge(db, server, "--max-concurrency", "3") == 0
    finally:
        del os.environ["OPENAI_API_KEY"]
    gens = generations(db)
    got = rows(db)
    assert len(got) == 8 * 3  # 8 generations: one score, two pairwise orders each
    for row in got:
        prompt, reference, response = gens[row["trial_id"], row["example"]]
        assert row["parse_status"] == "ok" and row["judge_model"] == "judge-1" and not row["cached"]
        assert row["rubric_version"] == judge.RUBRIC_VERSION
        assert row["prompt_tokens"] > 0 and row["latency_s"] > 0
        if row["mode"] == "score":
            assert row["score"] == expected_score(reference, response)
        else:
            first, second = (response, reference) if row["position"] == "first" else (reference, response)
            letter = expected_choice(prompt, first, second)
            assert row["opponent"] == "reference"
            assert row["preferred"] == ("response" if (letter == "A") == (row["position"] == "first") else "opponent")
    assert {r["authorization"] for r in server.behaviour.requests} == {"Bearer sk-test-secret-7"}
    assert len(server.behaviour.requests) == 24
    # the key is used, never stored or printed
    assert b"sk-test-secret-7" not in db.read_bytes()
    out = capsys.readouterr()
    assert "sk-test-secret-7" not in out.out + out.err
    assert "24 ok, 0 unparsed, 0 failed" in out.out


def test_a_judge_that_always_prefers_the_first_position_gives_no_verdict(db: Path) -> None:
    with JudgeServer(Behaviour(bias="first")) as server:
        assert run_judge(db, server, "--mode", "pairwise") == 0
    got = rows(db)
    assert {r["mode"] for r in got} == {"pairwise"}
    by_pair: dict[tuple[str, int], set[str]] = {}
    for r in got:
        assert r["preferred"] == ("response" if r["position"] == "first" else "opponent")
        by_pair.setdefault((r["trial_id"], r["example"]), set()).add(r["preferred"])
    assert all(len(v) == 2 for v in by_pair.values())  # the two orders always disagree: a tie everywhere


def test_dpo_trials_are_compared_with_their_starting_model(tmp_path: Path) -> None:
    path = tmp_path / "dpo.duckdb"
    add_trial(path, "dpo", ["red yellow blue", "Mars"], start=["green", "Jupiter"])
    with JudgeServer() as server:
        assert run_judge(path, server, "--mode", "pairwise") == 0
        contents = [r["content"] for r in server.behaviour.requests]
    got = rows(path)
    assert {r["opponent"] for r in got} == {"start"}
    assert len(got) == 4
    assert any("<response_B>\ngreen\n</response_B>" in c for c in contents)
    assert not any("red yellow blue\n</response_B>" in c and "<response_A>\nred yellow blue" in c for c in contents)


def test_faults_are_retried_recorded_and_asked_again(db: Path) -> None:
    # t1's first prompt (three primary colours): one 429 then fine; second (a large planet): 500 every time;
    # third (France): slower than the timeout; fourth (noble gases): a garbled reply once
    faults = {"three primary colours": ["429"], "a large planet": ["500"] * 9, "capital of France": ["slow"] * 9,
              "two noble gases": ["garbled"]}
    behaviour = Behaviour(faults=faults, slow_seconds=1.5)
    with JudgeServer(behaviour) as server:
        code = run_judge(db, server, "--mode", "score", "--timeout", "0.5", "--retries", "1",
                         "--max-concurrency", "4")
        assert code == 1
        got = {(r["trial_id"], r["example"]): r for r in rows(db)}
        assert got["t1", 0]["parse_status"] == "ok"  # the 429 was retried
        colours = [r for r in server.behaviour.requests if "three primary colours" in r["content"]]
        assert len(colours) == 3  # t1 and t2 (one of them first got the 429): three requests in all
        for trial in ("t1", "t2"):
            assert got[trial, 1]["parse_status"] == "failed" and "500" in got[trial, 1]["error"]
            assert got[trial, 2]["parse_status"] == "failed" and "no reply within" in got[trial, 2]["error"]
        garbled = [r for r in got.values() if r["parse_status"] == "unparsed"]
        assert len(garbled) == 1 and garbled[0]["raw_reply"] == GARBLED and garbled[0]["score"] is None
        # the next run asks only the failed ones again; the unparsed reply stays what the judge said
        behaviour.faults.clear()
        asked_before = behaviour.chat_count()
        assert run_judge(db, server, "--mode", "score") == 0
        assert behaviour.chat_count() - asked_before == 4
    final = rows(db)
    assert len(final) == 8
    assert sorted(r["parse_status"] for r in final) == ["ok"] * 7 + ["unparsed"]


def test_cache_asks_only_what_is_new(db: Path) -> None:
    with JudgeServer() as server:
        assert run_judge(db, server) == 0
        first = server.behaviour.chat_count()
        assert run_judge(db, server) == 0  # nothing new
        assert server.behaviour.chat_count() == first
        # the sweep grows: one trial answers exactly like t1, one says something new on its first prompt
        add_trial(db, "t3", ["red and blue", "Jupiter", "Berlin", "helium neon argon"])
        add_trial(db, "t4", ["orange", "Jupiter", "Berlin", "helium neon argon"])
        assert run_judge(db, server) == 0
        assert server.behaviour.chat_count() - first == 3  # t4's first prompt: one score, two orders
    got = rows(db, "trial_id IN ('t3', 't4')")
    assert len(got) == 24
    assert sum(not r["cached"] for r in got) == 3
    assert all(r["prompt_tokens"] is None for r in got if r["cached"])
    t1 = {(r["example"], r["mode"], r["position"]): r["raw_reply"] for r in rows(db, "trial_id = 't1'")}
    t3 = {(r["example"], r["mode"], r["position"]): r["raw_reply"] for r in rows(db, "trial_id = 't3'")}
    assert t1 == t3


def test_identical_requests_in_one_run_are_asked_once(tmp_path: Path) -> None:
    path = tmp_path / "same.duckdb"
    add_trial(path, "a", ["red", "Mars"])
    add_trial(path, "b", ["red", "Mars"])
    with JudgeServer() as server:
        assert run_judge(path, server, "--mode", "score") == 0
        assert server.behaviour.chat_count() == 2
    assert sorted(r["cached"] for r in rows(path)) == [False, False, True, True]


def test_limit_and_sweep_select_what_is_judged(db: Path) -> None:
    add_trial(db, "other", ["x", "y"], sweep="s2")
    with JudgeServer() as server:
        assert run_judge(db, server, "--mode", "score", "--limit", "2", "--sweep", "s1") == 0
    got = rows(db)
    assert {(r["trial_id"], r["example"]) for r in got} == {(t, e) for t in ("t1", "t2") for e in (0, 1)}


def test_killed_mid_run_resumes_with_every_judgment_once(db: Path) -> None:
    behaviour = Behaviour(hang_after=5)
    with JudgeServer(behaviour) as server:
        cmd = [sys.executable, str(ROOT / "analysis" / "judge.py"), "--db", str(db), "--endpoint", server.url,
               "--model", "judge-1", "--max-concurrency", "1", "--mode", "both"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while behaviour.chat_count() < 6:  # five answered, the sixth held: five rows are written
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the judge never reached the sixth request"
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
        assert len(rows(db)) == 5
        behaviour.hang_after = None
        before = behaviour.chat_count()
        assert run_judge(db, server) == 0
        assert behaviour.chat_count() - before == 24 - 5  # only the rest was asked (the held one again)
    got = rows(db)
    keys = [(r["trial_id"], r["example"], r["mode"], r["position"]) for r in got]
    assert len(keys) == len(set(keys)) == 24
    assert all(r["parse_status"] == "ok" for r in got)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_exits_2_and_writes_nothing(db: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(db)
    code = judge.main(["--db", str(db), "--endpoint", f"http://127.0.0.1:{_closed_port()}/v1", "--model", "judge-1",
                       "--timeout", "2"])
    assert code == 2
    assert "cannot reach the judge endpoint" in capsys.readouterr().err
    assert digest(db) == before


def test_unknown_model_exits_2_and_writes_nothing(db: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(db)
    with JudgeServer() as server:
        assert run_judge(db, server, model="no-such-model") == 2
        assert server.behaviour.chat_count() == 0
    err = capsys.readouterr().err
    assert "'no-such-model'" in err and "judge-1" in err
    assert digest(db) == before


def test_dry_run_counts_and_sends_nothing(db: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(db)
    assert judge.main(["--db", str(db), "--model", "judge-1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 generations of 2 trials" in out
    assert "score: 8 requests (rubric v1): 0 already judged, 0 from the cache, 8 to ask" in out
    assert "pairwise: 16 requests" in out and "would ask 24 distinct requests" in out
    assert digest(db) == before


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--max-concurrency", "0"], ["--timeout", "-1"],
                                  ["--mode", "vibes"], []])
def test_bad_arguments_exit_2(db: Path, argv: list[str]) -> None:
    endpoint = [] if argv == [] else ["--endpoint", "http://127.0.0.1:9/v1"]
    with pytest.raises(SystemExit) as exit_:
        judge.main(["--db", str(db), "--model", "m", *endpoint, *argv])
    assert exit_.value.code == 2


def test_missing_database_and_unknown_sweep_exit_2(tmp_path: Path, db: Path, capsys: pytest.CaptureFixture) -> None:
    assert judge.main(["--db", str(tmp_path / "none.duckdb"), "--model", "m", "--dry-run"]) == 2
    assert judge.main(["--db", str(db), "--model", "m", "--dry-run", "--sweep", "nope"]) == 2
    assert "no such sweep" in capsys.readouterr().err
