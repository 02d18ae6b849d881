"""Timing the benchmarks and the preflight share: wait for the device's queued work, time sides that alternate
within each round, and the precision trials run at."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device,
            autocast: AbstractContextManager) -> dict[str, float]:
    """Median seconds per step of each side, alternating which goes first every round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            start = time.perf_counter()
            with autocast:
                steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def autocast_for(device: torch.device) -> AbstractContextManager:
    """How trials run: bf16 autocast on CUDA, float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
