"""Missing files are fetched from their canonical source, converted into the data-directory layout and checked.

The network is not reachable here, so each canonical file is served from a file:// URL made from the real data; the
conversions must reproduce the recorded checksums exactly.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from tasks import DataError
from tasks.alpaca import SOURCE as ALPACA
from tasks.data import ensure, sha256_file
from tasks.imdb import _from_acl_tarball
from tasks.nli import SOURCES as NLI
from tasks.sms_spam import SOURCE as SMS


def _uci_zip(path: Path, text: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("SMSSpamCollection", text.replace(b"\n", b"\r\n"))  # as distributed: CRLF
        archive.writestr("readme", b"SMS Spam Collection v.1")


def test_sms_zip_is_downloaded_unpacked_and_checked(data_dir: Path, tmp_path: Path) -> None:
    _uci_zip(tmp_path / "sms.zip", (data_dir / SMS.relpath).read_bytes())
    root = tmp_path / "data"
    path = ensure(replace(SMS, url=(tmp_path / "sms.zip").as_uri()), root)
    assert path == root / "sms_spam" / "SMSSpamCollection"
    assert sha256_file(path) == SMS.sha256
    assert ensure(replace(SMS, url="file:///nonexistent"), root) == path  # present: no second download


def test_checksum_mismatch_writes_nothing(data_dir: Path, tmp_path: Path) -> None:
    _uci_zip(tmp_path / "sms.zip", (data_dir / SMS.relpath).read_bytes() + b"ham\tone more\n")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure(replace(SMS, url=(tmp_path / "sms.zip").as_uri()), root)
    assert list((root / "sms_spam").iterdir()) == []


def test_failed_download_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"could not download file:///no/such/file"):
        ensure(replace(SMS, url="file:///no/such/file"), tmp_path)


def test_sick_tsv_converts_to_the_recorded_jsonl(data_dir: Path, tmp_path: Path) -> None:
    tsv = tmp_path / "SICK.txt"
    tsv.write_bytes(gzip.decompress((data_dir / "nli" / "SICK.txt.gz").read_bytes()))
    path = ensure(replace(NLI["sick"], url=tsv.as_uri()), tmp_path / "data")
    assert sha256_file(path, decompress=True) == NLI["sick"].sha256


def test_alpaca_json_is_stored_compressed_and_checked(data_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "alpaca_data.json"
    with gzip.open(data_dir / ALPACA.relpath) as src, raw.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    path = ensure(replace(ALPACA, url=raw.as_uri()), tmp_path / "data")
    assert path.suffix == ".gz" and sha256_file(path, decompress=True) == ALPACA.sha256


def test_imdb_tarball_becomes_the_csv_layout(tmp_path: Path) -> None:
    reviews = {"aclImdb/test/pos/3_8.txt": "Lovely.", "aclImdb/train/pos/10_9.txt": "Great, \"really\".",
               "aclImdb/train/neg/2_1.txt": "Bad<br />film.", "aclImdb/train/neg/11_3.txt": "Dull.",
               "aclImdb/train/unsup/5_0.txt": "unlabelled: left out"}
    with tarfile.open(tmp_path / "acl.tar.gz", "w:gz") as archive:
        for name, text in reviews.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    _from_acl_tarball(tmp_path / "acl.tar.gz", tmp_path / "imdb.csv.gz")
    rows = list(csv.reader(io.StringIO(gzip.decompress((tmp_path / "imdb.csv.gz").read_bytes()).decode())))
    assert rows == [["text", "label", "split", "id", "rating"],
                    ["Bad<br />film.", "0", "train", "2", "1"], ["Dull.", "0", "train", "11", "3"],
                    ['Great, "really".', "1", "train", "10", "9"], ["Lovely.", "1", "test", "3", "8"]]


def test_preference_files_download_with_their_checksums(data_dir: Path, tmp_path: Path) -> None:
    from tasks.preference import SOURCES as PREF

    # the instruction set is stored gzip-compressed from the verbatim JSON: content hash checked
    raw = tmp_path / "instruction.json"
    with gzip.open(data_dir / PREF["instruction"].relpath, "rb") as src:
        raw.write_bytes(src.read())
    path = ensure(replace(PREF["instruction"], url=raw.as_uri()), tmp_path / "data")
    assert sha256_file(path, decompress=True) == PREF["instruction"].sha256
    # HH-RLHF train: only the compressed file's hash (its LFS oid) is published; checked on the download itself
    gz = data_dir / PREF["hh_helpful"].relpath
    source = replace(PREF["hh_helpful_train"], url=gz.as_uri(), download_sha256=sha256_file(gz))
    fetched = ensure(source, tmp_path / "data")
    assert fetched.read_bytes() == gz.read_bytes()
    wrong = replace(source, relpath="preference/other.jsonl.gz", download_sha256="0" * 64)
    with pytest.raises(DataError, match="checksum mismatch"):
        ensure(wrong, tmp_path / "data")
    assert not (tmp_path / "data" / "preference" / "other.jsonl.gz").exists()
