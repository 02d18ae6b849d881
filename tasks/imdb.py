"""Large Movie Review Dataset (Maas et al., 2011): binary sentiment on its own 25k train / 25k test split.

Validation is carved from train deterministically: 1,250 negative + 1,250 positive reviews chosen with seed 123, so
train is 22,500, validation 2,500, test 25,000 (each balanced). Reviews are truncated to ``task.max_length`` tokens
(default 256), keeping the beginning.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import tarfile
from pathlib import Path

import numpy as np

from tasks.base import ClassificationTask, Example
from tasks.data import DataError, Source, open_text

LABELS = ("negative", "positive")
COLUMNS = ["text", "label", "split", "id", "rating"]
VALIDATION_PER_CLASS = 1250


def _from_acl_tarball(raw: Path, out: Path) -> None:
    """aclImdb_v1.tar.gz -> the CSV layout of shared/data (train then test; neg before pos; ascending id)."""
    pattern = re.compile(r"aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
    rows = []
    with tarfile.open(raw, "r:gz") as archive:
        for member in archive:
            match = pattern.match(member.name)
            if match and member.isfile():
                split, polarity, review_id, rating = match.groups()
                text = archive.extractfile(member).read().decode("utf-8")
                rows.append((split != "train", polarity == "pos", int(review_id), text, int(rating), split))
    rows.sort(key=lambda r: r[:3])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for _, positive, review_id, text, rating, split in rows:
        writer.writerow([text, int(positive), split, review_id, rating])
    with gzip.open(out, "wb", compresslevel=9) as f:
        f.write(buffer.getvalue().encode("utf-8"))


SOURCE = Source(
    relpath="imdb/imdb_aclImdb.csv.gz",
    url="https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
    sha256="4b3e9b68a6d1e61293db2976b571477377c995e12303dc9daab419ab156c8386",  # of the CSV content
    build=_from_acl_tarball,
)


def read_reviews(path: Path) -> dict[str, list[Example]]:
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    with open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != COLUMNS:
            raise DataError(f"{path}:1: expected columns {','.join(COLUMNS)}, got {header}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) != len(COLUMNS):
                raise DataError(f"{where}: expected {len(COLUMNS)} fields, got {len(row)}")
            text, label, split = row[0], row[1], row[2]
            if label not in ("0", "1"):
                raise DataError(f"{where}: unknown label {label!r}; expected 0 (negative) or 1 (positive)")
            if split not in splits:
                raise DataError(f"{where}: unknown split {split!r}; expected train or test")
            if not text.strip():
                raise DataError(f"{where}: empty review")
            splits[split].append(Example(text=text, label=int(label)))
    return splits


class Imdb(ClassificationTask):
    name = "imdb"
    label_names = LABELS
    default_max_length = 256

    def sources(self) -> list[Source]:
        return [SOURCE]

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        raw = read_reviews(paths[0])
        rng = np.random.RandomState(123)
        held_out: set[int] = set()
        for label in (0, 1):
            members = [i for i, e in enumerate(raw["train"]) if e.label == label]
            if len(members) <= VALIDATION_PER_CLASS:
                raise DataError(f"{paths[0]}: only {len(members)} {LABELS[label]} training reviews; "
                                f"need more than {VALIDATION_PER_CLASS} to carve a validation split")
            held_out.update(members[i] for i in rng.choice(len(members), VALIDATION_PER_CLASS, replace=False))
        train = [e for i, e in enumerate(raw["train"]) if i not in held_out]
        validation = [raw["train"][i] for i in sorted(held_out)]
        return {"train": train, "validation": validation, "test": raw["test"]}
