"""A bad file of each kind stops with one clear error naming the file (and the line), before any training."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import duckdb
import pytest

from tasks import DataError, TaskConfig, get_task


def _write(root: Path, relpath: str, text: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if relpath.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


SMS = "sms_spam/SMSSpamCollection"
IMDB = "imdb/imdb_aclImdb.csv.gz"
SICK = "nli/sick.jsonl.gz"
ALPACA = "alpaca/alpaca_data.json.gz"


def _nli_line(**fields) -> str:
    record = {"premise": "A man.", "hypothesis": "A person.", "label": "entailment", "split": "train", **fields}
    return json.dumps(record) + "\n"


CASES = {
    "sms-three-fields": ("sms_spam", SMS, "ham\tok\nspam\twin\textra\n", rf"{SMS}:2: expected 'label<TAB>text'"),
    "sms-unknown-label": ("sms_spam", SMS, "ham\tok\neggs\twin\n", rf"{SMS}:2: unknown label 'eggs'"),
    "imdb-wrong-columns": ("imdb", IMDB, "review,sentiment\nGood,1\n", rf"{IMDB}:1: expected columns text,label"),
    "imdb-bad-label": ("imdb", IMDB, "text,label,split,id,rating\nGood,1,train,1,9\nBad,7,train,2,2\n",
                       rf"{IMDB}:3: unknown label '7'"),
    "nli-bad-json": ("nli", SICK, _nli_line() + "{not json\n", rf"{SICK}:2: not valid JSON"),
    "nli-unknown-label": ("nli", SICK, _nli_line() + _nli_line(label="maybe"), rf"{SICK}:2: unknown label 'maybe'"),
    "nli-missing-field": ("nli", SICK, '{"premise": "A"}\n', rf"{SICK}:1: missing field 'hypothesis'"),
    "nli-empty-split": ("nli", SICK, _nli_line() * 3, r"empty split\(s\) validation, test"),
    "alpaca-bad-json": ("alpaca", ALPACA, '[{"instruction": "a",\n "output": }]', rf"{ALPACA}:2: not valid JSON"),
    "alpaca-wrong-column": ("alpaca", ALPACA, '[{"prompt": "a", "answer": "b"}]', rf"{ALPACA}: record 0: expected"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_file_is_named(case: str, enc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task_name, relpath, content, expected = CASES[case]
    _write(tmp_path, relpath, content)
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=expected):
        get_task(TaskConfig(name=task_name)).load(enc)


def _parquet(path: Path, rows: list[tuple], columns: str = "premise, hypothesis, label") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    names = [c.strip() for c in columns.split(",")]
    con.execute(f"CREATE TABLE t ({', '.join(f'{n} VARCHAR' if n != 'label' else 'label BIGINT' for n in names)})")
    con.executemany(f"INSERT INTO t VALUES ({', '.join('?' for _ in names)})", rows)
    con.execute(f"COPY t TO '{path}' (FORMAT parquet)")


def test_all_nli_med_parquet_is_read_and_checked(enc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "nli" / "all_nli_med"
    for split in ("train", "validation", "test"):
        _parquet(root / f"{split}-00000.parquet", [("A man sleeps.", "A person rests.", 0), ("A.", "B.", 2)])
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    splits = get_task(TaskConfig(name="nli", source="all_nli_med")).load(enc)
    assert splits["train"].labels.tolist() == [0, 2]

    _parquet(root / "test-00000.parquet", [("A.", "B.", 5)])
    with pytest.raises(DataError, match=r"test-00000\.parquet: row 1: label 5 is not 0/1/2"):
        get_task(TaskConfig(name="nli", source="all_nli_med", max_length=100)).load(enc)
    _parquet(root / "test-00000.parquet", [("A.", "B.", 1)], columns="sentence1, sentence2, label")
    with pytest.raises(DataError, match=r"expected columns premise, hypothesis, label; found \['sentence1'"):
        get_task(TaskConfig(name="nli", source="all_nli_med", max_length=99)).load(enc)


def test_all_nli_med_offline_is_a_clear_error(enc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DataError, match=r"all_nli_med: not in .*presencesw/all_nli_med.*task\.source=sick"):
        get_task(TaskConfig(name="nli", source="all_nli_med")).load(enc)


BAD_UTF8 = {
    "sms": ("sms_spam", SMS, b"ham\tok\nham\tfine\nspam\twin \xff now\n", 3),
    "imdb": ("imdb", IMDB, b"text,label,split,id,rating\nGood,1,train,1,9\nBad \xc3\x28,0,train,2,2\n", 3),
    "nli": ("nli", SICK, _nli_line().encode() * 2 + _nli_line().encode().replace(b"man", b"m\xe9n"), 3),
    "alpaca": ("alpaca", ALPACA, b'[{"instruction": "a",\n "input": "",\n "output": "\xfe"}]', 3),
}


@pytest.mark.parametrize("case", BAD_UTF8, ids=list(BAD_UTF8))
def test_invalid_utf8_names_the_file_and_line(case: str, enc, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    task_name, relpath, content, line = BAD_UTF8[case]
    path = tmp_path / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if relpath.endswith(".gz") else content)
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=rf"{relpath}:{line}: not valid UTF-8 \(.*\); replace the file"):
        get_task(TaskConfig(name=task_name)).load(enc)
