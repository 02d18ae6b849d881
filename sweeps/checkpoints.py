"""Training checkpoints as files: written with a checksum beside them, verified when read, and the newest good one
of a trial found when the latest is damaged.

A checkpoint is a folder holding ``state.pt`` (``torch.save`` of a plain payload) and ``state.pt.sha256`` (its
SHA-256, in ``sha256sum`` format, so ``sha256sum -c state.pt.sha256`` checks it by hand). Why both: ``torch.load``
does not check the CRCs of its zip archive, so bytes flipped inside a tensor load silently (inf/nan or quietly wrong
weights), while truncated or garbled files fail deep inside ``torch.load`` with errors that name neither the file nor
the cause. Here every failure becomes one ``CheckpointCorrupt`` naming the file and what is wrong.

A payload without a checksum file (written before checksums existed, or by a save interrupted between the two
renames) is still read, with a ``CheckpointWarning``: refusing it would make every sweep in flight unresumable after
an upgrade, and the caller still checks its weights are finite (``sweeps.loop.read_checkpoint``).

Nothing here knows about trials or Ray; ``sweeps.loop`` checks that a payload fits its trial.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from model.checkpoint import CheckpointError

PAYLOAD = "state.pt"
DIGEST = f"{PAYLOAD}.sha256"
_NUMBERED = re.compile(r"^(?P<prefix>[A-Za-z]+_)(?P<number>\d+)$")  # step_0000003 (ours), checkpoint_000002 (Ray's)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


class CheckpointCorrupt(CheckpointError):
    """One checkpoint that cannot be used: missing, damaged, unreadable, with non-finite values, or not this
    trial's. ``path`` is the file (or folder) at fault; the message names it and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NoGoodCheckpoint(CheckpointError):
    """Every candidate checkpoint of a resume was bad; resuming from none of them (nor silently from scratch)."""

    def __init__(self, problems: list[CheckpointCorrupt]) -> None:
        self.problems = problems
        super().__init__("no usable checkpoint to resume from; every candidate is damaged:\n  - "
                         + "\n  - ".join(str(p) for p in problems))


class CheckpointWarning(UserWarning):
    """A checkpoint skipped (damaged) or read without its checksum."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_payload(payload: dict[str, Any], directory: str | Path) -> Path:
    """``payload`` into ``directory/state.pt`` and its checksum beside it, each through a temporary renamed at the
    end: a reader never sees a half-written file under a final name, and a stale checksum of an earlier save into
    the same folder is removed first, so it can never vouch for the new payload."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{PAYLOAD}.tmp"
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # a crash after the rename must not leave an empty file under the final name
    digest = file_sha256(tmp)
    (folder / DIGEST).unlink(missing_ok=True)
    os.replace(tmp, folder / PAYLOAD)
    (folder / f"{DIGEST}.tmp").write_text(f"{digest}  {PAYLOAD}\n")
    os.replace(folder / f"{DIGEST}.tmp", folder / DIGEST)
    return folder


def _expected_digest(folder: Path) -> str | None:
    path = folder / DIGEST
    if not path.is_file():
        return None
    try:
        fields = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(path, f"unreadable checksum file ({type(err).__name__})") from None
    if not fields or not _HEX64.match(fields[0]):
        raise CheckpointCorrupt(path, "damaged checksum file: expected a SHA-256 hex digest")
    return fields[0]


def read_payload(directory: str | Path) -> dict[str, Any]:
    """The verified payload of a checkpoint folder: its checksum matched (when it has one), then loaded with
    ``weights_only=True``. Raises ``CheckpointCorrupt`` naming the file for any damage."""
    folder = Path(directory)
    file = folder / PAYLOAD
    if not file.is_file():
        raise CheckpointCorrupt(file, "missing" if folder.is_dir() else "no such checkpoint folder")
    expected = _expected_digest(folder)
    if expected is None:
        warnings.warn(f"{file}: no {DIGEST} beside it; read without verifying its bytes (its weights are still "
                      "checked to be finite)", CheckpointWarning, stacklevel=2)
    elif (actual := file_sha256(file)) != expected:
        raise CheckpointCorrupt(file, f"damaged: its SHA-256 is {actual[:16]}..., {DIGEST} says {expected[:16]}... "
                                      f"(the file changed after it was written; {file.stat().st_size} bytes)")
    try:
        payload = torch.load(file, weights_only=True, map_location="cpu")
    except MemoryError:
        raise
    except Exception as err:  # damage surfaces as many types: RuntimeError (zip), EOFError, UnpicklingError, ...
        raise CheckpointCorrupt(file, f"unreadable, damaged ({type(err).__name__}: {_load_error(err)})") from None
    if not isinstance(payload, dict):
        raise CheckpointCorrupt(file, f"expected a dict payload, found {type(payload).__name__}")
    return payload


def _load_error(err: Exception) -> str:
    """The informative part of a ``torch.load`` error: its first sentence, or the unpickler's own complaint (torch
    wraps that in advice to load with ``weights_only=False``, which does not apply to a damaged file)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the file ends early" if isinstance(err, EOFError) else "no message"
    return lines[0].split(". ", 1)[0][:300]


def numbered(path: Path) -> tuple[str, int] | None:
    """``("step_", 3)`` for ``step_0000003``; None for a folder not named ``<word>_<number>``."""
    match = _NUMBERED.match(path.name)
    return (match["prefix"], int(match["number"])) if match else None


def resume_candidates(path: str | Path) -> list[Path]:
    """``path`` and then its older siblings of the same naming (``step_*`` of ``--checkpoint-dir``, Ray's
    ``checkpoint_*`` in a trial folder), newest first: where to fall back to when ``path`` is damaged. Newer
    siblings are never used: the caller asked for ``path``."""
    first = Path(path)
    key = numbered(first)
    if key is None or not first.parent.is_dir():
        return [first]
    prefix, number = key
    older = []
    for sibling in first.parent.iterdir():
        sibling_key = numbered(sibling)
        if sibling.is_dir() and sibling_key is not None and sibling_key[0] == prefix and sibling_key[1] < number:
            older.append((sibling_key[1], sibling))
    return [first] + [p for _, p in sorted(older, reverse=True)]


def first_good(candidates: Iterable[Path], use: Callable[[Path], T]) -> tuple[Path, T, list[CheckpointCorrupt]]:
    """The first candidate ``use`` accepts (it raises ``CheckpointCorrupt`` for a bad one), what it returned, and
    the bad ones skipped on the way, each with a ``CheckpointWarning``; ``NoGoodCheckpoint`` when none is good."""
    skipped: list[CheckpointCorrupt] = []
    for path in candidates:
        try:
            return path, use(path), skipped
        except CheckpointCorrupt as err:
            skipped.append(err)
            warnings.warn(f"skipping damaged checkpoint {err}", CheckpointWarning, stacklevel=2)
    raise NoGoodCheckpoint(skipped)
