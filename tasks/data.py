"""Where task data comes from: ``$FINETUNE_DATA_DIR`` first, else the canonical source, downloaded once and checked.

The data directory's layout is the layout of ``shared/data`` (``sms_spam/SMSSpamCollection``, ``imdb/...``). A download
ends in that same layout, so a directory filled by downloads and one copied from elsewhere are interchangeable. Each
download is checked against a sha256 recorded here; content-derived files (a CSV built from a tarball) are checked
on the content, so the check does not depend on how an archive was packed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from model.tokenizer import DATA_DIR_ENV, sha256_file

DEFAULT_DATA_DIR = Path.home() / ".cache" / "gpt2-finetune-guide" / "data"


class DataError(ValueError):
    """A data problem that stops a trial before training: missing file, bad row (file and line), unknown label,
    empty split, failed download or checksum."""


def data_dir() -> Path:
    """``$FINETUNE_DATA_DIR``, else ``~/.cache/gpt2-finetune-guide/data`` (where downloads land)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else DEFAULT_DATA_DIR


@dataclass(frozen=True)
class Source:
    """One data file: its place in the data directory and how to obtain it when it is missing."""

    relpath: str
    """Path inside the data directory, e.g. ``sms_spam/SMSSpamCollection``."""
    url: str
    """Canonical download location."""
    sha256: str | None
    """sha256 of the file's content (uncompressed content for ``.gz`` files) once it is in place; None when only the
    download's own hash is published (then ``download_sha256`` is required)."""
    build: Callable[[Path, Path], None] | None = None
    """Turns the downloaded file into the stored one (unpack, convert); None stores the download as it is
    (gzip-compressed when ``relpath`` ends in ``.gz`` and the download is not)."""
    download_sha256: str | None = None
    """sha256 of the downloaded bytes, checked before anything else (e.g. a git-LFS oid)."""


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` with a progress line on stderr."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            with dest.open("wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    shown = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    print(f"\r  downloading {url}: {shown}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
    except OSError as err:
        raise DataError(f"could not download {url}: {err}") from None


def ensure(source: Source, root: Path | None = None) -> Path:
    """The local path of ``source``, downloading and checking it first when it is missing."""
    root = root if root is not None else data_dir()
    path = root / source.relpath
    if path.is_file():
        return path
    print(f"{path} is missing; fetching it from {source.url}", file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{path} is missing and cannot be created ({err}); set {DATA_DIR_ENV} to a writable "
                        "directory or put the file there") from None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        raw = Path(tmp) / "download"
        _download(source.url, raw)
        if source.download_sha256 is not None and sha256_file(raw) != source.download_sha256:
            raise DataError(f"{source.url}: checksum mismatch (sha256 {sha256_file(raw)}, expected "
                            f"{source.download_sha256}); nothing was written to {path}")
        built = Path(tmp) / path.name
        if source.build is not None:
            source.build(raw, built)
        elif path.suffix == ".gz" and raw.read_bytes()[:2] != b"\x1f\x8b":
            with raw.open("rb") as src, gzip.open(built, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            raw.rename(built)
        actual = sha256_file(built, decompress=path.suffix == ".gz")
        if source.sha256 is not None and actual != source.sha256:
            raise DataError(f"{source.url}: checksum mismatch (sha256 {actual}, expected {source.sha256}); "
                            f"nothing was written to {path}")
        os.replace(built, path)
    return path


def read_json_list(path: Path) -> list:
    """A JSON file holding a list of records; a parse error names the file and line."""
    with open_text(path) as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


@contextlib.contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """Open a text file for reading, transparently gunzipping ``.gz``; UTF-8. A byte that is not UTF-8, met anywhere
    in the ``with`` block, is a DataError naming the file and line (Python's own error names neither)."""
    try:
        with _open(path) as f:
            yield f
    except UnicodeDecodeError as err:
        line = first_bad_utf8_line(path)
        where = f"{path}:{line}" if line is not None else str(path)
        raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte 0x{err.object[err.start]:02x}); replace "
                        f"the file with a UTF-8 copy (see its SOURCE.md)") from None


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def first_bad_utf8_line(path: Path) -> int | None:
    """The 1-based line of the first byte that is not UTF-8 (a multi-byte character never holds a newline byte, so
    lines decode on their own); None when every line decodes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None
