"""Launch, resume and inspect sweeps. Ray Tune runs the trials; the driver alone writes the DuckDB file.

    python sweeps/launch.py grid --study smoke                  # every planned trial of a study
    python sweeps/launch.py grid --study guide --dry-run        # the trial table and a cost estimate; starts nothing
    python sweeps/launch.py grid --study guide --address auto --gpus-per-trial 0.5 --storage s3://bucket/sweeps
    python sweeps/launch.py search --task sms_spam --method lora --num-samples 20   # Optuna + ASHA
    python sweeps/launch.py resume                              # continue the last interrupted sweep
    python sweeps/launch.py resume --retry-failed               # ... and run its failed trials again
    python sweeps/launch.py status                              # progress of every sweep, from the database
    python sweeps/launch.py preflight                           # sweeps/preflight.py: this GPU, checked and timed

Bad input (malformed study, unknown key, unsatisfiable resources) prints every problem and exits with code 2 before
anything starts.

Exit codes of grid, search and resume: 0 when every trial ended completed, diverged or stopped; 3 (FAILED_TRIALS_EXIT)
when the sweep ran to its end but some trials ended ``failed`` (each named with its error's line on stderr; every
other result is kept in the database; ``resume --retry-failed`` runs them again); 2 for bad input; 130 (SIGINT,
Ctrl-C) or 143 (SIGTERM) when a signal stopped the sweep: it and its running trials are marked ``interrupted`` and
one line gives the command that resumes it (a second signal stops at once); anything else (1: an uncaught error)
means the sweep stopped early: ``resume`` continues it.

Exit codes of status: 0 when every sweep shown completed with no failed trial; 4 when one is unfinished
(interrupted, or marked running with no driver holding the database); else 3 when one ended with failed trials; 2 for
a missing or locked database.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and sys.argv[1:2] == ["preflight"]:
    # The preflight needs neither Ray nor DuckDB (a bare GPU machine may have neither): forwarded before the imports
    # below, which need DuckDB. main() forwards it the same way when called in-process.
    from sweeps.preflight import main as preflight_main

    sys.exit(preflight_main(sys.argv[2:]))

import sweeps.cluster  # noqa: F401  (Ray's environment defaults, before any import of Ray)
from analysis.db import DEFAULT_DB, DatabaseError
from model import ConfigError, TokenizerError
from model.methods import METHODS
from sweeps import interrupts
from sweeps.config import name_problem
from sweeps.costs import PREFLIGHT_REPORT
from sweeps.driver import DEFAULT_STORAGE, TENSORBOARD_HELP, LaunchError, cmd_grid, split_list
from sweeps.resume import cmd_resume
from sweeps.search import cmd_search
from sweeps.status import cmd_status, cmd_summary
from tasks import DataError

TRIAL_COMMANDS = ("grid", "search", "resume")  # the commands that run trials (and handle SIGINT and SIGTERM)


def _name_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """A sweep id becomes a folder under --storage (Ray's experiment state, checkpoints): only a safe name."""
    named = [("--name", getattr(args, "name", None))]
    if args.command == "resume":
        named.append(("--sweep", args.sweep))
    return [(flag, f"{message}; choose another sweep id") for flag, value in named
            if value is not None and (message := name_problem(value)) is not None]


def _seed_problems(seeds: str | None) -> list[tuple[str, str]]:
    bad = [s for s in split_list(seeds) or [] if not re.fullmatch(r"\d+", s)]
    return [("--seeds", f"{', '.join(map(repr, bad))} is not an integer >= 0; pass comma-separated seeds, e.g. 0,1,2")
            ] if bad else []


def _resource_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Per-trial resources Ray could never schedule (it would wait forever) or would refuse after starting."""
    problems = []
    cpus, gpus = getattr(args, "cpus_per_trial", None), getattr(args, "gpus_per_trial", None)
    if cpus is not None and not (math.isfinite(cpus) and cpus > 0):
        problems.append(("--cpus-per-trial", f"must be a number > 0, got {cpus:g}"))
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        problems.append(("--gpus-per-trial", f"must be a number >= 0 (0: CPU only), got {gpus:g}"))
    elif gpus is not None and gpus > 1 and not gpus.is_integer():
        problems.append(("--gpus-per-trial", f"more than one GPU per trial must be a whole number, got {gpus:g}"))
    return problems


def _count_problems(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Counts that have a floor: trials at once, retries, search samples."""
    floors = (("--max-concurrent", "max_concurrent", 1), ("--max-failures", "max_failures", 0),
              ("--num-samples", "num_samples", 1))
    return [(flag, f"must be an integer >= {floor}, got {value}") for flag, attr, floor in floors
            if (value := getattr(args, attr, None)) is not None and value < floor]


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad command-line values, every one at once, before a study is read, the database opened or Ray
    started."""
    problems = [*_name_problems(args), *_seed_problems(getattr(args, "seeds", None)), *_resource_problems(args),
                *_count_problems(args)]
    if problems:
        raise ConfigError(problems, "invalid arguments")


def _where(p: argparse.ArgumentParser) -> None:
    """What every command that runs trials takes: the database and where Ray runs."""
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"DuckDB file (default {DEFAULT_DB})")
    p.add_argument("--address", help="a running Ray cluster (e.g. auto); default: start Ray on this machine")
    p.add_argument("--node-ip-address", help="this machine's address as the cluster knows it (multi-homed hosts)")


def _resources(p: argparse.ArgumentParser) -> None:
    """Each trial's resources, for a new sweep (a resumed one keeps those it recorded: ``sweeps.resume``)."""
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (default: 1 if "
                                                        "this machine has a GPU, else 0)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)


def _add_grid(sub: Any) -> None:
    grid = sub.add_parser("grid", help="run every planned trial of a study")
    grid.add_argument("--study", default="smoke", help="a shipped study (smoke, demo, guide) or a YAML path")
    grid.add_argument("--tasks", help="comma-separated subset of the study's tasks")
    grid.add_argument("--dimensions", help="comma-separated subset of the study's dimensions")
    grid.add_argument("--seeds", help="comma-separated seeds instead of the study's")
    grid.add_argument("--model", help="model.name for every trial")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key for all trials")
    grid.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    grid.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial from its checkpoint")
    grid.add_argument("--storage", help=f"Ray storage for experiment state and checkpoints (default {DEFAULT_STORAGE}"
                                        "; a cloud URI such as s3://bucket/path on clusters)")
    grid.add_argument("--name", help="sweep id (default: study name and UTC time)")
    grid.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    grid.add_argument("--dry-run", action="store_true", help="print the plan and its cost estimate only (measured "
                                                             "rates from --db's completed trials where it has them)")
    grid.add_argument("--preflight", type=Path, help="dry run: the rates a GPU preflight measured (sweeps/preflight.py"
                                                     f"'s JSON; default {PREFLIGHT_REPORT} where it exists) for trials "
                                                     "--db has no measured rates of")
    grid.add_argument("--format", choices=("text", "csv", "json"), default="text",
                      help="dry run: the plan as a table (text), or one row per trial as CSV or JSON on stdout (the "
                           "summary then goes to stderr)")
    _where(grid)
    _resources(grid)


def _add_search(sub: Any) -> None:
    search = sub.add_parser("search", help="Optuna search with ASHA over one method's hyperparameters")
    search.add_argument("--task", required=True)
    search.add_argument("--method", required=True, choices=METHODS)
    search.add_argument("--num-samples", type=int, default=16)
    search.add_argument("--study", default="demo", help="the study whose base config and task settings to start from")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    search.add_argument("--seed", type=int, default=0, help="the search algorithm's seed")
    search.add_argument("--max-concurrent", type=int)
    search.add_argument("--max-failures", type=int, default=2)
    search.add_argument("--storage")
    search.add_argument("--name")
    search.add_argument("--tensorboard", action="store_true", help=TENSORBOARD_HELP)
    _where(search)
    _resources(search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_grid(sub)
    _add_search(sub)
    resume = sub.add_parser("resume", help="continue an interrupted sweep (Tuner.restore)",
                            description="Continue an interrupted sweep. Its trials keep the per-trial CPUs and GPUs "
                                        "it recorded; Ray's restored experiment keeps the sweep's own limits on "
                                        "trials at once and retries.")
    resume.add_argument("--sweep", help="sweep id (default: the most recent)")
    resume.add_argument("--max-concurrent", type=int, help="trials at once, where trials run again from their plan "
                                                           "(Ray's state lost or torn, --retry-failed; default: as "
                                                           "resources allow)")
    resume.add_argument("--max-failures", type=int, default=2, help="retries of a failing trial from its checkpoint, "
                                                                    "where trials run again from their plan")
    resume.add_argument("--retry-failed", action="store_true",
                        help="also run again, from step 0, the trials that ended failed (not diverged or completed); "
                             "each earlier error is kept in the trial_retries table")
    _where(resume)

    status = sub.add_parser("status", help="progress of each sweep, from the database (exit code 4: one is "
                                           "unfinished; 3: one ended with failed trials)")
    status.add_argument("--db", type=Path, default=DEFAULT_DB)
    status.add_argument("--sweep", help="only this sweep (default: every sweep in the database)")

    summary = sub.add_parser("summary", help="a short table of a sweep's results")
    summary.add_argument("--db", type=Path, default=DEFAULT_DB)
    summary.add_argument("--sweep", help="sweep id (default: the most recent)")

    # listed for --help; main() hands everything after the word to sweeps/preflight.py's own parser
    sub.add_parser("preflight", add_help=False, help="check and time this GPU (sweeps/preflight.py; --help there)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["preflight"]:
        from sweeps.preflight import main as preflight_main

        return preflight_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        commands = {"grid": cmd_grid, "search": cmd_search, "resume": cmd_resume, "status": cmd_status,
                    "summary": cmd_summary}
        if args.command not in TRIAL_COMMANDS:
            return commands[args.command](args)
        with interrupts.guard():  # SIGINT and SIGTERM: sweeps/interrupts.py
            return commands[args.command](args)
    except (ConfigError, DatabaseError, LaunchError, DataError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as stop:  # before the sweep was recorded: nothing was written
        print(f"{stop.name} received before the sweep started; nothing was written", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())

