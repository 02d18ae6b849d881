"""Tasks on real data behind one small interface (``tasks.base.Task``). Knows nothing of Ray."""

from tasks.alpaca import Alpaca
from tasks.base import Batch, EncodedSplit, Task, TaskConfig, batch_order, collate
from tasks.data import DataError
from tasks.imdb import Imdb
from tasks.nli import Nli
from tasks.preference import Preference
from tasks.sms_spam import SmsSpam

TASKS: dict[str, type[Task]] = {t.name: t for t in (SmsSpam, Imdb, Nli, Alpaca, Preference)}


def get_task(config: TaskConfig, dpo: object | None = None) -> Task:
    """The task object for a validated ``TaskConfig`` (``dpo``: the DPO options of a preference task)."""
    if config.name == "preference":
        return Preference(config, dpo)
    return TASKS[config.name](config)


__all__ = ["TASKS", "Batch", "DataError", "EncodedSplit", "Task", "TaskConfig", "batch_order", "collate", "get_task"]
