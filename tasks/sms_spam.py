"""UCI SMS Spam Collection: ham vs spam.

Default split, the GPT-2 reference setup (Raschka, *Build a Large Language Model (From Scratch)*, ch. 6): ham is
undersampled to the 747 spam messages (1,494 examples), shuffled with seed 123 and cut 70/10/20 into 1,045 / 149 / 300.
The sampling uses numpy's ``RandomState(123)`` exactly as ``DataFrame.sample(random_state=123)`` does. One difference:
the reference reads the file with ``pandas.read_csv``, whose quote handling merges two messages that contain a stray
``"`` (5,572 rows); here every line is one message (5,574, as the file is), so the sampled ham can differ slightly
while every size is the same. ``task.balanced=false`` keeps all messages with a stratified 70/10/20 split.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from tasks.base import ClassificationTask, Example
from tasks.data import DataError, Source, open_text

LABELS = ("ham", "spam")


def _from_uci_zip(raw: Path, out: Path) -> None:
    with zipfile.ZipFile(raw) as archive:
        text = archive.read("SMSSpamCollection")
    out.write_bytes(text.replace(b"\r\n", b"\n"))


SOURCE = Source(
    relpath="sms_spam/SMSSpamCollection",
    url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    sha256="7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
    build=_from_uci_zip,
)


def read_messages(path: Path) -> list[Example]:
    examples = []
    with open_text(path) as f:
        for line_no, line in enumerate(io.StringIO(f.read()), start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            label, sep, text = line.partition("\t")
            if not sep or "\t" in text:
                raise DataError(f"{path}:{line_no}: expected 'label<TAB>text' (2 fields), got {line[:60]!r}")
            if label not in LABELS:
                raise DataError(f"{path}:{line_no}: unknown label {label!r}; expected one of {LABELS}")
            if not text.strip():
                raise DataError(f"{path}:{line_no}: empty message")
            examples.append(Example(text=text, label=LABELS.index(label)))
    return examples


def _cut(items: list, fractions: tuple[float, float]) -> tuple[list, list, list]:
    train_end = int(len(items) * fractions[0])
    val_end = train_end + int(len(items) * fractions[1])
    return items[:train_end], items[train_end:val_end], items[val_end:]


class SmsSpam(ClassificationTask):
    name = "sms_spam"
    label_names = LABELS
    default_max_length = 128

    def sources(self) -> list[Source]:
        return [SOURCE]

    def cache_options(self) -> dict:
        return {**super().cache_options(), "balanced": self.config.balanced}

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        messages = read_messages(paths[0])
        ham = [m for m in messages if m.label == 0]
        spam = [m for m in messages if m.label == 1]
        if self.config.balanced:
            picked = np.random.RandomState(123).choice(len(ham), size=len(spam), replace=False)
            pool = [ham[i] for i in picked] + spam
            order = np.random.RandomState(123).choice(len(pool), size=len(pool), replace=False)
            train, val, test = _cut([pool[i] for i in order], (0.7, 0.1))
        else:
            train, val, test = [], [], []
            for group in (ham, spam):  # stratified: each class cut 70/10/20 on its own
                order = np.random.RandomState(123).permutation(len(group))
                for split, part in zip((train, val, test), _cut([group[i] for i in order], (0.7, 0.1)), strict=True):
                    split.extend(part)
            for split in (train, val, test):
                order = np.random.RandomState(123).permutation(len(split))
                split[:] = [split[i] for i in order]
        return {"train": train, "validation": val, "test": test}
