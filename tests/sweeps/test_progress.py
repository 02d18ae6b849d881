"""sweeps/progress.py: the progress line's formatting, and an ETA that weighs trials by their planned cost, runs the
rest as Ray would (each pending trial on the first slot to come free) and counts down between finishes."""

from __future__ import annotations

import re

import pytest

from sweeps.progress import estimate_eta, format_duration, progress_line, render_progress

PROGRESS = re.compile(r"^progress: (\d+)/(\d+) trials done(?: \((\d+) failed\))?, (\d+) running, (\d+) pending; "
                      r"elapsed (\d+:)?\d+:\d\d, (ETA (\d+:)?\d+:\d\d|ETA \?|finished)$", re.M)


def test_no_estimate_before_a_trial_has_run_start_to_end() -> None:
    assert estimate_eta([], [(1.0, 5.0)], [1.0, 1.0], slots=2) is None


def test_each_pending_trial_runs_on_the_first_slot_to_come_free() -> None:
    # 2 s a unit of cost (one trial of cost 1 took 2 s): the running trial has 2 s left
    finished = [(1.0, 2.0)]
    assert estimate_eta(finished, [(1.0, 0.0)], [5.0], slots=2) == 10.0  # the idle slot takes it now
    assert estimate_eta(finished, [(1.0, 0.0)], [5.0], slots=1) == 12.0  # it waits for the running one
    assert estimate_eta(finished, [], [1.0, 1.0, 1.0], slots=2) == 4.0  # 2 + 2 on one slot, 2 on the other


def test_the_eta_counts_down_between_finishes_and_is_never_negative() -> None:
    finished = [(10.0, 20.0)]
    at_start = estimate_eta(finished, [(10.0, 0.0), (10.0, 0.0)], [10.0, 10.0], slots=2)
    later = [estimate_eta(finished, [(10.0, t), (10.0, t)], [10.0, 10.0], slots=2) for t in (5.0, 15.0)]
    assert (at_start, *later) == (40.0, 35.0, 25.0)
    # a trial running past its estimate counts as about to end
    assert estimate_eta(finished, [(10.0, 60.0)], [], slots=2) == 0.0


def test_the_demos_eta_at_a_third_done_is_near_what_it_took() -> None:
    """Replayed from a measured `make demo` (2026-12-03, fresh clone, 2 CPU cores): 4 x n160 finished first (76 s
    each, 2 at a time), 4 x n32 and 4 x head_only_b remained; the sweep then took 243 s more. The planned costs
    (``trial_cost`` on the CPU) are 54.8 s for a 160-example trial and 33.8 s for a 32-example one. Counting trials
    alike (elapsed / done x left) said 321 s, 32% over; weighing them by cost comes within 5%."""
    n160, n32 = 54.8, 33.8
    eta = estimate_eta([(n160, 76.0)] * 4, [(n32, 0.0), (n32, 0.0)], [n32, n32] + [n160] * 4, slots=2)
    assert eta == pytest.approx(243.0, rel=0.05)


def test_progress_line_and_its_terminal_and_log_rendering() -> None:
    assert format_duration(5) == "0:05" and format_duration(61.6) == "1:02" and format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"
    line = progress_line(3, 1, 2, 5, 10, 125.0, 292.0)
    assert line == "progress: 3/10 trials done (1 failed), 2 running, 5 pending; elapsed 2:05, ETA 4:52"
    assert PROGRESS.fullmatch(line)
    assert progress_line(0, 0, 2, 8, 10, 3.0, None).endswith("elapsed 0:03, ETA ?")
    assert progress_line(10, 0, 0, 0, 10, 3600.0, None).endswith("elapsed 1:00:00, finished")
    # a log gets one plain line; a terminal gets the line redrawn in place: carriage return, cut to the width, the
    # rest of the old line cleared, and no newline
    assert render_progress(line, tty=False) == line + "\n"
    drawn = render_progress(line, tty=True, width=40)
    assert drawn == "\r" + line[:39] + "\x1b[K" and "\n" not in drawn
