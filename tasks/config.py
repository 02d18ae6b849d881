"""The task section of a trial's configuration, checked against the task registry (names, sources)."""

from __future__ import annotations

from model.config import Problems
from tasks.options import TaskOptions
from tasks.registry import TASKS


class TaskConfig(TaskOptions):
    """``TaskOptions`` whose name is a registered task and whose source is one of that task's."""

    def _check_name(self, problems: Problems) -> None:
        if self.name not in TASKS:
            problems.add("name", f"unknown task {self.name!r}; choose one of {', '.join(TASKS)}")

    def _check_source(self, problems: Problems) -> None:
        if self.source is None or self.name not in TASKS:
            return
        allowed = TASKS[self.name].source_names
        if not allowed:
            problems.add("source", f"task {self.name} has a single source; leave task.source unset")
        elif self.source not in allowed:
            problems.add("source", f"unknown {self.name} source {self.source!r}; choose one of {', '.join(allowed)}")
