"""``sweeps/launch.py`` with a test-only trainable around the shipped one: fault injection and a start barrier live
here, in the tests, instead of in ``sweeps.ray_trial``.

    python -m tests.sweeps.wrapped_launch grid --study smoke ...     # from the repository root; same arguments

It replaces ``sweeps.ray_trial.trainable`` with :func:`trainable` below and runs ``sweeps.launch.main``, whose commands
import ``trainable`` from ``sweeps.ray_trial`` when they run, so they pick up the wrapper. The wrapper does nothing
unless one of these (tests only) is set; the launcher hands its ``FINETUNE_*`` variables to the trials
(``sweeps.cluster.trial_env``, a parameter of the trainable):

``FINETUNE_TEST_FAIL_ONCE_DIR``
    each trial raises once, right after its first checkpoint reached Ray (a marker file named by the trial id in this
    directory remembers that it did); Ray then retries it from that checkpoint.
``FINETUNE_TEST_BARRIER_DIR`` (with ``FINETUNE_TEST_BARRIER_COUNT``, default 2, and ``FINETUNE_TEST_BARRIER_TIMEOUT_S``,
default 120)
    each trial first leaves a file named by its trial id in this directory, then waits until files from COUNT distinct
    trials are there: the first COUNT trials run at the same moment (each holding its resources), later ones pass
    straight through. Waiting longer than the timeout raises.
``FINETUNE_TEST_ALWAYS_FAIL``
    comma-separated trial-id prefixes: a trial whose id starts with one raises :class:`InjectedFailure` as it starts,
    every time it is tried (Ray retries it, then ends it errored).
``FINETUNE_TEST_GATE_DIR`` (with ``FINETUNE_TEST_GATE_PASS``, default 1)
    the first PASS trials to arrive take a ticket file (``pass-<n>``, created exclusively) and run; every later one
    leaves ``held-<trial id>`` and waits until its worker is killed (the test then signals the driver with trials
    finished and trials in flight).
``FINETUNE_TEST_HOLD_AFTER_CHECKPOINTS``
    N: each trial, right after its Nth checkpoint reached Ray, waits until its worker is killed (the test then kills
    the driver with trials in flight whose checkpoints Ray has rotated N-1 times).

Ray pickles the wrapper by reference (``tests.sweeps.wrapped_launch.trainable``), so workers import this module. They
can: ``tests`` is not part of the editable install, but Ray puts the driver's working directory (the repository root)
on every worker's ``sys.path`` (``ray/_private/worker.py``, ``job_config._py_driver_sys_path``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

import sweeps.launch as launch  # first, as `python sweeps/launch.py` does: it sets Ray's environment defaults
import sweeps.ray_trial as ray_trial

FAIL_ONCE_DIR = "FINETUNE_TEST_FAIL_ONCE_DIR"
BARRIER_DIR = "FINETUNE_TEST_BARRIER_DIR"
BARRIER_COUNT = "FINETUNE_TEST_BARRIER_COUNT"
BARRIER_TIMEOUT_S = "FINETUNE_TEST_BARRIER_TIMEOUT_S"
ALWAYS_FAIL = "FINETUNE_TEST_ALWAYS_FAIL"
HOLD_AFTER_CHECKPOINTS = "FINETUNE_TEST_HOLD_AFTER_CHECKPOINTS"
GATE_DIR = "FINETUNE_TEST_GATE_DIR"
GATE_PASS = "FINETUNE_TEST_GATE_PASS"

_shipped_trainable = ray_trial.trainable  # taken at import, before install() swaps the attribute


class InjectedFailure(RuntimeError):
    """The failure a trial raises after its first checkpoint under FINETUNE_TEST_FAIL_ONCE_DIR, or at every start
    under FINETUNE_TEST_ALWAYS_FAIL."""


def wait_at_barrier(directory: Path, name: str, count: int, timeout_s: float) -> None:
    """Arrive as ``name`` and wait until ``count`` distinct names have arrived (at most ``timeout_s``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).touch()
    deadline = time.monotonic() + timeout_s
    while True:
        arrived = sorted(p.name for p in directory.iterdir())
        if len(arrived) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"test barrier {directory}: trial {name} waited {timeout_s:g} s for {count} trials to "
                               f"run at the same time; only {arrived} arrived (were they all placed on one node?)")
        time.sleep(0.2)


def pass_or_hold(directory: Path, name: str, passes: int) -> None:
    """Run on if one of ``passes`` tickets is still free, else mark ``name`` held and wait for ever."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(passes):
        try:
            os.close(os.open(directory / f"pass-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return
        except FileExistsError:
            continue
    (directory / f"held-{name}").touch()
    while True:
        time.sleep(1)


def _fail_once_after_first_checkpoint(report: Any, marker: Path) -> Any:
    def report_then_fail(metrics: dict, *, checkpoint: Any = None) -> None:
        report(metrics, checkpoint=checkpoint)
        if checkpoint is not None and not marker.exists():
            marker.touch()
            raise InjectedFailure(f"injected failure after step {metrics.get('step')} (test wrapper {FAIL_ONCE_DIR})")

    return report_then_fail


def _hold_after_checkpoints(report: Any, count: int) -> Any:
    seen = [0]

    def report_then_hold(metrics: dict, *, checkpoint: Any = None) -> None:
        report(metrics, checkpoint=checkpoint)
        seen[0] += checkpoint is not None
        while seen[0] >= count:
            time.sleep(1)

    return report_then_hold


def trainable(param: dict[str, Any], finished: dict[str, str] | None = None, export_root: str | None = None,
              env: dict[str, str] | None = None) -> None:
    """``sweeps.ray_trial.trainable`` with the test behaviours above (same name, so Tune names trials the same)."""
    os.environ.update(env or {})  # the launcher's variables, the FINETUNE_TEST_* ones among them
    trial = ray_trial.spec_from_param(param)["trial_id"]
    doomed = [p for p in os.environ.get(ALWAYS_FAIL, "").split(",") if p]
    if any(trial.startswith(p) for p in doomed):
        raise InjectedFailure(f"injected failure of trial {trial} (test wrapper {ALWAYS_FAIL})")
    gate = os.environ.get(GATE_DIR)
    if gate:
        pass_or_hold(Path(gate), trial, int(os.environ.get(GATE_PASS, "1")))
    hold = int(os.environ.get(HOLD_AFTER_CHECKPOINTS) or 0)
    if hold:
        shipped_report = tune.report
        tune.report = _hold_after_checkpoints(shipped_report, hold)
        try:
            return _shipped_trainable(param, finished=finished, export_root=export_root, env=env)
        finally:
            tune.report = shipped_report
    barrier = os.environ.get(BARRIER_DIR)
    if barrier:
        wait_at_barrier(Path(barrier), trial, int(os.environ.get(BARRIER_COUNT, "2")),
                        float(os.environ.get(BARRIER_TIMEOUT_S, "120")))
    fail_dir = os.environ.get(FAIL_ONCE_DIR)
    if not fail_dir:
        return _shipped_trainable(param, finished=finished, export_root=export_root, env=env)
    # ray_trial calls ``tune.report`` through the module at call time; one trial runs in this worker at a time
    shipped_report = tune.report
    tune.report = _fail_once_after_first_checkpoint(shipped_report, Path(fail_dir) / trial)
    try:
        return _shipped_trainable(param, finished=finished, export_root=export_root, env=env)
    finally:
        tune.report = shipped_report


def install() -> None:
    """Make the launcher's commands use :func:`trainable`."""
    ray_trial.trainable = trainable


def main(argv: list[str] | None = None) -> int:
    install()
    return launch.main(argv)


if __name__ == "__main__":
    # run as ``python -m``: this copy is ``__main__``; use the importable module so Ray pickles the wrapper by reference
    from tests.sweeps import wrapped_launch

    sys.exit(wrapped_launch.main())
