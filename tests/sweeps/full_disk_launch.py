"""``sweeps/launch.py`` whose database fills its disk at the Nth trial's final record (tests only; issue 16 item 7).

    FINETUNE_TEST_FULL_DISK_AT=2 python -m tests.sweeps.full_disk_launch grid --study smoke ...

The driver's writer raises ``OSError(ENOSPC)`` half-way through the Nth final record's rows (after the trial row,
at its predictions) and at every later one, as a full filesystem would. Shipped code has no hook for this: the
wrapper swaps ``ResultsWriter.write_predictions`` in the driver process before running ``sweeps.launch.main``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import sweeps.launch as launch  # first, as `python sweeps/launch.py` does: it sets Ray's environment defaults
from analysis.db import ResultsWriter

FULL_AT = "FINETUNE_TEST_FULL_DISK_AT"


def install(at: int) -> None:
    """From the ``at``-th final record on, writing its predictions fails with ENOSPC."""
    shipped = ResultsWriter.write_predictions
    calls = 0

    def write_predictions(self: ResultsWriter, trial_id: str, rows: Any) -> None:
        nonlocal calls
        calls += 1
        if calls >= at:
            raise OSError(errno.ENOSPC, "No space left on device", f"{self.path}.wal")
        shipped(self, trial_id, rows)

    ResultsWriter.write_predictions = write_predictions


if __name__ == "__main__":
    install(int(os.environ[FULL_AT]))
    sys.exit(launch.main())
