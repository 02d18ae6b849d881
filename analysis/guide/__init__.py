"""From the study database to the guide's content: groups with intervals, findings, tables, figures.

One module per part of the guide: ``records`` (the shared vocabulary and formatting), ``sentences`` (the calibrated
sentences every part uses), ``decisions``, ``summary`` (summary, per-dimension sections, across tasks),
``learning_rates``, ``pareto``, ``judged``, ``generations``, ``reproduce`` (with how to read), and ``assemble``
(``collect``, which puts them together).

``collect`` runs the queries of ``analysis/queries.py`` (the only SQL), turns seed and per-example statistics into
intervals (``analysis/stats.py``), compares the groups of each task and dimension (``analysis/compare.py``), and
returns a ``Guide`` the Jinja2 templates in ``report_templates/`` lay out. Every number in the guide is formatted here
from a query's result; the templates only place it.

A finding is one comparison with the group that is best on validation in one task and dimension, or a divergence:
- ``beats``:        one group is better on test (Holm-adjusted, paired over seeds and test examples);
- ``equivalent``:   the whole interval of the difference lies inside the metric's practical margin ±δ;
- ``inconclusive``: neither; the sentence says the smallest difference the study can detect and the seeds needed;
- ``single_seed``:  the two share fewer than two seeds, so nothing is concluded;
- ``diverged``:     some seeds of a group at a learning rate diverged.

The Judged quality section (``judged_section``, present only when an LLM judge was run: analysis/judge.py) treats the
judge's 0-100 scores and pairwise win rates of the kept generations like a test metric measured on judged prompts:
the same intervals, the same paired comparisons with the group best on validation, worded by the same functions.
Its findings stay in that section: Recommendations and What to use read the task's primary metric only.
"""

from analysis.guide.assemble import Guide, collect
from analysis.guide.learning_rates import lr_blocks, lr_ratios
from analysis.guide.records import METHOD_COLOURS, OTHER_COLOUR, Group, fmt_count, metric_title, task_title
from analysis.guide.sentences import family_verdicts
from analysis.guide.summary import across_tasks

__all__ = ["METHOD_COLOURS", "OTHER_COLOUR", "Group", "Guide", "across_tasks", "collect", "family_verdicts",
           "fmt_count", "lr_blocks", "lr_ratios", "metric_title", "task_title"]
