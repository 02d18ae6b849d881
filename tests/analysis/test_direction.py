"""Metric direction comes from the trials table: a higher-is-better and two lower-is-better tasks share one database,
and every ranking (best learning rate, group order, Pareto front, summary, figure axis) goes the right way round.

One lower-is-better metric is perplexity; the other, ``error_rate``, is a name no code knows, so a ranking that
guessed the direction from the metric's name would get it wrong."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from analysis import figures, queries
from analysis.db import ResultsWriter, connect, trial_row
from analysis.guide import collect
from sweeps.config import TrialConfig
from sweeps.records import FinalRecord

SWEEP = "direction-20261127-000000"
# task -> (metric, higher_is_better, {(group, lr): (val, test) per seed})
PLANT = {
    "sms_spam": ("accuracy", True, {("full", 1e-4): (0.90, 0.91), ("lora", 1e-3): (0.70, 0.71),
                                    ("full", 1e-3): (0.60, 0.99)}),
    "alpaca": ("perplexity", False, {("full", 1e-4): (20.0, 21.0), ("lora", 1e-3): (30.0, 31.0),
                                     ("full", 1e-3): (40.0, 5.0)}),
    "imdb": ("error_rate", False, {("full", 1e-4): (0.30, 0.31), ("lora", 1e-3): (0.10, 0.11),
                                   ("lora", 1e-2): (0.50, 0.01)}),
}
PARAMS = {"full": 124_000_000, "lora": 400_000}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("direction") / "study.duckdb"
    writer = ResultsWriter(path)
    writer.start_sweep({"id": SWEEP, "study": "direction", "kind": "grid", "started_at": datetime(2026, 11, 27),
                        "status": "completed", "planned_trials": 18, "model_init": "pretrained"})
    for task, (metric, higher, groups) in PLANT.items():
        for (group, lr), (val, test) in groups.items():
            for seed, wobble in enumerate((-0.001, 0.0, 0.001)):
                config = TrialConfig.from_flat({"task.name": task, "method.name": group, "optim.lr": lr,
                                                "train.seed": seed}).to_flat()
                spec = {"trial_id": f"{task}-{group}-{lr:g}-{seed}", "sweep_id": SWEEP, "study": "direction",
                        "dimension": "method", "group": group, "config": config}
                record = FinalRecord(status="completed", task=task, task_kind="x", primary_metric=metric,
                                     higher_is_better=higher, step=10, validation={metric: val + wobble},
                                     test={metric: test + wobble}, trainable_params=PARAMS[group],
                                     total_params=124_400_000, wall_seconds=10.0, peak_memory_mb=100.0)
                writer.write_trial(trial_row(spec, "completed", record.to_row()))
    writer.close()
    return path


def test_best_learning_rate_and_group_order_follow_the_stored_direction(db: Path) -> None:
    con = connect(db, read_only=True)
    queries.select_sweeps(con, [SWEEP])
    rows = queries.records(con, queries.BEST, {"dimension": "method"})
    best_lr = {(r["task"], r["group"]): r["lr"] for r in rows}
    # chosen on validation, each in its own direction (the other LR has the better *test* score on purpose)
    assert best_lr == {("sms_spam", "full"): 1e-4, ("sms_spam", "lora"): 1e-3, ("alpaca", "full"): 1e-4,
                       ("alpaca", "lora"): 1e-3, ("imdb", "full"): 1e-4, ("imdb", "lora"): 1e-3}
    first = {}
    for r in rows:
        first.setdefault(r["task"], r["group"])
    assert first == {"sms_spam": "full", "alpaca": "full", "imdb": "lora"}
    assert {r["task"]: r["higher_is_better"] for r in rows} == {"sms_spam": True, "alpaca": False, "imdb": False}
    summary = queries.group_summary(con, SWEEP)  # launch.py summary: best first within a task
    order = [(r[0], r[2]) for r in summary if r[0] == "imdb"]
    assert order[0] == ("imdb", "lora")


def test_guide_ranks_pareto_and_labels_axes_by_the_stored_direction(db: Path, monkeypatch, tmp_path: Path) -> None:
    con = connect(db, read_only=True)
    guide = collect(con)
    best = {f.task: f.a for f in guide.findings if f.kind == "beats"}  # a: the winner
    assert best == {"sms_spam": "full", "alpaca": "full", "imdb": "lora"}
    pareto = {spec["task"]: spec["fronts"]["trainable_params"] for spec in guide.figures if spec["kind"] == "pareto"}
    assert pareto["imdb"] == ["lora"]  # cheaper and lower error: it alone is on the front
    assert pareto["alpaca"] == ["lora", "full"]  # cheaper, or lower perplexity
    labels: dict[str, str] = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: labels.setdefault(path.stem, fig.axes[0].get_ylabel()))
    figures.render([s for s in guide.figures if s["kind"] == "dimension"], tmp_path)
    assert labels["method_imdb"] == "error_rate (lower is better)"
    assert labels["method_alpaca"] == "perplexity (lower is better)"
    assert labels["method_sms_spam"] == "accuracy (higher is better)"
