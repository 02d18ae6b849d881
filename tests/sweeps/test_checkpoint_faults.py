"""Damaged checkpoints and non-finite weights (issue 16, item 3). Faults are injected here, into files a real trial
wrote (bytes flipped, truncated, emptied, garbled) or into a running trial's weights; the shipped code has no hooks.

A trial resumed from a damaged checkpoint continues from the previous good one with a warning naming the bad one;
with none good it fails with one clear error naming each checkpoint (exit code 2 from ``sweeps/train.py``, a
``failed`` final record from the Ray trainable); non-finite weights are never saved, recorded as a result or exported.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model import GPT2, CheckpointError, GPT2Config, NonFiniteWeightsError
from sweeps import loop, ray_trial
from sweeps.checkpoints import (
    DIGEST,
    PAYLOAD,
    CheckpointCorrupt,
    CheckpointWarning,
    NoGoodCheckpoint,
    _trainable_state_params,
    file_sha256,
    read_checkpoint,
    read_payload,
    resume_candidates,
    write_payload,
)
from sweeps.config import TrialConfig
from sweeps.loop import TrialResult, run_trial
from sweeps.records import CheckpointRecord, FinalRecord, record_from_report
from sweeps.train import SMOKE, export, main

FLAT = {**SMOKE, "task.name": "sms_spam", "train.max_steps": 6, "train.checkpoint_every": 2, "train.log_every": 100}
CLI = ["--smoke", "--task", "sms_spam", "--set", "train.max_steps=6", "--set", "train.checkpoint_every=2", "--quiet"]


def _config() -> TrialConfig:
    return TrialConfig.from_flat(FLAT)


@pytest.fixture(scope="module")
def straight(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrialResult, Path]:
    """One undisturbed trial and its checkpoints step_0000002, step_0000004, step_0000006 (copied, never changed)."""
    folder = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_DATA_DIR", str(data_dir))
        events: list = []
        result = run_trial(_config(), events.append, checkpoint_dir=folder)
    assert [Path(e.path).name for e in events if isinstance(e, CheckpointRecord)] == [
        "step_0000002", "step_0000004", "step_0000006"]
    return result, folder


@pytest.fixture
def checkpoints(straight: tuple[TrialResult, Path], tmp_path: Path, real_data: Path) -> Path:
    """A fresh copy of the straight run's checkpoint folder, free to damage."""
    return Path(shutil.copytree(straight[1], tmp_path / "ckpt"))


def flip_middle(file: Path, count: int = 64) -> None:
    """The issue's damage: 64 bytes in the middle of the file set to 0xff (16 float32 nan where they hit a tensor)."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = b"\xff" * count
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def empty(file: Path) -> None:
    file.write_bytes(b"")


def garble(file: Path) -> None:
    file.write_bytes(torch.randint(0, 256, (file.stat().st_size,), generator=torch.Generator().manual_seed(1),
                                   dtype=torch.uint8).numpy().tobytes())


def garble_pickle(file: Path) -> None:
    """Bytes flipped inside the archive's pickle (its first kilobyte), the rest intact."""
    data = bytearray(file.read_bytes())
    start = data.find(b"data.pkl") + 40
    data[start : start + 32] = bytes(b ^ 0x5A for b in data[start : start + 32])
    file.write_bytes(bytes(data))


def garble_text(file: Path) -> None:
    """A name inside the pickle made invalid UTF-8 (``torch.load`` raises UnicodeDecodeError)."""
    data = bytearray(file.read_bytes())
    start = data.find(b"trainable")
    data[start : start + 9] = b"\xff" * 9
    file.write_bytes(bytes(data))


FAULTS: dict[str, Callable[[Path], None]] = {"flipped": flip_middle, "truncated": truncate, "emptied": empty,
                                             "garbled": garble, "garbled_pickle": garble_pickle,
                                             "garbled_text": garble_text}


def damage(folder: Path, fault: str, rewrite_digest: bool = False) -> Path:
    """Damage ``folder``'s payload; with ``rewrite_digest`` the checksum is made to match the damage (as when a
    file was corrupted before it was hashed, or its checksum was copied along with the damage)."""
    file = folder / PAYLOAD
    FAULTS[fault](file)
    if rewrite_digest:
        (folder / DIGEST).write_text(f"{file_sha256(file)}  {PAYLOAD}\n")
    return file


def _trainable(result: TrialResult) -> dict[str, torch.Tensor]:
    return {n: p for n, p in _trainable_state_params(SimpleNamespace(model=result.model, head=result.head)
                                                      ).items()}


# --------------------------------------------------------------------------------------------------------------------
# Reading one checkpoint
# --------------------------------------------------------------------------------------------------------------------


def test_checkpoints_carry_a_checksum_that_matches(checkpoints: Path) -> None:
    for folder in sorted(checkpoints.iterdir()):
        assert (folder / DIGEST).read_text() == f"{file_sha256(folder / PAYLOAD)}  {PAYLOAD}\n"
        assert sorted(p.name for p in folder.iterdir()) == [PAYLOAD, DIGEST]  # no temporaries left


@pytest.mark.parametrize("rewrite_digest", [False, True], ids=["checksum-kept", "checksum-rewritten"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_damage_is_one_clear_error_naming_the_file(checkpoints: Path, fault: str, rewrite_digest: bool) -> None:
    folder = checkpoints / "step_0000004"
    file = damage(folder, fault, rewrite_digest)
    trial = loop.setup(_config())
    with pytest.raises(CheckpointCorrupt) as caught:
        read_checkpoint(trial, folder)
    assert caught.value.path == file and str(caught.value).startswith(f"{file}: ")
    if not rewrite_digest:
        assert "SHA-256" in str(caught.value)
    elif fault in WHY:
        assert WHY[fault] in str(caught.value)


WHY = {"flipped": "(16 of", "truncated": "RuntimeError: PytorchStreamReader failed reading zip archive",
       "emptied": "EOFError", "garbled": "UnpicklingError", "garbled_text": "UnicodeDecodeError"}


def test_nan_weights_under_a_matching_checksum_are_refused(checkpoints: Path) -> None:
    """The issue's 16 nan in wte, damaged before hashing (the checksum matches): still refused, as non-finite."""
    folder = checkpoints / "step_0000004"
    payload = torch.load(folder / PAYLOAD, weights_only=True)
    payload["trainable"]["model.wte.weight"].view(-1)[1000:1016] = float("nan")
    write_payload(payload, folder)
    with pytest.raises(CheckpointCorrupt, match=r"non-finite weights: model\.wte\.weight \(16 of \d+ non-finite\)"):
        read_checkpoint(loop.setup(_config()), folder)


def test_non_finite_optimizer_state_is_refused(checkpoints: Path) -> None:
    folder = checkpoints / "step_0000004"
    payload = torch.load(folder / PAYLOAD, weights_only=True)
    next(iter(payload["optimizer"]["state"].values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    write_payload(payload, folder)
    with pytest.raises(CheckpointCorrupt, match=r"non-finite optimizer state: optimizer\.state\[0\]\.exp_avg_sq"):
        read_checkpoint(loop.setup(_config()), folder)


def test_a_checkpoint_without_checksum_is_read_with_a_warning_but_still_checked(checkpoints: Path) -> None:
    folder = checkpoints / "step_0000004"
    (folder / DIGEST).unlink()
    with pytest.warns(CheckpointWarning, match=f"{folder / PAYLOAD}: no {DIGEST}"):
        read_payload(folder)
    payload = torch.load(folder / PAYLOAD, weights_only=True)
    payload["trainable"]["model.wte.weight"][0, 0] = float("nan")
    torch.save(payload, folder / PAYLOAD)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointCorrupt, match="non-finite weights"):
        read_checkpoint(loop.setup(_config()), folder)


@pytest.mark.parametrize("content", ["", "not a digest\n", "\xff\xfe"])
def test_a_damaged_checksum_file_is_itself_named(checkpoints: Path, content: str) -> None:
    folder = checkpoints / "step_0000004"
    (folder / DIGEST).write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointCorrupt) as caught:
        read_payload(folder)
    assert caught.value.path == folder / DIGEST


def test_candidates_are_the_folder_then_its_older_siblings_newest_first(tmp_path: Path) -> None:
    for name in ("checkpoint_000001", "checkpoint_000010", "checkpoint_000002", "checkpoint_000011",
                 "checkpoint_tmp_ab12", "step_0000003"):
        (tmp_path / name).mkdir()
    assert [p.name for p in resume_candidates(tmp_path / "checkpoint_000010")] == [
        "checkpoint_000010", "checkpoint_000002", "checkpoint_000001"]
    assert resume_candidates(tmp_path / "other") == [tmp_path / "other"]


# --------------------------------------------------------------------------------------------------------------------
# Resuming a trial
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["flipped", "truncated"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(
    straight: tuple[TrialResult, Path], checkpoints: Path, fault: str
) -> None:
    bad = damage(checkpoints / "step_0000004", fault)
    with pytest.warns(CheckpointWarning, match=f"skipping damaged checkpoint {bad}"):
        resumed = run_trial(_config(), resume_from=checkpoints / "step_0000004")
    record = resumed.record
    assert record.status == "completed" and record.resumed_from_step == 2
    assert str(bad) in record.notes["checkpoint_fallback"]
    assert str(checkpoints / "step_0000002") in record.notes["checkpoint_fallback"]
    expected, got = _trainable(straight[0]), _trainable(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)  # resumed exactly, from step 2
    assert record.test == straight[0].record.test


def test_no_good_checkpoint_is_one_clear_error_naming_each(checkpoints: Path) -> None:
    bad = [damage(checkpoints / "step_0000004", "truncated"), damage(checkpoints / "step_0000002", "flipped")]
    with pytest.warns(CheckpointWarning), pytest.raises(NoGoodCheckpoint) as caught:
        run_trial(_config(), resume_from=checkpoints / "step_0000004")
    assert [p.path for p in caught.value.problems] == bad
    assert all(str(path) in str(caught.value) for path in bad)
    assert isinstance(caught.value, CheckpointError)  # what sweeps/train.py reports with exit code 2


def test_cli_resume_with_no_good_checkpoint_exits_2_naming_the_checkpoints(checkpoints: Path, capsys) -> None:
    bad = [damage(checkpoints / "step_0000004", "emptied"), damage(checkpoints / "step_0000002", "garbled")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        code = main([*CLI, "--resume", str(checkpoints / "step_0000004")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: no usable checkpoint to resume from") and "Traceback" not in err
    assert all(f"{path}: " in err for path in bad)


def test_cli_resume_falls_back_and_completes(checkpoints: Path, capsys) -> None:
    damage(checkpoints / "step_0000004", "garbled_pickle", rewrite_digest=True)
    with pytest.warns(CheckpointWarning, match="step_0000004"):
        code = main([*CLI, "--resume", str(checkpoints / "step_0000004")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert '"resumed_from_step": 2' in captured.out and '"status": "completed"' in captured.out


# --------------------------------------------------------------------------------------------------------------------
# The Ray trainable (run in this process: Tune's session calls replaced here)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tune_session(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], list[dict]]]:
    """Make ``ray_trial.trainable`` run here, resuming from a given Ray checkpoint folder; returns its reports."""
    reports: list[dict] = []

    def start(checkpoint: Path) -> list[dict]:
        monkeypatch.setattr(ray_trial.tune, "get_checkpoint", lambda: ray_trial.tune.Checkpoint(str(checkpoint)))
        monkeypatch.setattr(ray_trial.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
        monkeypatch.setattr(ray_trial.ray, "get_runtime_context",
                            lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
        return reports

    yield start


def _ray_trial_folder(checkpoints: Path, tmp_path: Path) -> Path:
    """Ray's layout of a trial's storage: checkpoint_000000 (step 2), checkpoint_000001 (step 4)."""
    trial_dir = tmp_path / "ray" / "sweep" / "trainable_abc_00000"
    trial_dir.mkdir(parents=True)
    for index, step in enumerate((2, 4)):
        shutil.copytree(checkpoints / f"step_{step:07d}", trial_dir / f"checkpoint_{index:06d}")
    return trial_dir


def _final(reports: list[dict]) -> FinalRecord:
    finals = [r for r in (record_from_report(m) for m in reports) if isinstance(r, FinalRecord)]
    assert len(finals) == 1
    return finals[0]


def test_ray_trial_falls_back_to_the_checkpoint_ray_kept_before(checkpoints: Path, tmp_path: Path,
                                                               tune_session) -> None:
    trial_dir = _ray_trial_folder(checkpoints, tmp_path)
    bad = damage(trial_dir / "checkpoint_000001", "flipped")
    reports = tune_session(trial_dir / "checkpoint_000001")
    spec = {"trial_id": "method-full-1", "config": _config().to_flat()}
    with pytest.warns(CheckpointWarning, match=str(bad)):
        ray_trial.trainable({"trial": spec})
    record = _final(reports)
    assert record.status == "completed" and record.resumed_from_step == 2
    assert str(bad) in record.notes["checkpoint_fallback"]


def test_ray_trial_with_no_good_checkpoint_is_recorded_failed_with_a_clear_error(
    checkpoints: Path, tmp_path: Path, tune_session
) -> None:
    trial_dir = _ray_trial_folder(checkpoints, tmp_path)
    bad = [damage(trial_dir / "checkpoint_000001", "truncated"), damage(trial_dir / "checkpoint_000000", "emptied")]
    reports = tune_session(trial_dir / "checkpoint_000001")
    spec = {"trial_id": "method-full-1", "config": _config().to_flat()}
    with pytest.warns(CheckpointWarning):
        ray_trial.trainable({"trial": spec}, export_root=str(tmp_path / "exports"))
    record = _final(reports)
    assert record.status == "failed" and record.error.startswith("no usable checkpoint to resume from")
    assert all(str(path) in record.error for path in bad)
    assert not (tmp_path / "exports").exists()


# --------------------------------------------------------------------------------------------------------------------
# Non-finite weights: never saved, recorded as a result, or exported
# --------------------------------------------------------------------------------------------------------------------


def _poison_after_step(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """After optimizer step ``at_step`` (its loss finite), 16 entries of wte become nan, as an overflowing update
    would leave them."""
    shipped = loop.optimizer_step

    def step_then_poison(trial, group, grads=None):
        record = shipped(trial, group, grads)
        if trial.state.step == at_step:
            with torch.no_grad():
                trial.model.wte.weight.view(-1)[:16] = float("nan")
        return record

    monkeypatch.setattr(loop, "optimizer_step", step_then_poison)


def test_non_finite_final_weights_are_diverged_not_completed(real_data, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    _poison_after_step(monkeypatch, 6)  # the last step: the loop ends "completed" as far as losses tell
    config = _config()
    result = run_trial(config)
    record = result.record
    assert record.status == "diverged" and record.diverged_at_step == 6 and record.db_status == "diverged"
    assert "model.wte.weight (16 of" in record.notes["non_finite_weights"]
    assert record.test == {} and record.validation == {}
    export(result, config, tmp_path / "out")  # the record, never the non-finite weights
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"result.json", "config.yaml"}


def test_non_finite_weights_are_never_checkpointed(real_data, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    _poison_after_step(monkeypatch, 4)  # a checkpoint step: the check comes before any later loss could tell
    events: list = []
    record = run_trial(_config(), events.append, checkpoint_dir=tmp_path).record
    assert record.status == "diverged" and record.diverged_at_step == 4 and record.step == 4
    assert [Path(e.path).name for e in events if isinstance(e, CheckpointRecord)] == ["step_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002"]


def test_saving_non_finite_weights_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=16))
    with torch.no_grad():
        model.wte.weight[3, :4] = float("inf")
    with pytest.raises(NonFiniteWeightsError) as caught:
        model.save_pretrained(tmp_path / "model")
    assert str(tmp_path / "model" / "model.safetensors") in str(caught.value)
    assert "transformer.wte.weight (4 of 3200 non-finite)" in str(caught.value)
    assert not (tmp_path / "model").exists()
