"""The SQL the project asks of the study database, in one place (the guide's queries join these in issue 6)."""

from __future__ import annotations

import duckdb

GROUP_SUMMARY = """
-- Per task, dimension and group: how many trials ended, the mean and spread over seeds of the test metric at each
-- learning rate, and what the method trains. Random-init sweeps are labelled as such.
SELECT t.task, t.dimension, t."group", t.method, t.optim_lr AS lr,
       count(*) FILTER (WHERE t.status = 'completed')       AS completed,
       count(*) FILTER (WHERE t.status <> 'completed')      AS other,
       any_value(t.primary_metric)                          AS metric,
       avg(t.test_primary)                                  AS test_mean,
       stddev_samp(t.test_primary)                          AS test_sd,
       avg(t.trainable_params)                              AS trainable_params,
       avg(t.wall_seconds)                                  AS wall_seconds,
       any_value(s.model_init)                              AS model_init
FROM trials t JOIN sweeps s ON s.id = t.sweep_id
WHERE t.sweep_id = $sweep
GROUP BY ALL
ORDER BY t.task, t.dimension,
         CASE WHEN any_value(t.primary_metric) = 'perplexity' THEN avg(t.test_primary) ELSE -avg(t.test_primary) END
         NULLS LAST  -- best first: lowest perplexity, highest accuracy
"""

LATEST_SWEEP = "SELECT id FROM sweeps ORDER BY started_at DESC LIMIT 1"


def group_summary(con: duckdb.DuckDBPyConnection, sweep_id: str) -> list[tuple]:
    return con.execute(GROUP_SUMMARY, {"sweep": sweep_id}).fetchall()


def latest_sweep(con: duckdb.DuckDBPyConnection) -> str | None:
    row = con.execute(LATEST_SWEEP).fetchone()
    return row[0] if row else None
