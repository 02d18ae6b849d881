"""Which study file ``--study`` means: a shipped study's name wins over whatever the working directory holds, and a
path has to look like one (issue 11: ``--study guide`` next to a rendered guide folder named ``guide``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from model import ConfigError
from sweeps.launch import main
from sweeps.study import STUDIES_DIR, load_study, resolve_study_path


@pytest.fixture
def cwd_with_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding folders named like shipped studies (a guide rendered with ``--out guide``)."""
    for name in ("guide", "smoke"):
        (tmp_path / name).mkdir()
    (tmp_path / "guide" / "guide.md").write_text("# a rendered guide\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["guide", "smoke"])
def test_shipped_name_wins_over_a_folder_of_the_same_name(cwd_with_folders: Path, name: str) -> None:
    assert resolve_study_path(name) == STUDIES_DIR / f"{name}.yaml"
    study = load_study(name)
    assert study.name == name and study.path == STUDIES_DIR / f"{name}.yaml"


def test_grid_dry_run_of_a_shipped_study_beside_a_folder_of_its_name(cwd_with_folders: Path, capsys) -> None:
    db = cwd_with_folders / "results.duckdb"
    assert main(["grid", "--study", "guide", "--dry-run", "--db", str(db)]) == 0
    assert "918 trials" in capsys.readouterr().out
    assert not db.exists()


@pytest.mark.parametrize("name", ["nosuch", "guide2"])
def test_a_bare_name_that_is_no_shipped_study_is_refused(cwd_with_folders: Path, name: str) -> None:
    (cwd_with_folders / "guide2").mkdir()  # a folder of that name is no study either
    with pytest.raises(ConfigError) as err:
        load_study(name)
    message = str(err.value)
    assert "no such study file" in message
    assert "shipped studies: " + ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))) in message


def test_bad_study_name_exits_2_with_the_shipped_studies(cwd_with_folders: Path, capsys) -> None:
    assert main(["grid", "--study", "nosuch", "--dry-run", "--db", str(cwd_with_folders / "x.duckdb")]) == 2
    err = capsys.readouterr().err
    assert "no such study file" in err and "guide" in err and "smoke" in err


def _write_study(path: Path) -> Path:
    smoke = yaml.safe_load((STUDIES_DIR / "smoke.yaml").read_text())
    path.write_text(yaml.safe_dump({**smoke, "name": "mine"}))
    return path


@pytest.mark.parametrize("given", ["{cwd}/studies/mine.yaml", "studies/mine.yaml", "./studies/mine.yaml", "mine.yml"])
def test_a_path_to_a_study_file_works(cwd_with_folders: Path, given: str) -> None:
    (cwd_with_folders / "studies").mkdir()
    _write_study(cwd_with_folders / "studies" / "mine.yaml")
    _write_study(cwd_with_folders / "mine.yml")
    given = given.format(cwd=cwd_with_folders)
    study = load_study(given)
    assert study.name == "mine" and study.path.resolve() == (cwd_with_folders / given).resolve()


@pytest.mark.parametrize("given", ["missing.yaml", "studies/missing", "./guide"])
def test_a_path_that_is_no_study_file_is_refused(cwd_with_folders: Path, given: str) -> None:
    with pytest.raises(ConfigError, match="no such study file"):
        load_study(given)
