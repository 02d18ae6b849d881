"""``task.source=med_or_sick``: the medical NLI set where it can be had, else SICK, loudly, and the record says which."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest
import torch

from sweeps.config import TrialConfig
from sweeps.loop import run_trial
from tasks import DataError, TaskConfig, get_task


def _offline(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """A data directory with SICK only, and a hub that cannot be reached (an empty cache, offline)."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))


def _with_sick(data_dir: Path, root: Path) -> Path:
    """SICK and the tokenizer files, nothing else."""
    (root / "nli").mkdir(parents=True)
    shutil.copy(data_dir / "nli" / "sick.jsonl.gz", root / "nli" / "sick.jsonl.gz")
    shutil.copytree(data_dir / "gpt2-bpe", root / "gpt2-bpe")
    return root


def _parquet(path: Path, rows: list[tuple], columns: tuple[str, str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    label_type = "BIGINT" if isinstance(rows[0][2], int) else "VARCHAR"
    con.execute(f"CREATE TABLE t ({columns[0]} VARCHAR, {columns[1]} VARCHAR, {columns[2]} {label_type})")
    con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    con.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    con.close()


def _notes(task) -> dict:
    return task.prepare(None, {}, torch.device("cpu"), None, 1)


def test_offline_it_falls_back_to_sick_loudly_and_says_so(enc, data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _offline(monkeypatch, _with_sick(data_dir, tmp_path))
    task = get_task(TaskConfig(name="nli", source="med_or_sick"))
    splits = task.load(enc)
    err = capsys.readouterr().err
    assert "MEDICAL NLI UNAVAILABLE" in err and "falls back to SICK" in err and "presencesw/all_nli_med" in err
    assert "NOT medical" in err and "task_source_used=sick" in err
    # exactly SICK: the same examples as task.source=sick
    sick = get_task(TaskConfig(name="nli", source="sick")).load(enc)
    assert {k: len(v) for k, v in splits.items()} == {"train": 4439, "validation": 495, "test": 4906}
    assert all(torch.equal(splits[s].labels, sick[s].labels) and torch.equal(splits[s].tokens, sick[s].tokens)
               for s in splits)
    notes = _notes(task)
    assert notes["task_source_used"] == "sick"
    assert notes["task_source_fallback"].startswith("all_nli_med unavailable, read SICK: all_nli_med: not in")
    assert _notes(get_task(TaskConfig(name="nli", source="sick"))) == {"task_source_used": "sick"}
    # the explicit medical source stays an error offline: only med_or_sick falls back
    with pytest.raises(DataError, match="could not be downloaded from the hub"):
        get_task(TaskConfig(name="nli", source="all_nli_med")).load(enc)


def test_the_medical_set_is_used_when_it_is_there(enc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys) -> None:
    _offline(monkeypatch, tmp_path)  # no SICK at all: med_or_sick must not need it when the medical set is there
    for split in ("train", "validation", "test"):
        _parquet(tmp_path / "nli" / "all_nli_med" / f"{split}-00000-of-00001.parquet",
                 [("The patient has a fever.", "The patient is febrile.", 0),
                  ("No chest pain.", "The patient reports chest pain.", 2)], ("premise", "hypothesis", "label"))
    task = get_task(TaskConfig(name="nli", source="med_or_sick"))
    splits = task.load(enc)
    assert splits["train"].labels.tolist() == [0, 2]
    assert "UNAVAILABLE" not in capsys.readouterr().err
    assert _notes(task) == {"task_source_used": "all_nli_med"}


def test_snli_style_columns_are_read_and_no_consensus_pairs_left_out(enc, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch, tmp_path)
    for split in ("train", "validation", "test"):
        _parquet(tmp_path / "nli" / "all_nli_med" / f"{split}.parquet",
                 [("A.", "B.", "neutral"), ("C.", "D.", "-"), ("E.", "F.", "contradiction")],
                 ("sentence1", "sentence2", "gold_label"))
    splits = get_task(TaskConfig(name="nli", source="all_nli_med")).load(enc)
    assert splits["test"].labels.tolist() == [1, 2]


@pytest.mark.slow
def test_a_trial_records_the_source_it_read(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch, _with_sick(data_dir, tmp_path))
    config = TrialConfig.from_flat({
        "task.name": "nli", "task.source": "med_or_sick", "task.max_train_examples": 16, "task.max_eval_examples": 8,
        "task.max_length": 32, "model.init": "random", "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16,
        "method.name": "full", "train.max_steps": 1, "train.batch_size": 4, "train.device": "cpu"})
    record = run_trial(config).record
    assert record.notes["task_source_used"] == "sick" and "task_source_fallback" in record.notes
    assert record.to_dict()["notes"]["task_source_used"] == "sick"  # what result.json and trials.result hold
