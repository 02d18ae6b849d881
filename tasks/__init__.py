"""Tasks on real data behind one small interface (``tasks.base.Task``). Knows nothing of Ray."""

from tasks.alpaca import Alpaca
from tasks.base import Batch, EncodedSplit, Task, TaskConfig, batch_order, collate
from tasks.data import DataError
from tasks.imdb import Imdb
from tasks.nli import Nli
from tasks.sms_spam import SmsSpam

TASKS: dict[str, type[Task]] = {t.name: t for t in (SmsSpam, Imdb, Nli, Alpaca)}


def get_task(config: TaskConfig) -> Task:
    """The task object for a validated ``TaskConfig``."""
    return TASKS[config.name](config)


__all__ = ["TASKS", "Batch", "DataError", "EncodedSplit", "Task", "TaskConfig", "batch_order", "collate", "get_task"]
