"""Every task by name: the one list of task names, read by ``TaskConfig`` validation and by ``get_task``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.alpaca import Alpaca
from tasks.base import Task
from tasks.imdb import Imdb
from tasks.nli import Nli
from tasks.preference import Preference
from tasks.sms_spam import SmsSpam

if TYPE_CHECKING:
    from tasks.dpo import DPOConfig
    from tasks.options import TaskOptions

TASKS: dict[str, type[Task]] = {t.name: t for t in (SmsSpam, Imdb, Nli, Alpaca, Preference)}


def get_task(config: TaskOptions, dpo: DPOConfig | None = None) -> Task:
    """The task object for a validated ``TaskConfig``; ``dpo`` (the trial's DPO options) shapes the preference task
    and is ignored by the others."""
    return TASKS[config.name].for_trial(config, dpo=dpo)
