"""The comparisons on real runs: a random-init SMS spam study through Ray Tune, DuckDB and the guide, where two groups
train identically (they differ only in ``train.log_every``) over 5 seeds, and full fine-tuning meets head-only."""

from __future__ import annotations

import sys
from pathlib import Path

import duckdb

from analysis.db import connect
from analysis.guide import collect
from tests.analysis.test_guide import _paired

STUDY = Path(__file__).with_name("sms_calibration.yaml")
SAME = ("full_log1", "full_log8")


def test_identical_groups_claim_nothing_and_full_beats_head_only(real_data, tmp_path: Path, sessions) -> None:
    db = tmp_path / "calibration.duckdb"
    proc = sessions.launch([sys.executable, "sweeps/launch.py"], ("grid", "--study", str(STUDY), "--db", str(db),
                                                                  "--storage", str(tmp_path / "ray")))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT status, count(*) FROM trials GROUP BY ALL").fetchall() == [("completed", 15)]
    # the two groups really trained identically: the same test outcome on every example of every seed
    differing = con.execute("""
        SELECT count(*) FROM trials a JOIN predictions pa ON pa.trial_id = a.id
        JOIN trials b ON b.seed = a.seed AND b."group" = 'full_log8'
        JOIN predictions pb ON pb.trial_id = b.id AND pb.split = pa.split AND pb.example = pa.example
        WHERE a."group" = 'full_log1' AND pa.prediction <> pb.prediction""").fetchone()[0]
    assert differing == 0

    findings = collect(connect(db, read_only=True)).findings
    between_same = [f for f in findings if {f.a, f.b} == set(SAME)]
    assert between_same and all(f.kind != "beats" for f in between_same)
    # full against head-only: what the data supports, recomputed from the predictions table by hand
    diff, low, _high = _paired(con, "sms_spam", "full_log1", "head_only")
    assert low > 0, "the study should show full fine-tuning ahead of head-only"
    versus_head = {f.a: f for f in findings if f.b == "head_only"}
    assert {f.kind for f in versus_head.values()} == {"beats"} and set(versus_head) == set(SAME)
    assert f"by {diff:.1f} accuracy points" in versus_head["full_log1"].text
    assert not [f for f in findings if f.kind == "beats" and f.a == "head_only"]
