"""A study database with planted effects, written through the same writer the sweep driver uses.

Planted (test metric per seed, on N_TEST test examples whose per-example outcomes are stored as a real trial stores
them; trainable parameters per method: full 124M, bitfit 0.1M, lora 0.4M):
- sms_spam: full (0.95, 0.96, 0.97) is far better than lora (0.80, 0.81, 0.82): "full beats lora".
  full also ran at lr 1e-4 with a *better test* but worse validation score (the guide must choose by validation),
  and at lr 1e-3, where seed 0 diverged although the other seeds scored the best validation of all (the guide must
  not pick a learning rate that diverged).
- imdb: full (0.860, 0.880, 0.900) and lora (0.8605, 0.8795, 0.9005) tie on validation (0.86 each: both are the
  reference, neither is preferred by name) and differ on test by two of 4,000 examples per seed: "equivalent within
  ±1 point", lora far cheaper. bitfit (0.84, 0.89, 0.87) wanders by seed: "inconclusive" against both.
  One lora trial at lr 1e-3 failed (an error, not a divergence).
- nli: one seed each (full 0.60, lora 0.50): no interval, no conclusion.
- preference: full (0.60, 0.64, 0.62) is best on validation; lora (0.61, 0.59, 0.65) differs by less than three seeds
  can detect: "inconclusive", and the decision table says so.

Per-example outcomes: within a task and seed, examples are ranked once (a hard example is hard for every method) and
a trial gets the first round(accuracy × N_TEST) right, so two groups of one seed differ on as few examples as their
accuracies allow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np

from analysis.db import ResultsWriter, trial_row
from sweeps.config import TrialConfig
from sweeps.records import FinalRecord

SWEEP = "synthetic-20261126-000000-abcd"
PARAMS = {"full": (124_439_808, 124_439_808), "lora": (442_368, 124_882_176), "bitfit": (102_144, 124_439_808)}
N_TEST = 4000
# the untrained model's test metric (seed s adds 0.01 s), and the majority class (0.5) for the classification tasks
BASELINE_STEP0 = {"sms_spam": 0.40, "imdb": 0.45, "nli": 0.30, "alpaca": 900.0, "preference": 0.0}
METRICS = {"alpaca": "perplexity", "preference": "preference_accuracy"}  # else accuracy

# (task, group, lr, seed) -> (status, val, test)
PLANT: dict[tuple[str, str, float, int], tuple[str, float | None, float | None]] = {}
for seed, (v, t) in enumerate([(0.90, 0.95), (0.91, 0.96), (0.92, 0.97)]):
    PLANT[("sms_spam", "full", 5e-5, seed)] = ("completed", v, t)
for seed, (v, t) in enumerate([(0.85, 0.98), (0.86, 0.99), (0.84, 0.985)]):
    PLANT[("sms_spam", "full", 1e-4, seed)] = ("completed", v, t)
PLANT[("sms_spam", "full", 1e-3, 0)] = ("diverged", None, None)
PLANT[("sms_spam", "full", 1e-3, 1)] = ("completed", 0.99, 0.99)
PLANT[("sms_spam", "full", 1e-3, 2)] = ("completed", 0.99, 0.99)
for seed, (v, t) in enumerate([(0.80, 0.80), (0.81, 0.81), (0.82, 0.82)]):
    PLANT[("sms_spam", "lora", 5e-4, seed)] = ("completed", v, t)
for seed, (v, t) in enumerate([(0.85, 0.86), (0.86, 0.88), (0.87, 0.90)]):
    PLANT[("imdb", "full", 5e-5, seed)] = ("completed", v, t)
for seed, (v, t) in enumerate([(0.86, 0.8605), (0.86, 0.8795), (0.86, 0.9005)]):
    PLANT[("imdb", "lora", 5e-4, seed)] = ("completed", v, t)
for seed, (v, t) in enumerate([(0.80, 0.84), (0.81, 0.89), (0.82, 0.87)]):
    PLANT[("imdb", "bitfit", 1e-3, seed)] = ("completed", v, t)
PLANT[("imdb", "lora", 1e-3, 0)] = ("failed", None, None)
# preference pairs: full is best on validation, but on test full and lora differ by less than three seeds can detect
for seed, (v, t) in enumerate([(0.70, 0.60), (0.71, 0.64), (0.72, 0.62)]):
    PLANT[("preference", "full", 5e-5, seed)] = ("completed", v, t)
for seed, (v, t) in enumerate([(0.60, 0.61), (0.61, 0.59), (0.62, 0.65)]):
    PLANT[("preference", "lora", 5e-4, seed)] = ("completed", v, t)
PLANT[("nli", "full", 5e-5, 0)] = ("completed", 0.61, 0.60)
PLANT[("nli", "lora", 5e-4, 0)] = ("completed", 0.52, 0.50)

# What the guide must conclude, and nothing else: (kind, task, dimension, a, b)
EXPECTED = {
    ("beats", "sms_spam", "method", "full", "lora"),
    ("equivalent", "imdb", "method", "full", "lora"),
    ("inconclusive", "imdb", "method", "full", "bitfit"),
    ("inconclusive", "imdb", "method", "lora", "bitfit"),
    ("single_seed", "nli", "method", "full", "lora"),
    ("inconclusive", "preference", "method", "full", "lora"),
    ("diverged", "sms_spam", "method", "full", "1e-3"),
}


# Instruction tuning (perplexity, lower is better: full < lora < bitfit on validation and test), with kept generations
# (the generations table) on N_PROMPTS test prompts; only in the guide built by build(alpaca=True). What an LLM judge
# says about them is planted by the tests (``judgments``).
ALPACA_LR = {"full": 5e-5, "lora": 5e-4, "bitfit": 1e-3}
ALPACA = {("alpaca", "full", 5e-5, seed): ("completed", 20.0 + seed, 21.0 + seed) for seed in range(3)}
ALPACA.update({("alpaca", "lora", 5e-4, seed): ("completed", 24.0 + seed, 25.0 + seed) for seed in range(3)})
ALPACA.update({("alpaca", "bitfit", 1e-3, seed): ("completed", 29.0 + seed, 30.0 + seed) for seed in range(3)})
N_PROMPTS = 12


def generation_rows(group: str, seed: int) -> list[tuple[str, int, str, str, str]]:
    """A trial's kept generations (stage, example, prompt, reference, response): prompt 0's answer is markup, which
    the guide must show as text."""
    return [("final", i, f"### Instruction:\nName colour number {i}.\n\n### Response:\n", f"Colour {i}.",
             "Blue <b>sky</b>" if i == 0 else f"Answer {i} of {group} seed {seed}.") for i in range(N_PROMPTS)]


def build(path: Path, init: str = "pretrained", plant: dict | None = None, alpaca: bool = False) -> Path:
    plant = PLANT if plant is None else plant
    writer = ResultsWriter(path)
    writer.start_sweep({
        "id": SWEEP, "study": "synthetic", "kind": "grid", "started_at": datetime(2026, 11, 26, 9, 0),
        "ended_at": None, "status": "running", "planned_trials": len(plant) + (len(ALPACA) if alpaca else 0),
        "model_init": init,
        "git_commit": "0123456789abcdef", "package_versions": {"torch": "2.13.0", "ray": "2.60.0"},
        "hardware": {"cpus": 2, "gpus": []}, "command_line": "launch.py grid --study synthetic",
        "storage_path": "/tmp/ray",
    })
    trials = {**plant, **(ALPACA if alpaca else {})}
    for (task, group, lr, seed), (status, val, test) in trials.items():
        metric = METRICS.get(task, "accuracy")
        config = TrialConfig.from_flat({"task.name": task, "method.name": group, "optim.lr": lr, "train.seed": seed,
                                        "model.init": init}).to_flat()
        spec = {"trial_id": f"{task}-{group}-{lr:g}-{seed}", "sweep_id": SWEEP, "study": "synthetic",
                "dimension": "method", "group": group, "config": config}
        trainable, total = PARAMS[group]
        kind = {"primary_metric": metric, "higher_is_better": metric != "perplexity", "task": task,
                "task_kind": "lm" if task == "alpaca" else "classification"}
        final = FinalRecord(status="completed", **kind, step=100, validation={metric: val}, test={metric: test},
                            trainable_params=trainable, total_params=total, wall_seconds=60.0 + seed,
                            train_seconds=40.0 + seed, tokens_per_s=1000.0 * (2 if group == "lora" else 1),
                            peak_memory_mb=2048.0 + seed, memory_source="account", kept_bytes=4 * trainable,
                            tokens_seen=100_000,
                            baseline_test={metric: BASELINE_STEP0[task] + 0.01 * seed},
                            baseline_majority=None if task in METRICS else 0.5,
                            notes={"task_source_used": "sick", "task_source_fallback": "all_nli_med unavailable"}
                            if task == "nli" else {})
        if status == "completed":
            writer.write_trial(trial_row(spec, status, final.to_row()))
            writer.write_predictions(spec["trial_id"], prediction_rows(task, seed, metric, test))
            if task == "alpaca":
                writer.write_generations(spec["trial_id"], generation_rows(group, seed))
            for step in (0, 50, 100):
                writer.write_metrics(spec["trial_id"], step, "validation", {metric: val * (0.6 + 0.4 * step / 100)})
                writer.write_metrics(spec["trial_id"], step, "train", {"loss": 1.0 - step / 200})
        elif status == "diverged":
            diverged = FinalRecord(status="diverged", **kind, step=7, error="loss became nan at step 7")
            writer.write_trial(trial_row(spec, status, diverged.to_row(), error="loss became nan at step 7"))
        else:
            writer.write_trial(trial_row(spec, status, None, error="RuntimeError: worker died\ntraceback..."))
    writer.end_sweep(SWEEP, "completed")
    writer.close()
    return path


def prediction_rows(task: str, seed: int, metric: str, test: float) -> list[tuple]:
    """Per-example test outcomes whose aggregate is exactly the planted test metric (see the module docstring)."""
    rank = np.random.default_rng([len(task), sum(map(ord, task)), seed]).permutation(N_TEST)
    if metric == "perplexity":  # 10 tokens each; example losses spread around log(perplexity), summing exactly
        spread = np.random.default_rng(sum(map(ord, task))).normal(0.0, 3.0, N_TEST)
        losses = 10 * np.log(test) + spread - spread.mean()
        return [("test", i, None, None, None, float(losses[i]), 10) for i in range(N_TEST)]
    right = set(rank[:round(test * N_TEST)].tolist())
    return [("test", i, 1, 1 if i in right else 0, i in right, None, None) for i in range(N_TEST)]


@dataclass(frozen=True)
class Judgment:
    """A ``judgments`` row as analysis/judge.py would write it (the columns the guide reads)."""

    trial_id: str
    example: int
    judge_model: str
    rubric_version: str
    mode: str                  # score | pairwise
    position: str              # only | first | second
    opponent: str | None
    score: float | None
    preferred: str | None      # response | opponent
    parse_status: str          # ok | unparsed | failed


def judgments(judge: str, scores: Callable[[str, int, int], float] | None = None,
              prefer: Callable[[str, int, int, str], str] | None = None,
              broken: Mapping[tuple[str, int, int, str], str] | None = None, rubric: str = "v1",
              opponent: str = "reference") -> list[Judgment]:
    """A judge's rows about every alpaca trial's N_PROMPTS generations: ``scores(group, seed, example)`` (mode score),
    ``prefer(group, seed, example, position)`` (pairwise, both orders); ``broken[(group, seed, example, position)]``
    makes that reply 'unparsed' or 'failed' (no score, no preference)."""
    rows = []
    for (_task, group, lr, seed), _ in ALPACA.items():
        trial = f"alpaca-{group}-{lr:g}-{seed}"
        for i in range(N_PROMPTS):
            asked = ([("score", "only")] if scores else []) + ([("pairwise", p) for p in ("first", "second")]
                                                                 if prefer else [])
            for mode, position in asked:
                status = (broken or {}).get((group, seed, i, position), "ok")
                ok = status == "ok"
                rows.append(Judgment(trial, i, judge, rubric, mode, position,
                                     opponent if mode == "pairwise" else None,
                                     scores(group, seed, i) if ok and mode == "score" else None,
                                     prefer(group, seed, i, position) if ok and mode == "pairwise" else None,
                                     status))
    return rows


def write_judgments(path: Path, rows: Iterable[Judgment]) -> None:
    """Insert the rows into the study database directly (the judge CLI is not under test here)."""
    con = duckdb.connect(str(path))
    try:
        for r in rows:
            con.execute("""INSERT INTO judgments (trial_id, example, judge_model, rubric_version, mode, position,
                                                  opponent, score, preferred, parse_status, raw_reply, request_key,
                                                  cached, judged_at)
                           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, false, ?)""",
                        [*astuple(r), "reply", f"{r.trial_id}/{r.example}/{r.judge_model}/{r.mode}/{r.position}",
                         datetime(2026, 11, 27, 9, 0)])
    finally:
        con.close()
