"""The preflight's packing check ("A study's cost on this machine"): trials per hour with k small trials at once on
the device, run by plain worker processes."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sweeps.bench.context import PACKING_TARGET, Check, Context
from sweeps.bench.overhead import data_ready, timed_trial

REPO = Path(__file__).resolve().parents[2]

WORKER_TAG = "PREFLIGHT-WORKER "


def worker(cpu: bool) -> None:
    """A packing worker (a subprocess): says it is ready, then runs the small trials it is sent back to back through
    ``sweeps.loop.run_trial`` and replies with their wall seconds; one JSON line each way."""
    from sweeps.config import TrialConfig

    if not cpu and torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, as a Ray worker holding its GPU share has it
    print(WORKER_TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            return
        torch.set_num_threads(command["threads"])
        walls = []
        for seed in range(command["trials"]):
            started = time.perf_counter()
            timed_trial(TrialConfig.from_flat({**command["config"], "train.seed": seed}))
            walls.append(time.perf_counter() - started)
        print(WORKER_TAG + json.dumps({"walls": walls}), flush=True)


class PackingWorker:
    """One ``worker`` subprocess, its stdout read by a thread (so a dead or hung worker cannot block the report)."""

    def __init__(self, cpu: bool, log: Path) -> None:
        import queue
        import subprocess
        import threading

        self.log_path = log
        self._log = log.open("w")
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-c", f"from sweeps.bench.packing import worker; worker({cpu})"],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env={**os.environ, "PYTHONPATH": path})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(WORKER_TAG):
                self.lines.put(line[len(WORKER_TAG):])
        self.lines.put(None)

    def send(self, command: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 600) -> dict[str, Any]:
        import queue

        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"packing worker {self.proc.pid} gave no answer in {timeout:.0f} s") from None
        if line is None:
            tail = self.log_path.read_text()[-1500:]
            raise RuntimeError(f"packing worker {self.proc.pid} exited ({self.proc.wait()}): {tail}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.send({"quit": True})
            self.proc.wait(timeout=30)
        except Exception:  # a dead or hung worker: end it (it is ours, started above)
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextmanager
def worker_pool(n: int, ctx: Context) -> Iterator[list[PackingWorker]]:
    """``n`` ready workers, ended however the block ends."""
    workers: list[PackingWorker] = []
    try:
        for i in range(n):
            workers.append(PackingWorker(ctx.shapes.cpu, ctx.workdir / f"worker-{i}.log"))
        for w in workers:
            w.receive()
        yield workers
    finally:
        for w in workers:
            w.close()


def _round(workers: list[PackingWorker], config: dict[str, Any], trials: int, threads: int | None = None) -> float:
    """Seconds for every worker to run ``trials`` small trials back to back, all at once (CPU threads shared, or
    ``threads`` each)."""
    started = time.perf_counter()
    for w in workers:
        w.send({"config": config, "trials": trials,
                "threads": threads or max(1, (os.cpu_count() or 1) // len(workers))})
    for w in workers:
        w.receive()
    return time.perf_counter() - started


def check_packing(ctx: Context) -> list[Check]:
    """Trials per hour with k small LoRA trials at once on the device against one at a time. k plain processes
    share the GPU exactly as Ray's fractional GPUs (``--gpus-per-trial 1/k``) have k workers share it; each runs its
    trials back to back through ``sweeps.loop.run_trial``, after one warm-up trial all together (as reused Ray
    workers are warm)."""
    data_ready(ctx)
    shapes, n = ctx.shapes, ctx.shapes.trials_per_worker
    per_hour = {}
    with worker_pool(max(shapes.packing), ctx) as workers:
        threads = 1 if shapes.cpu else None  # as the preflight itself runs in --cpu mode
        _round(workers, shapes.trial, 1, threads)
        for k in shapes.packing:
            per_hour[k] = k * n * 3600 / _round(workers[:k], shapes.trial, n, threads)
    gains = {k: rate / per_hour[shapes.packing[0]] for k, rate in per_hour.items()}
    best = max(gains, key=gains.__getitem__)
    ctx.rates["packing"] = {str(k): round(g, 3) for k, g in gains.items()}
    try:
        ray = f"Ray {metadata.version('ray')} is installed; measured without it"
    except metadata.PackageNotFoundError:
        ray = "Ray is not installed here"
    return [Check("cost", "target: packing small LoRA trials", ctx.judged(gains[best] >= PACKING_TARGET),
                  f"{gains[best]:.2f}x trials/hour at {best} per {'GPU' if not shapes.cpu else 'CPU'}",
                  f">= {PACKING_TARGET}x", "; ".join(f"{k} at once: {per_hour[k]:,.0f} trials/hour ({gains[k]:.2f}x)"
                                                      for k in shapes.packing)
                  + f". {n} trials per process back to back, {shapes.label()}; plain concurrent processes ({ray}), "
                    "as Ray's fractional GPUs run k workers at once on one GPU")]

