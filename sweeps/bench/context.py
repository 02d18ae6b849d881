"""What the preflight's checks share: a report line (``Check``) and ``Skipped``, the shapes they run on, the context
passed from check to check (device, the random checkpoints, what earlier checks measured), and the targets."""

from __future__ import annotations

import gc
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import GPT2, GPT2Config
from sweeps.bench.timing import autocast_for

SECTIONS = {"correct": "Correct on this device", "fast": "Fast on this device", "cost": "A study's cost on this machine"}
STATUSES = ("pass", "fail", "info", "skipped")


@dataclass
class Check:
    """One line of the report: what was checked, how it came out, against which target, and how it was measured."""

    section: str
    name: str
    status: str
    figure: str
    target: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES or self.section not in SECTIONS:
            raise ValueError(f"check {self.name!r}: status {self.status!r} / section {self.section!r} unknown")


class Skipped(Exception):
    """A check that cannot run here (a package or the data is missing): reported as ``skipped`` with the reason."""


@dataclass(frozen=True)
class Shapes:
    """What the checks run on. The GPU shapes are the real ones; ``--cpu`` runs the very same code on tiny shapes, in
    seconds, so the script cannot rot unnoticed. ``target_seq`` is the length the speed targets are judged at."""

    cpu: bool
    model: str
    model_overrides: dict[str, int]
    medium: str
    medium_overrides: dict[str, int]
    seqs: tuple[int, ...]
    batch: int
    memory_batch: int
    memory_seq: int
    rounds: int
    warmup: int
    matmul_n: int
    compile_backend: str
    trial: dict[str, Any]
    packing: tuple[int, ...]
    trials_per_worker: int

    @property
    def target_seq(self) -> int:
        return self.seqs[len(self.seqs) // 2]

    @classmethod
    def gpu(cls) -> Shapes:
        trial = {"model.name": "gpt2", "task.max_train_examples": 256, "task.max_eval_examples": 128,
                 "train.batch_size": 16, "train.max_steps": 32, "train.device": "cuda"}
        return cls(False, "gpt2", {}, "gpt2-medium", {}, (128, 512, 1024), batch=8, memory_batch=8, memory_seq=512,
                   rounds=10, warmup=3, matmul_n=8192, compile_backend="inductor", trial={**SMALL_TRIAL, **trial},
                   packing=(1, 2, 4, 8), trials_per_worker=2)

    @classmethod
    def tiny(cls) -> Shapes:
        """Inductor compiles the tiny model's first step in ~20 s cold on 2 CPU cores (measured while writing this),
        so ``--cpu`` compiles with ``aot_eager``: the same graph capture and autograd, no generated kernels."""
        tiny = {"n_layer": 2, "n_embd": 64, "n_head": 2}
        trial = {"model.name": "gpt2", **{f"model.{k}": v for k, v in tiny.items()}, "task.max_train_examples": 32,
                 "task.max_eval_examples": 16, "train.batch_size": 4, "train.max_steps": 4, "train.device": "cpu"}
        return cls(True, "gpt2", tiny, "gpt2-medium", {"n_layer": 4, "n_embd": 128, "n_head": 4}, (16, 32, 64),
                   batch=2, memory_batch=2, memory_seq=64, rounds=2, warmup=1, matmul_n=512,
                   compile_backend="aot_eager", trial={**SMALL_TRIAL, **trial}, packing=(1, 2), trials_per_worker=2)

    def config(self, medium: bool = False) -> GPT2Config:
        return (GPT2Config.from_preset(self.medium, **self.medium_overrides) if medium
                else GPT2Config.from_preset(self.model, **self.model_overrides))

    def label(self, medium: bool = False) -> str:
        name, overrides = (self.medium, self.medium_overrides) if medium else (self.model, self.model_overrides)
        return name + "".join(f" {k}={v}" for k, v in overrides.items())


# A small LoRA trial as a study runs it (random init: the preflight needs no download), every step reported so the
# last step's time is known. Shapes add the model, sizes and device.
SMALL_TRIAL: dict[str, Any] = {"task.name": "sms_spam", "model.init": "random", "method.name": "lora",
                               "lora.rank": 8, "train.log_every": 1}


@dataclass
class Context:
    """What the checks share: shapes, device, a scratch folder with the random checkpoints every side loads, and
    what earlier checks measured (speeds feed the MFU check and the rates; overhead and packing feed the rates)."""

    shapes: Shapes
    device: torch.device
    workdir: Path
    speeds: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)
    _checkpoints: dict[bool, Path] = field(default_factory=dict)

    def checkpoint(self, medium: bool = False) -> Path:
        """A random-weights checkpoint of the model (or the medium model), written once: ours and transformers load it."""
        if medium not in self._checkpoints:
            torch.manual_seed(0)
            path = self.workdir / ("medium" if medium else "model")
            GPT2(self.shapes.config(medium)).save_pretrained(path)
            self._checkpoints[medium] = path
        return self._checkpoints[medium]

    def autocast(self) -> AbstractContextManager:
        return autocast_for(self.device)

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.device.type == "cuda" else "fp32"

    def judged(self, ok: bool) -> str:
        """A target's status: pass or fail on a GPU; on ``--cpu`` shapes the targets are shown, not judged."""
        return "info" if self.shapes.cpu else ("pass" if ok else "fail")


def _free(device: torch.device) -> None:
    """Between checks: drop what the last one left, so each memory figure is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


SPEED_TARGET, MFU_TARGET, MEMORY_TARGET, PACKING_TARGET, OVERHEAD_TARGET = 1.5, 0.40, 0.5, 3.0, 0.05
LORA = dict(rank=8, alpha=16, targets="attention")  # sweeps/bench/step.py's adapters
