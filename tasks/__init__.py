"""Tasks on real data behind one small interface (``tasks.base.Task``). Knows nothing of Ray."""

from tasks.base import Batch, EncodedSplit, ExampleResults, Task, batch_order, collate
from tasks.config import TaskConfig
from tasks.data import DataError
from tasks.registry import TASKS, get_task

__all__ = ["TASKS", "Batch", "DataError", "EncodedSplit", "ExampleResults", "Task", "TaskConfig", "batch_order", "collate", "get_task"]
