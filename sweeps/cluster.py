"""Ray on this machine or a cluster: start or join it, and refuse per-trial resources no node can give.

Imported before Ray is: the environment defaults below must be set before ``import ray``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from model import ConfigError
from model.tokenizer import CACHE_ENV, DATA_DIR_ENV
from sweeps import interrupts

# Ray's experiment state (every trial's status, last result and checkpoints, in one JSON file) is saved on Ray's own
# schedule ("auto": every 10 s, or every 19 save-times when a save is slow, so saves take at most 5% of the driver's
# time; and whenever a trial has made KEEP_CHECKPOINTS checkpoints since the last save, so the state keeps up with the
# checkpoints Ray deletes). Saving it at every controller step (TUNE_GLOBAL_CHECKPOINT_S=0) made the 87-trial smoke
# sweep take 104 s instead of 68 s on 2 CPU cores (2026-12-03), and its cost grows with the number of trials squared.
# A driver killed between saves loses nothing: the database has every result, trials it holds as finished are never
# trained again (``trial_trainable``), and the others resume from the newest checkpoint the saved state names
# (``launch.py resume`` repairs one that is gone).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # results live in DuckDB, not CSV/TensorBoard
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry unless the user opts in
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # the forced saves are deliberate
# A Ray node prestarts a Python worker per CPU for its first driver. Tune's trial actors never run in them (each starts
# a worker of its own), so on a local Ray they only cost ~0.5 s of CPU each, then sit idle (2 CPUs, 2026-12-07).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


# Ray's driver uploads its experiment state (<storage>/<sweep>: experiment_state-*.json, the searcher's state) from a
# staging directory in a background thread, while the next save writes
# it again. Ray writes the searcher's state as ".<uuid>-tmp-<name>" and renames it into place
# (ray/tune/utils/util.py _atomic_save); an upload that listed the directory before that rename fails on the vanished
# file with FileNotFoundError, and Ray logs the traceback (ray/train/_internal/syncer.py _launch_sync_process;
# ray/tune/execution/experiment_state.py wait_for_sync). Harmless: the file is there under its final name, Ray starts
# the next upload at once, and a run ends with an upload it waits for; trial checkpoints never go this way (trials
# write them to storage themselves). Only that failure is hidden; every other sync error still shows.
_RAY_TEMP_FILE_GONE = re.compile(r"FileNotFoundError\b.*[/\\]\.[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-")


def _not_a_vanished_ray_temp_file(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += f"\n{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    last = text.strip().splitlines()[-1:]  # the exception a traceback ends with
    return not (last and _RAY_TEMP_FILE_GONE.search(last[0]))


def start_ray(address: str | None, node_ip_address: str | None = None) -> None:
    import ray

    # Tune's end-of-run analysis looks for its CSV/JSON logs, which are off (results live in DuckDB)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    for name in ("ray.train._internal.syncer", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).addFilter(_not_a_vanished_ray_temp_file)
    if ray.is_initialized():
        return
    # address "local": without --address always start a fresh Ray here, never attach to a cluster left behind
    # no runtime_env: the trials get their variables from the trainable (``trial_env``, ``sweeps.ray_trial``)
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, _node_ip_address=node_ip_address)
    interrupts.reclaim()  # ray.init took SIGTERM


def trial_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's FINETUNE_*, HF_* and TUNE_* variables for its trials, the data and cache folders made absolute: a
    trial runs in a working directory of Ray's, where ``FINETUNE_DATA_DIR=../shared/data`` names nothing.

    They travel as a parameter of the trainable, which sets them first thing (``sweeps.ray_trial.trainable``), not as
    Ray's ``runtime_env``: a worker with a runtime_env starts through Ray's ``setup_worker.py``, which imports Ray once
    more before it execs the worker, ~0.4 s of CPU per trial worker (0.79-0.86 s against 0.43-0.46 s of CPU for a
    worker to reach its first task, 3 runs each, 2026-12-07). What they configure is read when a trial runs (the data
    and cache folders, the test hooks) or when ``huggingface_hub`` is first imported, inside a trial."""
    env = {k: v for k, v in environ.items() if k.startswith(("FINETUNE_", "HF_", "TUNE_"))}
    for key in (DATA_DIR_ENV, CACHE_ENV):
        if env.get(key):
            env[key] = str(Path(env[key]).resolve())
    return env


def check_local_resources(cpus: float, gpus: float) -> None:
    """Without --address, Ray runs on this machine: refuse what it cannot give before starting anything."""
    import torch

    have_cpu, have_gpu = os.cpu_count() or 1, torch.cuda.device_count()
    problems = []
    if cpus > have_cpu:
        problems.append(("--cpus-per-trial", f"asked {cpus:g} CPU per trial; this machine has {have_cpu}"))
    if gpus > have_gpu:
        problems.append(("--gpus-per-trial", f"asked {gpus:g} GPU per trial; this machine has {have_gpu} "
                                             "(pass --address to use a GPU cluster)"))
    if problems:
        raise ConfigError(problems, "this machine can never run these trials")


def check_resources(cpus: float, gpus: float) -> dict[str, float]:
    """Refuse a per-trial request no node of the cluster can satisfy (Ray would leave it pending forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    best_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    best_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    problems = []
    if cpus > best_cpu:
        problems.append(("--cpus-per-trial", f"asked {cpus:g} CPU per trial; the largest node has {best_cpu:g}"))
    if gpus > best_gpu:
        problems.append(("--gpus-per-trial", f"asked {gpus:g} GPU per trial; the largest node has {best_gpu:g} "
                                             f"(cluster total {ray.cluster_resources().get('GPU', 0):g})"))
    if problems:
        raise ConfigError(problems, "the cluster can never run these trials")
    return dict(ray.cluster_resources())


def check_trial_resources(args: argparse.Namespace, gpus: float) -> None:
    """Without --address, refuse what this machine cannot give before anything (data, Ray) starts."""
    if args.address is None:
        check_local_resources(args.cpus_per_trial, gpus)


def start_cluster(args: argparse.Namespace, gpus: float) -> dict[str, float]:
    """Start or join Ray, then refuse a per-trial request no node can satisfy; the cluster's resources."""
    start_ray(args.address, args.node_ip_address)
    return check_resources(args.cpus_per_trial, gpus)



def default_gpus_per_trial() -> float:
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def trial_gpus(args: argparse.Namespace) -> float:
    """GPUs per trial: --gpus-per-trial, else 1 where this machine has a GPU. Written back into ``args``, where the
    Tuner and the sweep row read it."""
    if args.gpus_per_trial is None:
        args.gpus_per_trial = default_gpus_per_trial()
    return args.gpus_per_trial

