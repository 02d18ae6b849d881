"""Issue 16: bad input and unsafe names stop sweeps/launch.py with exit code 2 and one line naming the culprit, before
Ray starts or anything is written (no database file, Ray storage or process left behind)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sweeps.launch import main
from tests.conftest import REPO_ROOT

SMOKE = (REPO_ROOT / "sweeps" / "studies" / "smoke.yaml").read_text()


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _refused(args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture,
             db: Path | None = None) -> str:
    """Run ``launch.py`` in-process; assert exit 2, ``expected`` in stderr, nothing written and no Ray started."""
    db = db or tmp_path / "results.duckdb"
    before = _sha(db)
    storage = tmp_path / "ray"
    code = main([*args, "--db", str(db), *(["--storage", str(storage)] if args[0] != "resume" else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert _sha(db) == before and not storage.exists()
    import ray

    assert not ray.is_initialized()  # nothing started: no Ray process to leave behind
    return err


@pytest.mark.parametrize(("args", "expected"), [
    (["--seeds", "a"], "--seeds: 'a' is not an integer >= 0"),
    (["--seeds", "0,1.5"], "--seeds: '1.5' is not an integer"),
    (["--tasks", "preference", "--dimensions", "method"], "--tasks/--dimensions: tasks preference with dimensions "
                                                           "method plan no trial in study smoke"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial: must be a number > 0, got 0"),
    (["--cpus-per-trial", "-1"], "--cpus-per-trial: must be a number > 0, got -1"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial: must be a number >= 0 (0: CPU only), got nan"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial: must be a number >= 0 (0: CPU only), got -1"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial: more than one GPU per trial must be a whole number"),
    (["--max-concurrent", "0"], "--max-concurrent: must be an integer >= 1, got 0"),
    (["--max-failures", "-5"], "--max-failures: must be an integer >= 0, got -5"),
    (["--name", "../../x"], "--name: '../../x' is not a safe name"),
    (["--name", "a/b"], "--name: 'a/b' is not a safe name"),
], ids=["seeds-a", "seeds-float", "empty-selection", "cpus-0", "cpus-negative", "gpus-nan", "gpus-negative",
        "gpus-fraction-above-1", "max-concurrent-0", "max-failures-negative", "name-traversal", "name-slash"])
def test_bad_grid_argument_exits_2_and_starts_nothing(args: list[str], expected: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    _refused(["grid", "--study", "smoke", *args], expected, tmp_path, capsys)


def test_every_bad_argument_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _refused(["grid", "--seeds", "x", "--cpus-per-trial", "0", "--max-failures", "-1", "--name", ".."],
                   "--seeds", tmp_path, capsys)
    assert all(flag in err for flag in ("--cpus-per-trial", "--max-failures", "--name"))


def test_existing_database_is_left_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "results.duckdb"
    db.write_bytes(b"not touched")
    _refused(["grid", "--gpus-per-trial", "-1"], "--gpus-per-trial", tmp_path, capsys, db=db)
    assert db.read_bytes() == b"not touched"


@pytest.mark.parametrize(("args", "expected"), [
    (["--num-samples", "0"], "--num-samples: must be an integer >= 1, got 0"),
    (["--name", "../../x"], "--name: '../../x' is not a safe name"),
    (["--max-concurrent", "0"], "--max-concurrent: must be an integer >= 1"),
])
def test_bad_search_argument_exits_2(args: list[str], expected: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    _refused(["search", "--task", "sms_spam", "--method", "lora", *args], expected, tmp_path, capsys)


def test_resume_refuses_an_unsafe_sweep_id(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _refused(["resume", "--sweep", "../../etc"], "--sweep: '../../etc' is not a safe name", tmp_path, capsys)


@pytest.mark.parametrize("flag", ["--cpus-per-trial", "--gpus-per-trial"])
def test_resume_offers_no_per_trial_resources(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A resumed sweep's trials keep the resources it recorded; resume once took these flags and ignored them."""
    db = tmp_path / "results.duckdb"
    with pytest.raises(SystemExit) as exited:
        main(["resume", flag, "2", "--db", str(db)])
    assert exited.value.code == 2
    assert f"unrecognized arguments: {flag} 2" in capsys.readouterr().err
    assert not db.exists()


def _study(tmp_path: Path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return str(path)


def test_unreadable_study_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study(tmp_path, SMOKE)
    os.chmod(study, 0)
    if os.access(study, os.R_OK):  # root reads it anyway: inject the failure the permission would cause
        real = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self == Path(study):
                raise PermissionError(13, "Permission denied", study)
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    _refused(["grid", "--study", study], f"{study}: cannot be read (Permission denied)", tmp_path, capsys)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s.replace("dimensions:\n", "dimensions:\n  method:\n    full: {method.name: full}\ndimensions:\n", 1),
     "duplicate key 'dimensions'"),
    (lambda s: s.replace("  model.n_layer: 2\n", "  model.n_layer: 2\n  model.n_layer: 3\n"),
     "duplicate key 'model.n_layer'"),
    (lambda s: s.replace("    full: {method.name: full}\n", "    full: {method.name: full}\n    full: {}\n", 1),
     "duplicate key 'full'"),
], ids=["dimensions-twice", "base-key-twice", "group-twice"])
def test_duplicate_key_in_study_exits_2_naming_file_and_line(edit, expected: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    study = _study(tmp_path, edit(SMOKE))
    err = _refused(["grid", "--study", study], expected, tmp_path, capsys)
    assert f"{study}:" in err


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s.replace("name: smoke", "name: ../../../tmp/x"), "name: '../../../tmp/x' is not a safe name"),
    (lambda s: s.replace("  lora_rank:\n", "  ../../../tmp/x:\n"), "dimensions.../../../tmp/x: '../../../tmp/x'"),
    (lambda s: s.replace("    r1: {", "    '<script>': {"), "'<script>' is not a safe name"),
], ids=["study-name", "dimension-name", "group-name"])
def test_unsafe_study_names_exit_2(edit, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _refused(["grid", "--study", _study(tmp_path, edit(SMOKE))], expected, tmp_path, capsys)


def test_max_length_beyond_the_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _refused(["grid", "--study", "smoke", "--set", "task.max_length=4096"],
             "task.max_length: 4096 exceeds the model's 1024 positions", tmp_path, capsys)


def test_data_file_with_a_bad_byte_exits_2_naming_file_and_line(data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the data directory's SMS file with one invalid UTF-8 byte on line 10 (FINETUNE_DATA_DIR points at
    it): the driver's data check refuses it before Ray starts."""
    root = tmp_path / "data"
    (root / "sms_spam").mkdir(parents=True)
    (root / "gpt2-bpe").symlink_to(data_dir / "gpt2-bpe")
    lines = (data_dir / "sms_spam" / "SMSSpamCollection").read_bytes().split(b"\n")
    lines[9] += b"\xff"
    (root / "sms_spam" / "SMSSpamCollection").write_bytes(b"\n".join(lines))
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(root))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    db, bad = tmp_path / "results.duckdb", root / "sms_spam" / "SMSSpamCollection"
    code = main(["grid", "--study", "smoke", "--tasks", "sms_spam", "--dimensions", "method", "--gpus-per-trial", "0",
                 "--db", str(db), "--storage", str(tmp_path / "ray")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:10: not valid UTF-8" in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    import ray

    assert not ray.is_initialized() and not (tmp_path / "ray").exists()
    assert not db.exists()  # the data is checked before the database is created
