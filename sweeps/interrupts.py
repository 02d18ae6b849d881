"""Ctrl-C and SIGTERM on the sweep driver: the common fault, handled as safely as a crash.

The first SIGINT or SIGTERM asks Ray Tune to stop the way its own Ctrl-C handler does: the controller leaves its loop,
saves the experiment state one last time (trials still marked running, so ``Tuner.restore`` resumes them from their
newest checkpoint) and ends the trial actors. ``fit`` then raises :class:`Interrupted`, and the driver marks the
sweep and its running trials ``interrupted`` and exits 128 + the signal's number (130, 143) with the command that
resumes it. A second signal raises at once, except inside ``held()``: a database write is never cut in half.

Ray's own SIGINT handler is off (``TUNE_DISABLE_SIGINT_HANDLER``) and its messages about the stop are hidden: they
name ``Tuner.restore``, a Ray API, where this project's ``launch.py resume`` is what users run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from analysis.db import exception_chain

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Ray Tune's controller stops gracefully on SIGUSR1 too, through the handler tune.run installs for it; we call that
# handler ourselves for SIGINT and SIGTERM.
_RAY_STOP = getattr(signal, "SIGUSR1", None)
# What Ray Tune logs about a stop (ray/tune/tune.py): its Ctrl-C hint, its Tuner.restore hint, its list of
# unfinished trials. The driver prints its own line instead.
_RAY_STOP_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Training has been interrupted",
                      "Trials did not complete")


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """The sweep was stopped by a signal; ``exit_code`` is the shell's 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _not_a_ray_stop_message(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_RAY_STOP_MESSAGES)


class InterruptGuard:
    """Installed for a sweep's run (``guard()``); what the signal handlers and ``fit`` share."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.count = 0
        self._held = 0
        self._pending = False
        self._in_fit = False
        self._ignoring = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by tune.run when it starts: ours stays installed
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        logging.getLogger("ray.tune.tune").addFilter(_not_a_ray_stop_message)

    def reclaim(self) -> None:
        """Take SIGINT and SIGTERM back: ``ray.init`` installs a SIGTERM handler of its own in the driver (Ray's core
        worker logs the signal and exits 1)."""
        for signum in SIGNALS:
            if signal.getsignal(signum) is not self._handle:
                signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        logging.getLogger("ray.tune.tune").removeFilter(_not_a_ray_stop_message)

    def ignore(self) -> None:
        """From now on a signal changes nothing (the driver's closing writes, a few milliseconds, then the exit)."""
        self._ignoring = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self._ignoring:
            return
        self.count += 1
        if self.signum is None:
            self.signum = signum
        if self.count == 1:
            name = signal.Signals(signum).name
            print(f"\n{name} received: stopping the sweep (Ray saves its state, running trials stop at their newest "
                  "checkpoint); send it again to stop at once", file=sys.stderr, flush=True)
            ray_stop = signal.getsignal(_RAY_STOP) if self._in_fit and _RAY_STOP is not None else None
            if callable(ray_stop):
                ray_stop(_RAY_STOP, frame)
                return
        if self._held:
            self._pending = True
            return
        raise Interrupted(self.signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A signal inside waits for its end (a database write is whole or not made)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending:
            self._pending = False
            raise Interrupted(self.signum or signal.SIGINT)

    def fit(self, tuner: Any) -> Any:
        """``tuner.fit()``, raising Interrupted when a signal stopped it (Ray then returns normally)."""
        if self.signum is not None:
            raise Interrupted(self.signum)
        before = signal.getsignal(_RAY_STOP) if _RAY_STOP is not None else None
        self.reclaim()
        self._in_fit = True
        try:
            results = tuner.fit()
        except Exception as err:  # Interrupted itself is a BaseException and passes through
            if self.signum is not None:  # a second signal raised inside Ray's compiled code: see interrupt_in
                raise interrupt_in(err) or Interrupted(self.signum) from err
            raise
        finally:
            self._in_fit = False
            if _RAY_STOP is not None:  # tune.run's handler stays installed after it returns: put back the earlier one
                signal.signal(_RAY_STOP, before)
        if self.signum is not None:
            raise Interrupted(self.signum)
        return results


_active: InterruptGuard | None = None


def interrupt_in(err: BaseException) -> Interrupted | None:
    """The Interrupted that ``err`` is, or was raised while handling or because of, if any.

    A second signal raises Interrupted wherever the main thread is. Inside a Cython function of Ray's core worker
    (``ray.wait``) the interpreter reports that as ``SystemError: ... returned a result with an exception set``,
    with the Interrupted as its ``__cause__``; Ray Tune's loop then cleans up and raises the SystemError."""
    return next((e for e in exception_chain(err) if isinstance(e, Interrupted)), None)


@contextlib.contextmanager
def guard() -> Iterator[InterruptGuard]:
    """SIGINT and SIGTERM handled as above while this lasts (the main thread only; the earlier handlers after)."""
    global _active
    current = InterruptGuard()
    current.install()
    previous, _active = _active, current
    try:
        yield current
    finally:
        _active = previous
        current.uninstall()


def fit(tuner: Any) -> Any:
    """Every sweep's ``tuner.fit()`` goes through here: inside ``guard()`` an interrupt raises Interrupted."""
    return _active.fit(tuner) if _active is not None else tuner.fit()


def stopping() -> bool:
    """Whether a signal is stopping the sweep (Ray then ends its trials in a way that looks like their end)."""
    return _active is not None and _active.signum is not None


def reclaim() -> None:
    """``InterruptGuard.reclaim`` of the active guard (after ``ray.init``)."""
    if _active is not None:
        _active.reclaim()


def ignore() -> None:
    """``InterruptGuard.ignore`` of the active guard."""
    if _active is not None:
        _active.ignore()


def held() -> contextlib.AbstractContextManager[None]:
    """``InterruptGuard.held`` of the active guard (nothing to hold outside one)."""
    return _active.held() if _active is not None else contextlib.nullcontext()
