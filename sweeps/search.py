"""``launch.py search``: Optuna (through Ray Tune's OptunaSearch) proposes configurations of one method on
one task; ASHA stops the poor ones at evaluation points."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from typing import Any

from analysis.db import ResultsWriter
from model import ConfigError
from sweeps import interrupts
from sweeps.cluster import check_trial_resources, start_cluster, trial_gpus
from sweeps.config import TrialConfig
from sweeps.driver import make_tuner, prepare_data, report_interrupted, run_and_close, storage_path, sweep_row
from sweeps.records import EVAL_STEP, metric_key
from sweeps.study import PlannedTrial, Study, load_study
from sweeps.train import parse_sets
from tasks import TASKS


def search_space(method: str, n_layer: int, task: str = "") -> dict[str, Any]:
    """What a search varies for each method (flat keys), on scales where the optimum is usually found."""
    from ray import tune

    low, high = {"full": (1e-5, 1e-3), "last_k": (1e-5, 1e-3)}.get(method, (1e-4, 1e-2))
    space: dict[str, Any] = {"optim.lr": tune.loguniform(low, high),
                             "optim.weight_decay": tune.choice([0.0, 0.01, 0.1]),
                             "schedule.warmup_ratio": tune.uniform(0.0, 0.2)}
    if method == "last_k":
        space["method.k"] = tune.randint(1, n_layer + 1)
    if method == "lora":
        space.update({"lora.rank": tune.choice([1, 2, 4, 8, 16, 32, 64]), "lora.alpha": tune.choice([4, 8, 16, 32]),
                      "lora.dropout": tune.uniform(0.0, 0.2), "lora.targets": tune.choice(["attention", "mlp", "all"])})
    if task == "preference":  # DPO: how hard to pull towards the reference
        space["dpo.beta"] = tune.loguniform(0.02, 1.0)
    return space


def search_base(args: argparse.Namespace, study: Study) -> TrialConfig:
    """The TrialConfig every proposal starts from: the study's base and task settings, the method, --set; evaluated
    at the start and every ``train.eval_every`` steps, the points where ASHA compares trials. Bad keys stop here."""
    if args.task not in study.tasks:
        raise ConfigError([("--task", f"{args.task!r} is not in study {study.name} ({', '.join(study.tasks)})")])
    # the search varies the warmup as a ratio (search_space): a study's fixed warmup_steps would contradict it
    base = {**study.base, **study.tasks[args.task], "task.name": args.task, "method.name": args.method,
            "train.eval_at_start": True, "schedule.warmup_steps": 0, **parse_sets(args.set)}
    base.setdefault("train.eval_every", base.get("train.log_every", 10))
    return TrialConfig.from_flat(base)


def cmd_search(args: argparse.Namespace) -> int:
    """Optuna (Ray Tune's OptunaSearch) proposes configurations; ASHA stops the poor ones at evaluation points."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.ray_trial import spec_from_param

    study = load_study(args.study)
    config = search_base(args, study)
    sweep_id = args.name or f"search-{args.task}-{args.method}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    search = {"base": config.to_flat(), "sweep_id": sweep_id, "study": study.name, "group": args.method}
    space = search_space(args.method, config.model.n_layer_known or 12, args.task)
    task_cls = TASKS[args.task]
    metric, mode = metric_key("validation", task_cls.primary_metric), "max" if task_cls.higher_is_better else "min"
    gpus = trial_gpus(args)
    check_trial_resources(args, gpus)
    example = spec_from_param({"search": search, **{k: v.sample() for k, v in space.items()}})
    prepare_data([PlannedTrial(**example)])
    # Decisions at evaluations only (EVAL_STEP is in eval reports alone): step reports carry the last validation
    # metric along for the searcher, and a decision on one could stop a trial after its last step, before its final
    # evaluation. A trial that reaches the end finishes with its final record.
    scheduler = ASHAScheduler(time_attr=EVAL_STEP, max_t=max(config.train.max_steps or 100_000, config.train.eval_every),
                              grace_period=config.train.eval_every, reduction_factor=2, stop_last_trials=False)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # step reports before the first evaluation have none
    with ResultsWriter(args.db) as writer:  # checked and locked before Ray starts; held to the sweep's end
        resources = start_cluster(args, gpus)
        storage = storage_path(args)
        writer.start_sweep(sweep_row(args, sweep_id, study.name, "search", args.num_samples, config.model.init,
                                     resources, storage))
        try:  # a signal from here on leaves the search interrupted, to resume
            print(f"search {sweep_id}: {args.num_samples} samples of {args.method} on {args.task}, optimising "
                  f"{metric} ({mode}), database {args.db}", flush=True)
            tuner = make_tuner(args, sweep_id, storage, {"search": search, **space}, {}, metric=metric, mode=mode,
                               search_alg=OptunaSearch(seed=args.seed), scheduler=scheduler,
                               num_samples=args.num_samples)
            return run_and_close(lambda: interrupts.fit(tuner), writer, sweep_id)
        except interrupts.Interrupted as stop:
            return report_interrupted(writer, sweep_id, stop, 0.0)

