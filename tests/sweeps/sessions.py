"""Processes a test starts in their own session, ended by that recorded session id (never by name)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def pids_in_session(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


class Sessions:
    """Start commands each in a new session; ``end_all`` kills every process of those sessions (Ray's workers
    leave the process group but stay in the session)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def end(self, proc: subprocess.Popen) -> None:
        for _ in range(50):
            pids = pids_in_session(proc.pid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        proc.wait(timeout=30)

    def end_all(self) -> list[int]:
        """End everything; returns pids still alive in the recorded sessions (should be none)."""
        for proc in self.procs:
            self.end(proc)
        return [pid for proc in self.procs for pid in pids_in_session(proc.pid)]
