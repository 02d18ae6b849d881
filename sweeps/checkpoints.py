"""Training checkpoints: written with a checksum beside them, verified when read and checked to fit their trial,
applied to it, and the newest good one of a trial found when the latest is damaged.

A checkpoint is a folder holding ``state.pt`` (``torch.save`` of a plain payload) and ``state.pt.sha256`` (its
SHA-256, in ``sha256sum`` format, so ``sha256sum -c state.pt.sha256`` checks it by hand). Why both: ``torch.load``
does not check the CRCs of its zip archive, so bytes flipped inside a tensor load silently (inf/nan or quietly wrong
weights), while truncated or garbled files fail deep inside ``torch.load`` with errors that name neither the file nor
the cause. Here every failure becomes one ``CheckpointCorrupt`` naming the file and what is wrong.

A payload without a checksum file (written before checksums existed, or by a save interrupted between the two
renames) is still read, with a ``CheckpointWarning``: refusing it would make every sweep in flight unresumable after
an upgrade, and ``read_checkpoint`` still checks its weights are finite.

The first half handles files and knows nothing of trials; the second saves, reads, verifies and applies a
trial's (``sweeps.trial_state.Trial``) checkpoints. ``sweeps.loop`` calls ``resume`` before training,
``save_checkpoint_if_finite`` along it, and the trainable-state helpers for early stopping and the final
weights. Nothing here knows about Ray or imports ``sweeps.loop``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from model.checkpoint import CheckpointError, non_finite_entries
from sweeps.trial_state import TrainState, Trial

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


# --------------------------------------------------------------------------------------------------------------------
# A trial's checkpoints: its weights, optimizer, scheduler, RNG and position (``sweeps.trial_state``)
# --------------------------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """Every generator a trial draws from, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(trial: Trial) -> dict[str, torch.Tensor]:
    """A copy of the trial's trainable tensors: a checkpoint's weights, or the best ones kept for early stopping."""
    return {name: p.detach().clone() for name, p in _trainable_state_params(trial).items()}


def load_trainable_state(trial: Trial, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (``trainable_state``'s names) into the trial's parameters."""
    params = {f"model.{n}": p for n, p in trial.model.named_parameters()}
    if trial.head is not None:
        params.update({f"head.{n}": p for n, p in trial.head.named_parameters()})
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def save_checkpoint(trial: Trial, checkpoint_dir: str | Path) -> Path:
    """Trainable weights, optimizer, scheduler, RNG states and position, written atomically with a checksum beside
    them (``write_payload``)."""
    payload = {"trainable": trainable_state(trial), "optimizer": trial.optimizer.state_dict(),
               "scheduler": trial.scheduler.state_dict(), "state": trial.state.to_saved(), "rng": _rng_state()}
    return write_payload(payload, Path(checkpoint_dir) / f"step_{trial.state.step:07d}")


def save_checkpoint_if_finite(trial: Trial, checkpoint_dir: str | Path) -> Path | None:
    """``save_checkpoint`` unless a trainable weight is inf or nan (``weights_diverged``): then nothing is saved,
    since a resume would carry the inf/nan on, and None."""
    if weights_diverged(trial):
        return None
    return save_checkpoint(trial, checkpoint_dir)


class VerifiedCheckpoint(NamedTuple):
    """A verified checkpoint payload that fits its trial, not yet applied."""

    payload: dict[str, Any]
    state: TrainState


def read_checkpoint(trial: Trial, path: str | Path) -> VerifiedCheckpoint:
    """The checkpoint in folder ``path``, verified (checksum, readable) and checked to fit ``trial``: the payload's
    parts are there, its tensors are this trial's trainable ones with their shapes, and its weights and optimizer
    state are finite. Raises ``CheckpointCorrupt`` naming the file; nothing of the trial changes."""
    file = Path(path) / "state.pt"
    payload = read_payload(path)
    missing = [k for k in ("trainable", "optimizer", "scheduler", "state", "rng") if k not in payload]
    if missing:
        raise CheckpointCorrupt(file, f"damaged: no {', '.join(missing)} in the payload")
    _check_trainable(trial, file, payload["trainable"])
    optimizer_state = payload["optimizer"].get("state", {}) if isinstance(payload["optimizer"], dict) else {}
    bad = [entry for index, slots in optimizer_state.items() if isinstance(slots, dict)
           for entry in non_finite_entries({f"optimizer.state[{index}].{k}": v for k, v in slots.items()})]
    if bad:
        raise CheckpointCorrupt(file, f"non-finite optimizer state: {', '.join(bad[:6])}")
    try:
        state = TrainState.from_saved(payload["state"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointCorrupt(file, f"damaged position state ({type(err).__name__}: {err})") from None
    return VerifiedCheckpoint(payload, state)


def _check_trainable(trial: Trial, file: Path, tensors: Any) -> None:
    """The saved trainable tensors are exactly this trial's, shaped alike, and finite."""
    want = {name: p.shape for name, p in _trainable_state_params(trial).items()}
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        raise CheckpointCorrupt(file, "damaged: the trainable weights are not a dict of tensors")
    if set(tensors) != set(want):
        odd = sorted(set(tensors) ^ set(want))
        raise CheckpointCorrupt(file, f"not this trial's weights (differing names: {', '.join(odd[:6])})")
    shapes = [f"{n}: {tuple(t.shape)} saved, {tuple(want[n])} expected" for n, t in tensors.items()
              if t.shape != want[n]]
    if shapes:
        raise CheckpointCorrupt(file, f"not this trial's weights (wrong shapes: {'; '.join(shapes[:4])})")
    bad = non_finite_entries(tensors)
    if bad:
        raise CheckpointCorrupt(file, f"non-finite weights: {', '.join(bad[:6])}")


def apply_checkpoint(trial: Trial, checkpoint: VerifiedCheckpoint, path: str | Path) -> None:
    """Set the trial's weights, optimizer, scheduler, position and RNG to a checkpoint read by ``read_checkpoint``.
    A part that still does not fit (an optimizer of another shape) is ``CheckpointCorrupt``; applying another
    checkpoint after it overwrites everything this one set."""
    saved = checkpoint.payload
    try:
        load_trainable_state(trial, saved["trainable"])
        trial.optimizer.load_state_dict(saved["optimizer"])
        trial.scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointCorrupt(Path(path) / "state.pt", f"does not fit this trial ({type(err).__name__}: "
                                                         f"{str(err)[:300]})") from None
    trial.state = checkpoint.state
    trial.resumed_from_step = trial.state.step


def load_checkpoint(trial: Trial, path: str | Path) -> None:
    """Resume ``trial`` from exactly this checkpoint folder (``CheckpointCorrupt`` when it is bad)."""
    apply_checkpoint(trial, read_checkpoint(trial, path), path)


def resume(trial: Trial, resume_from: str | Path | Sequence[str | Path]) -> Path:
    """Resume from the newest good checkpoint: ``resume_from`` itself (a folder; then its older ``step_*`` or
    ``checkpoint_*`` siblings, ``resume_candidates``) or the first good one of a list. Each bad
    one skipped is warned about and named in the trial's notes (``checkpoint_fallback``); ``NoGoodCheckpoint``,
    naming every one, when none is good. Returns the folder used."""
    candidates = (resume_candidates(resume_from) if isinstance(resume_from, str | Path)
                  else [Path(p) for p in resume_from])
    path, _, skipped = first_good(candidates, lambda p: load_checkpoint(trial, p))
    if skipped:
        trial.notes["checkpoint_fallback"] = (f"resumed from {path} (step {trial.state.step}); skipped damaged: "
                                              + "; ".join(str(err) for err in skipped))
    return path


def _trainable_state_params(trial: Trial) -> dict[str, torch.Tensor]:
    """The live tensors ``trainable_state`` copies, under the same names."""
    tensors = {f"model.{n}": p for n, p in trial.model.named_parameters() if p.requires_grad}
    if trial.head is not None:
        tensors.update({f"head.{n}": p for n, p in trial.head.named_parameters()})
    return tensors


def non_finite_weights(trial: Trial) -> list[str]:
    """The trainable tensors with inf/nan entries now (frozen ones never change); empty when all are finite."""
    with torch.no_grad():
        return non_finite_entries(_trainable_state_params(trial))


def weights_diverged(trial: Trial) -> bool:
    """True (and the tensors named in the trial's notes, ``non_finite_weights``) when a trainable weight is inf or
    nan: an update can overflow with a finite loss, and such weights must not be saved, evaluated as a result or
    exported."""
    bad = non_finite_weights(trial)
    if bad:
        trial.notes["non_finite_weights"] = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    return bool(bad)
