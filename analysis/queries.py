"""Every SQL question the project asks of the study database, in one place.

The guide works on a selection of sweeps. ``select_sweeps`` records it in a temporary table and three temporary views
build on it, so each query below stays short and readable, and people can run the same SQL by hand
(``python analysis/build_guide.py --print-sql`` prints the views):

- ``guide_trials``   the selected sweeps' trials, one row per (dimension, group) a trial serves (``trial_groups``: a
                     configuration shared by several groups trained once and is in each); a configuration run again
                     in a later sweep of the same study counts once (its completed run, else its latest);
- ``guide_lr_stats`` per task, dimension, group and learning rate: trial counts by outcome, validation and test metric
                     means, the test SD over seeds, and cost (trainable parameters, wall and training time, throughput, memory);
- ``guide_best``     per task, dimension and group, the learning rate the guide reports: among the learning rates with
                     no diverged or failed seed, the best mean *validation* metric (the test metric is only reported,
                     never used to choose).

Metric direction: each trial row stores its task's primary metric and whether higher is better
(``trials.higher_is_better``, written from the trial's final record); every ranking here reads it from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

VIEWS = """
-- One row per trial and (dimension, group) it serves (trial_groups): a configuration shared by several groups trained
-- once and appears in each, with the same numbers.
CREATE OR REPLACE TEMP VIEW guide_trials AS
SELECT t.* REPLACE (g.dimension AS dimension, g."group" AS "group")
FROM trials t
JOIN trial_groups g ON g.trial_id = t.id
WHERE t.sweep_id IN (SELECT id FROM guide_sweeps)
QUALIFY row_number() OVER (
    PARTITION BY g.dimension, g."group", CAST(t.config AS VARCHAR)
    ORDER BY t.status = 'completed' DESC, t.updated_at DESC) = 1;

CREATE OR REPLACE TEMP VIEW guide_lr_stats AS
SELECT task, dimension, "group",
       any_value(method)                                                   AS method,
       optim_lr                                                            AS lr,
       any_value(primary_metric) FILTER (WHERE primary_metric IS NOT NULL) AS metric,
       any_value(higher_is_better) FILTER (WHERE higher_is_better IS NOT NULL) AS higher_is_better,
       count(*)                                                            AS n_trials,
       count(*) FILTER (WHERE status = 'completed')                        AS n_completed,
       count(*) FILTER (WHERE status = 'diverged')                         AS n_diverged,
       count(*) FILTER (WHERE status NOT IN ('completed', 'diverged'))     AS n_other,
       avg(val_primary)  FILTER (WHERE status = 'completed')               AS val_mean,
       avg(test_primary) FILTER (WHERE status = 'completed')               AS test_mean,
       stddev_samp(test_primary) FILTER (WHERE status = 'completed')       AS test_sd,
       list(test_primary ORDER BY seed) FILTER (WHERE status = 'completed') AS test_values,
       list(seed ORDER BY seed) FILTER (WHERE status = 'completed')         AS test_seeds,
       avg(trainable_params) FILTER (WHERE status = 'completed')           AS trainable_params,
       avg(total_params) FILTER (WHERE status = 'completed')               AS total_params,
       avg(wall_seconds) FILTER (WHERE status = 'completed')               AS wall_seconds,
       avg(train_seconds) FILTER (WHERE status = 'completed')              AS train_seconds,
       any_value(memory_source) FILTER (WHERE status = 'completed')        AS memory_source,
       avg(tokens_per_s) FILTER (WHERE status = 'completed')               AS tokens_per_s,
       avg(peak_memory_mb) FILTER (WHERE status = 'completed')             AS peak_memory_mb
FROM guide_trials
GROUP BY task, dimension, "group", optim_lr;

CREATE OR REPLACE TEMP VIEW guide_best AS
SELECT * EXCLUDE (lr_rank)
FROM (
    SELECT *, row_number() OVER (
        PARTITION BY task, dimension, "group"
        ORDER BY n_completed = 0,
                 n_diverged + n_other,
                 CASE WHEN higher_is_better THEN -val_mean ELSE val_mean END NULLS LAST,
                 lr) AS lr_rank
    FROM guide_lr_stats)
WHERE lr_rank = 1 AND n_completed > 0;
"""

SWEEPS = """
-- The selected sweeps, with how their trials ended (the Reproduce section).
SELECT s.id, s.study, s.kind, s.started_at, s.ended_at, s.status, s.planned_trials, s.model_init, s.git_commit,
       s.package_versions, s.hardware, s.command_line,
       count(t.id) FILTER (WHERE t.status = 'completed') AS completed,
       count(t.id) FILTER (WHERE t.status = 'diverged')  AS diverged,
       count(t.id) FILTER (WHERE t.status = 'failed')    AS failed,
       count(t.id) FILTER (WHERE t.status = 'stopped')   AS stopped,
       count(t.id) FILTER (WHERE t.status IN ('pending', 'running', 'interrupted')) AS unfinished
FROM sweeps s LEFT JOIN trials t ON t.sweep_id = s.id
WHERE s.id IN (SELECT id FROM guide_sweeps)
GROUP BY ALL
ORDER BY s.started_at
"""

ALL_SWEEPS = "SELECT id, study, started_at FROM sweeps ORDER BY started_at"

MODEL_INITS = """
-- How the selected trials' models were initialised: 'random' anywhere means the numbers are no finding about GPT-2.
SELECT model_init, count(DISTINCT id) AS trials FROM guide_trials GROUP BY model_init ORDER BY model_init
"""

COMPLETED = "SELECT count(*) FROM guide_trials WHERE status = 'completed'"

MODELS = """
SELECT model, model_n_layer, model_n_embd, count(DISTINCT id) AS trials FROM guide_trials GROUP BY ALL
ORDER BY trials DESC
"""


BEST = """
-- Each group of one dimension at its chosen learning rate (the summary table, the dimension sections, Pareto fronts).
SELECT task, dimension, "group", method, lr, metric, higher_is_better, n_trials, n_completed, n_diverged, n_other,
       val_mean, test_mean, test_sd, test_values, test_seeds, trainable_params, total_params, wall_seconds,
       train_seconds, tokens_per_s, peak_memory_mb, memory_source
FROM guide_best
WHERE dimension = $dimension
ORDER BY task, CASE WHEN higher_is_better THEN -test_mean ELSE test_mean END, "group"
"""

BEST_ALL = """
-- Every group of every dimension at its chosen learning rate.
SELECT task, dimension, "group", method, lr, metric, higher_is_better, n_trials, n_completed, n_diverged, n_other,
       val_mean, test_mean, test_sd, test_values, test_seeds, trainable_params, total_params, wall_seconds,
       train_seconds, tokens_per_s, peak_memory_mb, memory_source
FROM guide_best
ORDER BY task, dimension, "group"
"""

OUTCOMES = """
-- Per-example test outcomes of every group's completed seeds at its chosen learning rate (paired comparisons):
-- num / den is the example's outcome (classification, NLI, preference pairs: correct / 1; language modelling: summed
-- loss / scored tokens).
SELECT b.task, b.dimension, b."group", t.seed, p.example,
       coalesce(CAST(p.correct AS DOUBLE), p.loss)              AS num,
       CASE WHEN p.correct IS NULL THEN p.tokens ELSE 1 END     AS den,
       p.correct IS NOT NULL                                    AS proportion
FROM guide_best b
JOIN guide_trials t ON t.task = b.task AND t.dimension = b.dimension AND t."group" = b."group" AND t.optim_lr = b.lr
JOIN predictions p ON p.trial_id = t.id AND p.split = 'test'
WHERE t.status = 'completed' AND (p.correct IS NOT NULL OR (p.loss IS NOT NULL AND p.tokens > 0))
ORDER BY b.task, b.dimension, b."group", t.seed, p.example
"""

LR_SWEEP = """
-- Every learning rate tried for each group of one dimension (the Learning rate section).
SELECT task, "group", method, lr, metric, higher_is_better, n_trials, n_completed, n_diverged, n_other, val_mean,
       test_mean, test_sd
FROM guide_lr_stats
WHERE dimension = $dimension
ORDER BY task, "group", lr
"""

CURVES = """
-- Learning curves at each group's chosen learning rate: validation primary metric, training loss, and (with
-- train.train_metrics) the primary metric on a fixed training subset, by step, averaged over the completed seeds.
SELECT b.task, b."group", b.method, m.split, m.name, m.step, avg(m.value) AS value, count(*) AS seeds
FROM guide_best b
JOIN guide_trials t ON t.task = b.task AND t.dimension = b.dimension AND t."group" = b."group" AND t.optim_lr = b.lr
JOIN metrics m ON m.trial_id = t.id
WHERE b.dimension = $dimension AND t.status = 'completed'
  AND ((m.split IN ('validation', 'train') AND m.name = b.metric) OR (m.split = 'train' AND m.name = 'loss'))
GROUP BY ALL
ORDER BY b.task, b."group", m.split, m.step
"""

BASELINES = """
-- Per task, what its trained models are measured against (each task's summary), over the selected completed trials:
-- the test primary metric of always predicting the training split's most frequent class (null for tasks without
-- class labels) and of the model before any training (step 0). The step-0 model is the same for every group that
-- shares a seed (base weights, the seed's fresh head; LoRA starts at the base), so one number per task and dimension
-- (dimensions may change the model or data, so they are kept apart).
SELECT task, dimension,
       any_value(primary_metric) FILTER (WHERE primary_metric IS NOT NULL)     AS metric,
       any_value(higher_is_better) FILTER (WHERE higher_is_better IS NOT NULL) AS higher_is_better,
       avg(baseline_majority)                                                  AS majority,
       count(baseline_majority)                                                AS n_majority,
       avg(baseline_step0)                                                     AS step0_mean,
       stddev_samp(baseline_step0)                                             AS step0_sd,
       count(baseline_step0)                                                   AS n_step0,
       count(DISTINCT seed) FILTER (WHERE baseline_step0 IS NOT NULL)          AS n_step0_seeds
FROM guide_trials
WHERE status = 'completed'
GROUP BY task, dimension
ORDER BY task, dimension
"""

PROBLEM_TRIALS = """
-- Trials that did not complete: diverged, failed, stopped early by the scheduler, or never finished; one row per
-- trial, with every (dimension, group) it serves.
SELECT id, any_value(sweep_id) AS sweep_id, any_value(task) AS task,
       string_agg(dimension, ', ' ORDER BY dimension, "group") AS dimension,
       string_agg("group", ', ' ORDER BY dimension, "group") AS "group",
       any_value(optim_lr) AS lr, any_value(seed) AS seed, any_value(status) AS status, any_value(steps) AS steps,
       split_part(coalesce(any_value(error), ''), chr(10), 1) AS error
FROM guide_trials
WHERE status <> 'completed'
GROUP BY id
ORDER BY status, task, dimension, "group", lr, seed
"""

GENERATIONS = """
-- Kept greedy generations of the trained weights (stage 'final') of each group of one dimension at its chosen learning
-- rate, from its lowest completed seed that kept any, on its first $prompts prompts by test index (all of them when
-- $prompts is null): the same index is the same prompt in every group of a task, so the groups line up side by side.
SELECT b.task, b."group", t.seed, g.example, g.prompt, g.reference, g.response
FROM guide_best b
JOIN guide_trials t ON t.task = b.task AND t.dimension = b.dimension AND t."group" = b."group" AND t.optim_lr = b.lr
JOIN generations g ON g.trial_id = t.id AND g.stage = 'final'
WHERE b.dimension = $dimension AND t.status = 'completed'
QUALIFY dense_rank() OVER (PARTITION BY b.task, b."group" ORDER BY t.seed) = 1
    AND (CAST($prompts AS INTEGER) IS NULL
         OR row_number() OVER (PARTITION BY b.task, b."group" ORDER BY t.seed, g.example) <= $prompts)
ORDER BY b.task, b."group", g.example
"""

GROUP_SUMMARY = """
-- Per task, dimension and group: how many trials ended, the mean and spread over seeds of the test metric at each
-- learning rate, and what the method trains. Random-init sweeps are labelled as such.
SELECT t.task, t.dimension, t."group", t.method, t.optim_lr AS lr,
       count(*) FILTER (WHERE t.status = 'completed')       AS completed,
       count(*) FILTER (WHERE t.status <> 'completed')      AS other,
       any_value(t.primary_metric)                          AS metric,
       any_value(t.higher_is_better)                        AS higher_is_better,
       avg(t.test_primary)                                  AS test_mean,
       stddev_samp(t.test_primary)                          AS test_sd,
       avg(t.trainable_params)                              AS trainable_params,
       avg(t.wall_seconds)                                  AS wall_seconds,
       any_value(s.model_init)                              AS model_init
FROM trials t JOIN sweeps s ON s.id = t.sweep_id
WHERE t.sweep_id = $sweep
GROUP BY ALL
ORDER BY t.task, t.dimension,
         CASE WHEN any_value(t.higher_is_better) THEN -avg(t.test_primary) ELSE avg(t.test_primary) END
         NULLS LAST  -- best first, whichever way the task's metric points
"""

LATEST_SWEEP = "SELECT id FROM sweeps ORDER BY started_at DESC LIMIT 1"

EXPORTED_TRIAL = """
-- A trial a DPO run may start from (dpo.init=<trial id>): its status, whether it kept its weights, and where.
SELECT t.status, t.train_export, s.storage_path FROM trials t JOIN sweeps s ON s.id = t.sweep_id WHERE t.id = ?
"""


def outcome_arrays(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """OUTCOMES as one numpy array per column (a study holds many per-example rows)."""
    return con.execute(OUTCOMES).fetchnumpy()


def group_summary(con: duckdb.DuckDBPyConnection, sweep_id: str) -> list[tuple]:
    return con.execute(GROUP_SUMMARY, {"sweep": sweep_id}).fetchall()


def baselines(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """``BASELINES`` over the selected sweeps (``select_sweeps`` first): one dict per task and dimension with ``metric``,
    ``higher_is_better``, ``majority`` and ``n_majority``, ``step0_mean``, ``step0_sd``, ``n_step0`` (trials) and
    ``n_step0_seeds``."""
    return records(con, BASELINES)


def latest_sweep(con: duckdb.DuckDBPyConnection) -> str | None:
    row = con.execute(LATEST_SWEEP).fetchone()
    return row[0] if row else None


def select_sweeps(con: duckdb.DuckDBPyConnection, sweep_ids: Sequence[str]) -> None:
    """Point the guide views at these sweeps (temporary objects: works on a read-only connection)."""
    con.execute("CREATE OR REPLACE TEMP TABLE guide_sweeps (id VARCHAR)")
    con.executemany("INSERT INTO guide_sweeps VALUES (?)", [[s] for s in sweep_ids])
    con.execute(VIEWS)


def records(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of a query as dicts keyed by column name."""
    cursor = con.execute(sql, params or {})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# --- the sweep driver's questions (sweeps/resume.py, sweeps/status.py, sweeps/study.py dpo.init) -----------------

SWEEP_TO_RESUME = """
-- The sweep `launch.py resume` continues: the one named, else the most recent; where Ray keeps it, and per-trial
-- resources (in hardware.per_trial).
SELECT id, storage_path, status, hardware
FROM sweeps
WHERE $sweep IS NULL OR id = $sweep
ORDER BY started_at DESC
LIMIT 1
"""

UNFINISHED_TRIALS = """
-- A sweep's planned trials that did not complete or diverge, with their status (resume runs the open ones again
-- from their plan when Ray's state is torn or Ray did not run them, and those Ray lost).
SELECT id AS trial_id, sweep_id, study, dimension, "group", config, status
FROM trials
WHERE sweep_id = $sweep AND status NOT IN ('completed', 'diverged')
ORDER BY id
"""

FAILED_TRIALS = """
-- A sweep's trials that ended failed, with their error (the driver names them when it exits).
SELECT id AS trial_id, error
FROM trials
WHERE sweep_id = $sweep AND status = 'failed'
ORDER BY id
"""

SWEEP_PROGRESS = """
-- Every sweep with how far its trials got (`launch.py status`), or the one named.
SELECT s.id, s.study, s.status, s.model_init, s.planned_trials,
       count(t.id) FILTER (WHERE t.status = 'completed')                       AS completed,
       count(t.id) FILTER (WHERE t.status IN ('failed', 'diverged', 'stopped')) AS ended_badly,
       count(t.id) FILTER (WHERE t.status IN ('pending', 'running', 'interrupted')) AS open,
       s.started_at,
       count(t.id) FILTER (WHERE t.status = 'failed')                          AS failed
FROM sweeps s LEFT JOIN trials t ON t.sweep_id = s.id
WHERE $sweep IS NULL OR s.id = $sweep
GROUP BY ALL
ORDER BY s.started_at
"""


def sweep_to_resume(con: duckdb.DuckDBPyConnection, sweep_id: str | None = None) -> dict[str, Any] | None:
    """The sweep to resume (``sweep_id``, else the latest) as a dict, or None when there is none."""
    rows = records(con, SWEEP_TO_RESUME, {"sweep": sweep_id})
    return rows[0] if rows else None


def unfinished_trials(con: duckdb.DuckDBPyConnection, sweep_id: str) -> list[dict[str, Any]]:
    """The sweep's trials still to run, as planned-trial specs (``config`` still JSON text)."""
    return records(con, UNFINISHED_TRIALS, {"sweep": sweep_id})


def failed_trials(con: duckdb.DuckDBPyConnection, sweep_id: str) -> list[dict[str, Any]]:
    """The sweep's trials that ended ``failed``: ``trial_id`` and ``error`` (may be None)."""
    return records(con, FAILED_TRIALS, {"sweep": sweep_id})


def sweep_progress(con: duckdb.DuckDBPyConnection, sweep_id: str | None = None) -> list[tuple]:
    """Per sweep (every one, or ``sweep_id``'s): id, study, status, model_init, planned, completed, ended badly, open,
    started_at, failed."""
    return con.execute(SWEEP_PROGRESS, {"sweep": sweep_id}).fetchall()


def exported_trial(con: duckdb.DuckDBPyConnection, trial_id: str) -> tuple[str, bool, str | None] | None:
    """(status, train.export, sweep storage path) of a trial a DPO run may start from, or None if unknown."""
    return con.execute(EXPORTED_TRIAL, [trial_id]).fetchone()


SETTINGS = """
-- What each group trains with at its chosen learning rate (the decision table): method settings, batch and budget,
-- what a user keeps, and the epoch at which validation peaked (per trial the best validation step, in epochs, averaged
-- over the completed seeds).
WITH peaks AS (
    SELECT t.id, arg_max(m.step, CASE WHEN t.higher_is_better THEN m.value ELSE -m.value END) AS best_step
    FROM guide_trials t JOIN metrics m ON m.trial_id = t.id
    WHERE t.status = 'completed' AND m.split = 'validation' AND m.name = t.primary_metric
    GROUP BY t.id)
SELECT b.task, b.dimension, b."group",
       any_value(t.method_k)          AS method_k,
       any_value(t.lora_rank)         AS lora_rank,
       any_value(t.lora_alpha)        AS lora_alpha,
       any_value(t.lora_layers)       AS lora_layers,
       any_value(t.lora_targets)      AS lora_targets,
       -- the variants' and memory savers' keys, from the flat configuration (older files lack their columns)
       any_value(t.config->>'$."lora.dora"')                       AS lora_dora,
       any_value(t.config->>'$."lora.init"')                       AS lora_init,
       any_value(t.config->>'$."lora.lr_ratio"')                   AS lora_lr_ratio,
       any_value(t.config->>'$."model.quantize"')                  AS model_quantize,
       any_value(t.config->>'$."model.frozen_dtype"')              AS model_frozen_dtype,
       any_value(t.config->>'$."train.activation_checkpointing"') AS activation_checkpointing,
       any_value(t.optim_name)        AS optim_name,
       any_value(t.train_batch_size)  AS batch_size,
       any_value(t.train_epochs)      AS epochs,
       any_value(t.train_max_steps)   AS max_steps,
       avg(p.best_step * t.train_epochs / nullif(t.steps, 0)) AS best_epoch,
       avg(t.kept_bytes)              AS kept_bytes
FROM guide_best b
JOIN guide_trials t ON t.task = b.task AND t.dimension = b.dimension AND t."group" = b."group" AND t.optim_lr = b.lr
LEFT JOIN peaks p ON p.id = t.id
WHERE t.status = 'completed'
GROUP BY ALL
"""


def settings(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``SETTINGS`` keyed by (task, dimension, group)."""
    return {(r["task"], r["dimension"], r["group"]): r for r in records(con, SETTINGS)}


LR_SWEEP_ALL = """
-- Every learning rate tried for every group of every dimension (the Learning rate section's table).
SELECT task, dimension, "group", method, lr, metric, higher_is_better, n_trials, n_completed, n_diverged, n_other,
       val_mean, test_mean, test_sd
FROM guide_lr_stats
ORDER BY task, dimension, "group", lr
"""

LR_BY_SEED = """
-- Each completed trial's validation metric by group, seed and learning rate: the best learning rate chosen per seed
-- (the measured ratio of LoRA's best learning rate to full fine-tuning's, with its spread over seeds).
SELECT task, dimension, "group", method, seed, optim_lr AS lr, val_primary AS val, higher_is_better
FROM guide_trials
WHERE status = 'completed' AND val_primary IS NOT NULL
ORDER BY task, dimension, "group", seed, lr
"""



# --- the dry run's measured rates and a sweep's memberships (sweeps/launch.py grid --dry-run, resume) --------------

MEASURED_TRIALS = """
-- Completed trials that measured their speed: what `launch.py grid --dry-run --db` estimates a plan's cost from
-- (per model and method: training tokens/s, evaluation and setup seconds).
SELECT id, config, tokens_seen, train_seconds, tokens_per_s, eval_seconds, setup_seconds,
       result ->> 'device' AS device
FROM trials
WHERE status = 'completed' AND tokens_per_s > 0 AND tokens_seen > 0 AND train_seconds > 0
ORDER BY id
"""

SWEEP_MEMBERSHIPS = """
-- Every (dimension, group) each trial of a sweep serves; its own (the trials row's, its first in study order) first.
SELECT g.trial_id, g.dimension, g."group"
FROM trial_groups g JOIN trials t ON t.id = g.trial_id
WHERE t.sweep_id = $sweep
ORDER BY g.trial_id, g.dimension <> t.dimension, g.dimension, g."group"
"""


def measured_trials(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """``MEASURED_TRIALS`` as dicts (``config`` still JSON text)."""
    return records(con, MEASURED_TRIALS)


def sweep_memberships(con: duckdb.DuckDBPyConnection, sweep_id: str) -> dict[str, list[tuple[str, str]]]:
    """Trial id -> its memberships, own first (the order among the others is by name: the table keeps no order)."""
    memberships: dict[str, list[tuple[str, str]]] = {}
    for trial, dimension, group in con.execute(SWEEP_MEMBERSHIPS, {"sweep": sweep_id}).fetchall():
        memberships.setdefault(trial, []).append((dimension, group))
    return memberships


DATA_SOURCES = """
-- Which data each task's trials actually read, where a task records it (NLI: the medical set, or SICK when it was
-- unreachable): the guide labels its results with it.
SELECT task, task_source AS configured, result -> 'notes' ->> 'task_source_used' AS used,
       any_value(result -> 'notes' ->> 'task_source_fallback') AS fallback, count(*) AS trials
FROM guide_trials
WHERE status = 'completed' AND result -> 'notes' ->> 'task_source_used' IS NOT NULL
GROUP BY ALL
ORDER BY task, used
"""



# --- kept generations and the LLM judge's verdicts (the guide's side-by-side and Judged quality sections) -----------

RELATION_EXISTS = """
-- Whether a table or view of this name exists (a temporary one included): a database written before the judge
-- existed, opened read-only, has no judgments table, and the guide then leaves the section out.
SELECT count(*) > 0 FROM (SELECT table_name AS name FROM duckdb_tables() UNION ALL
                          SELECT view_name FROM duckdb_views()) WHERE name = $name
"""

# What the three judged queries share: the judgments about the generations of each group of one dimension at its
# chosen learning rate, over its completed seeds (the same trials the summary reports).
_JUDGED_TRIALS = """
FROM guide_best b
JOIN guide_trials t ON t.task = b.task AND t.dimension = b.dimension AND t."group" = b."group" AND t.optim_lr = b.lr
JOIN judgments j ON j.trial_id = t.id
WHERE b.dimension = $dimension AND t.status = 'completed'
"""

JUDGED_SCORES = """
-- Judged scores (mode 'score': 0-100 given the prompt and the reference answer) whose reply was read, per group,
-- seed, judge, rubric and prompt.
SELECT b.task, b."group", t.seed, j.judge_model, j.rubric_version, j.example, j.score AS value
""" + _JUDGED_TRIALS + """
  AND j.mode = 'score' AND j.parse_status = 'ok' AND j.score IS NOT NULL
ORDER BY b.task, b."group", t.seed, j.example
"""

JUDGED_PAIRS = """
-- Pairwise verdicts, the one place they are derived: the judge saw the trial's response first, then second, against
-- the same opponent (the reference answer, or the trial's starting model). A prompt counts only when both replies
-- were read; it is a win (1) when both orders prefer the response, a loss (0) when both prefer the opponent, else a
-- tie (0.5): the two orders disagreed (order_changed), so the verdict followed the position, not the answer.
WITH orders AS (
    SELECT b.task, b."group", t.seed, j.judge_model, j.rubric_version, j.opponent, j.example,
           any_value(j.preferred) FILTER (WHERE j.position = 'first')  AS shown_first,
           any_value(j.preferred) FILTER (WHERE j.position = 'second') AS shown_second
""" + _JUDGED_TRIALS + """
      AND j.mode = 'pairwise' AND j.parse_status = 'ok' AND j.preferred IS NOT NULL
    GROUP BY ALL)
SELECT task, "group", seed, judge_model, rubric_version, opponent, example,
       CAST(CASE WHEN shown_first <> shown_second THEN 0.5 WHEN shown_first = 'response' THEN 1 ELSE 0 END
            AS DOUBLE)                     AS value,
       shown_first <> shown_second AS order_changed
FROM orders
WHERE shown_first IS NOT NULL AND shown_second IS NOT NULL
ORDER BY task, "group", seed, example
"""

JUDGE_REQUESTS = """
-- How the judge's requests about those generations ended, per task, judge, rubric and mode: replies read ('ok'),
-- replies that could not be parsed, requests that failed after their retries, and replies reused from the cache.
-- A trial serving several groups of the dimension counts once.
WITH asked AS (
    SELECT DISTINCT b.task, j.trial_id, j.example, j.judge_model, j.rubric_version, j.mode, j.position, j.opponent,
                    j.parse_status, j.cached
""" + _JUDGED_TRIALS + """)
SELECT task, judge_model, rubric_version, mode,
       any_value(opponent) FILTER (WHERE opponent IS NOT NULL) AS opponent,
       count(*)                                         AS requests,
       count(*) FILTER (WHERE parse_status = 'ok')       AS ok,
       count(*) FILTER (WHERE parse_status = 'unparsed') AS unparsed,
       count(*) FILTER (WHERE parse_status = 'failed')   AS failed,
       count(*) FILTER (WHERE cached)                    AS cached,
       count(DISTINCT trial_id)                          AS trials
FROM asked
GROUP BY ALL
ORDER BY task, judge_model, rubric_version, mode DESC  -- score, then pairwise
"""


@dataclass(frozen=True)
class GenerationRow:
    """A kept generation of a group's lowest seed (``GENERATIONS``)."""

    task: str
    group: str
    seed: int
    example: int
    prompt: str
    reference: str | None
    response: str


@dataclass(frozen=True)
class JudgedRow:
    """One group's judged outcome on one prompt for one seed: a score (0-100), or a pairwise verdict (1 win, 0.5 tie,
    0 loss) with whether the order of presentation changed it."""

    task: str
    group: str
    seed: int
    judge_model: str
    rubric_version: str
    example: int
    value: float
    opponent: str | None = None
    order_changed: bool | None = None


@dataclass(frozen=True)
class JudgeRequests:
    """How one judge's requests of one mode about one task's compared generations ended."""

    task: str
    judge_model: str
    rubric_version: str
    mode: str
    opponent: str | None
    requests: int
    ok: int
    unparsed: int
    failed: int
    cached: int
    trials: int


def has_relation(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute(RELATION_EXISTS, {"name": name}).fetchone()[0])


def generations(con: duckdb.DuckDBPyConnection, dimension: str, prompts: int | None) -> list[GenerationRow]:
    """``GENERATIONS``: each group's lowest seed's first ``prompts`` generations (all with None)."""
    return [GenerationRow(**r) for r in records(con, GENERATIONS, {"dimension": dimension, "prompts": prompts})]


def judged_scores(con: duckdb.DuckDBPyConnection, dimension: str) -> list[JudgedRow]:
    return [JudgedRow(**r) for r in records(con, JUDGED_SCORES, {"dimension": dimension})]


def judged_pairs(con: duckdb.DuckDBPyConnection, dimension: str) -> list[JudgedRow]:
    return [JudgedRow(**r) for r in records(con, JUDGED_PAIRS, {"dimension": dimension})]


def judge_requests(con: duckdb.DuckDBPyConnection, dimension: str) -> list[JudgeRequests]:
    return [JudgeRequests(**r) for r in records(con, JUDGE_REQUESTS, {"dimension": dimension})]
