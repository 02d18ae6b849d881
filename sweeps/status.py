"""``launch.py status`` and ``summary``: a sweep's progress and results, read from the database."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis import queries
from analysis.db import connect
from sweeps.driver import FAILED_TRIALS_EXIT, LaunchError

# `launch.py status` exits UNFINISHED_EXIT when a sweep it shows is unfinished: interrupted (a signal, a full disk, a
# crash), or marked running while no driver holds the database (a killed driver: a running one locks the file, and
# status then exits 2 naming the lock). Else FAILED_TRIALS_EXIT when one ended with failed trials; else 0.
UNFINISHED_EXIT = 4


def cmd_status(args: argparse.Namespace) -> int:
    con = connect(args.db, read_only=True)
    try:
        sweeps = queries.sweep_progress(con, getattr(args, "sweep", None))
    finally:
        con.close()
    if not sweeps:
        if getattr(args, "sweep", None):
            raise LaunchError(f"{args.db}: no sweep named {args.sweep}")
        print(f"{args.db}: no sweeps yet")
        return 0
    print(f"{'sweep':<36} {'study':<8} {'status':<12} {'model':<10} {'done':>9} {'bad':>5} {'open':>5}")
    for sid, study, status, init, planned, done, bad, open_, _, _ in sweeps:
        print(f"{sid:<36} {study:<8} {status:<12} {init or '':<10} {f'{done}/{planned}':>9} {bad:>5} {open_:>5}")
    unfinished = [row[0] for row in sweeps if row[2] != "completed"]
    failed = [row[0] for row in sweeps if row[2] == "completed" and row[9]]
    if unfinished:
        print(f"unfinished (exit code {UNFINISHED_EXIT}): {', '.join(unfinished)}; python sweeps/launch.py resume "
              f"--db {args.db} --sweep <id> continues one", file=sys.stderr)
        return UNFINISHED_EXIT
    if failed:
        print(f"ended with failed trials (exit code {FAILED_TRIALS_EXIT}): {', '.join(failed)}; python "
              f"sweeps/launch.py resume --retry-failed --db {args.db} --sweep <id> runs them again", file=sys.stderr)
        return FAILED_TRIALS_EXIT
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """A short table of a sweep's results (the guide, issue 6, is the full report)."""
    from analysis.queries import group_summary, latest_sweep

    con = connect(args.db, read_only=True)
    sweep_id = args.sweep or latest_sweep(con)
    if sweep_id is None:
        raise LaunchError(f"{args.db}: no sweeps yet")
    rows = group_summary(con, sweep_id)
    con.close()
    print(f"database: {Path(args.db).resolve()}\nsweep {sweep_id}")
    if rows and rows[0][-1] != "pretrained":
        print(f"!! model_init={rows[0][-1]}: these numbers check the pipeline; they are no finding about pretrained GPT-2")
    print(f"{'task':<10} {'dimension':<13} {'group':<11} {'lr':>8} {'done':>4} {'test metric (mean ± sd)':>28} "
          f"{'trainable':>12} {'s/trial':>8}")
    for task, dim, group, _, lr, done, other, metric, _, mean, sd, params, wall, _ in rows:
        shown = f"{metric} {mean:.4f} ± {sd:.4f}" if mean is not None and sd is not None else (
            f"{metric} {mean:.4f} (1 seed)" if mean is not None else "-")
        print(f"{task:<10} {dim:<13} {group:<11} {lr:>8.1e} {done:>4} {shown:>28} {params or 0:>12,.0f} "
              f"{wall or 0:>8.1f}" + (f"  ({other} not completed)" if other else ""))
    return 0

