"""Issue 16 for the guide: names from the database never lead a file outside --out and stay text in guide.md; an --out
that cannot hold the guide exits 2 before anything is written."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import duckdb
import pytest

from analysis.build_guide import main, md_text
from tests.analysis import synthetic

SCRIPT = "<script>alert(1)</script>"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_hostile_names_in_the_database_stay_inside_out_and_are_text(tmp_path: Path) -> None:
    """A database written by an older version may hold any names: a task named like a path, a group and a study that
    are HTML."""
    db = synthetic.build(tmp_path / "db" / "study.duckdb")
    con = duckdb.connect(str(db))
    con.execute("UPDATE trials SET task = '../../../escaped' WHERE task = 'sms_spam'")
    con.execute(f"UPDATE trials SET \"group\" = '{SCRIPT}' WHERE \"group\" = 'lora'")
    con.execute(f"UPDATE sweeps SET study = '{SCRIPT}'")
    con.close()
    before = _files(tmp_path)
    out = tmp_path / "a" / "b" / "out"
    assert main(["--db", str(db), "--out", str(out)]) == 0
    written = _files(tmp_path) - before
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written), written
    md, html = (out / "guide.md").read_text(), (out / "guide.html").read_text()
    refs = re.findall(r"\]\((figures/[^)]+)\)", md)
    assert refs and all(re.fullmatch(r"figures/[A-Za-z0-9._-]+\.png", r) and ".." not in r for r in refs), refs
    assert any("escaped" in r for r in refs)
    assert "<script" not in md and "&lt;script>alert(1)&lt;/script>" in md
    assert "<script" not in html


def test_md_text_escapes_what_could_open_html_and_nothing_twice() -> None:
    assert md_text("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)>"
    assert md_text("</b><!-- x --><?php") == "&lt;/b>&lt;!-- x -->&lt;?php"
    assert md_text("p < 0.001 & 3 > 2") == "p < 0.001 & 3 > 2"  # no tag can start there: left readable
    assert md_text(md_text(SCRIPT)) == md_text(SCRIPT)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_out_naming_an_existing_file_exits_2_and_leaves_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = synthetic.build(tmp_path / "study.duckdb")
    target = tmp_path / "notes.md"
    target.write_text("mine\n")
    before, db_before = _sha(target), _sha(db)
    assert main(["--db", str(db), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--out {target}: an existing file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert _sha(target) == before and _sha(db) == db_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md", "study.duckdb"]


@pytest.mark.slow
def test_out_below_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = synthetic.build(tmp_path / "study.duckdb")
    (tmp_path / "file").write_text("x")
    assert main(["--db", str(db), "--out", str(tmp_path / "file" / "guide")]) == 2
    assert f"{tmp_path / 'file'} is a file, so the folder cannot be made" in capsys.readouterr().err


@pytest.mark.slow
def test_out_in_a_folder_that_cannot_be_written_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = synthetic.build(tmp_path / "study.duckdb")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable (the next test injects the error)")
        assert main(["--db", str(db), "--out", str(locked / "guide")]) == 2
        assert f"--out {locked / 'guide'}: {locked} is not writable" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.slow
def test_out_that_fails_to_be_written_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only filesystem does (root included): the staging folder cannot be made."""
    db = synthetic.build(tmp_path / "study.duckdb")

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    assert main(["--db", str(db), "--out", str(out)]) == 2
    assert f"--out {out}: cannot write there (Read-only file system)" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unfinished_sweep_is_refused_unless_allow_partial_which_renders_a_banner(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 25: a guide built from an interrupted sweep says so, or is not built (exit 2, nothing written)."""
    db = synthetic.build(tmp_path / "study.duckdb")
    con = duckdb.connect(str(db))
    planned = con.execute("SELECT count(*) FROM trials").fetchone()[0]
    con.execute("UPDATE trials SET status = 'interrupted' WHERE id IN (SELECT id FROM trials ORDER BY id LIMIT 2)")
    con.execute("UPDATE sweeps SET status = 'interrupted'")
    con.close()
    out = tmp_path / "guide"
    assert main(["--db", str(db), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"sweep {synthetic.SWEEP} is interrupted: 2 of its {planned} planned trials did not run" in err
    assert "--allow-partial" in err and not out.exists()
    assert main(["--db", str(db), "--out", str(out), "--allow-partial"]) == 0
    md, html = ((out / name).read_text() for name in ("guide.md", "guide.html"))
    assert md.split("\n## ")[0].count("**Unfinished sweep: these results are partial.**") == 1
    assert f"2 of its {planned} planned trials" in md.split("\n## ")[0]
    assert "Unfinished sweep" in html.split("<h2")[0]
