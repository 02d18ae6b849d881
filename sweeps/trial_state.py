"""A running trial and its position: what ``sweeps.loop`` builds and advances, and what ``sweeps.checkpoints``
saves and restores."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from model import GPT2
from model.methods import MethodSummary
from sweeps.config import TrialConfig
from sweeps.records import EvalRecord, Generation
from tasks import EncodedSplit, Task


@dataclass
class TrainState:
    """Where a run is; saved in checkpoints so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # index of the next micro-batch of this epoch
    tokens_seen: int = 0  # real (non-pad) training tokens
    padded_tokens: int = 0  # training tokens including padding
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[EvalRecord] = field(default_factory=list)
    baseline_test: dict[str, float] = field(default_factory=dict)  # test metrics before step 1 (baseline_eval)
    start_generations: list[Generation] = field(default_factory=list)  # the starting weights' (keeps_start_...)

    def to_saved(self) -> dict[str, Any]:
        return asdict(self)  # records as plain dicts: what torch.load(weights_only=True) reads back

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved (one from before ``start_generations`` has none)."""
        return cls(**{**saved, "history": [EvalRecord(**e) for e in saved["history"]],
                      "start_generations": [Generation(**g) for g in saved.get("start_generations", [])]})


@dataclass
class Trial:
    """A running trial: what ``sweeps.loop.setup`` built, read and advanced by the steps of
    ``sweeps.loop.run_trial``."""

    config: TrialConfig
    task: Task
    splits: dict[str, EncodedSplit]
    model: GPT2
    head: nn.Module | None
    summary: MethodSummary
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    use_bf16: bool
    total_steps: int
    notes: dict[str, Any]
    prepare_seconds: float
    state: TrainState = field(default_factory=TrainState)
    resumed_from_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    activation_bytes: int | None = None  # saved for backward by the first micro-batch of this run (memory account)
    eval_seconds: float = 0.0

    @property
    def modules(self) -> list[nn.Module]:
        return [self.model] if self.head is None else [self.model, self.head]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
