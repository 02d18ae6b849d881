"""The sweep driver's progress line: trials done, running and pending, the time elapsed, and an ETA. Ray-free, so the
estimate is tested as plain arithmetic; ``sweeps.ray_trial.DuckDBCallback`` feeds it Tune's trials."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

PROGRESS_INTERVAL_S = "FINETUNE_PROGRESS_INTERVAL_S"  # seconds between plain progress lines (not a terminal)
DEFAULT_PROGRESS_INTERVAL_S = 30.0


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(max(seconds, 0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(done: int, failed: int, running: int, pending: int, total: int, elapsed_s: float,
                  eta_s: float | None) -> str:
    """One progress line: trials done (of them failed), running and pending; elapsed time and an ETA."""
    return (f"progress: {done}/{total} trials done" + (f" ({failed} failed)" if failed else "")
            + f", {running} running, {pending} pending; elapsed {format_duration(elapsed_s)}, "
            + (f"ETA {format_duration(eta_s)}" if done < total else "finished"))


def render_progress(line: str, tty: bool, width: int = 100) -> str:
    """How a progress line is written: on a terminal redrawn in place (carriage return, cut to the width, rest of
    the line cleared, no newline); in a log one plain line."""
    return f"\r{line[:max(width - 1, 1)]}\x1b[K" if tty else line + "\n"


def estimate_eta(finished: Sequence[tuple[float, float]], running: Sequence[tuple[float, float]],
                 pending: Sequence[float], slots: int) -> float | None:
    """Seconds until the last trial ends; None before a trial has run start to end under this driver.

    Trials differ in size (the demo's 32-example trials take 60% of its 160-example ones), so each trial weighs its
    planned cost (``sweeps.costs.trial_cost``, any consistent unit). ``finished``: ``(cost, seconds)`` of trials
    that completed here; their seconds per unit of cost scale every other trial's. ``running``: ``(cost, seconds so
    far)``; ``pending``: costs, in the order Ray starts them; ``slots``: trials run at once. The estimate runs the
    rest as Ray would: each pending trial on the first slot to come free. Between finishes it counts down, as the
    running trials' time left shrinks; a trial running past its estimate counts as about to end."""
    if not finished:
        return None
    per_cost = sum(seconds for _, seconds in finished) / max(sum(cost for cost, _ in finished), 1e-12)
    free_at = [max(per_cost * cost - ran, 0.0) for cost, ran in running]  # when each busy slot frees up
    free_at += [0.0] * max(max(slots, 1) - len(free_at), 0)
    heapq.heapify(free_at)
    end = max(free_at)
    for cost in pending:
        ends = heapq.heappop(free_at) + per_cost * cost
        end = max(end, ends)
        heapq.heappush(free_at, ends)
    return end
