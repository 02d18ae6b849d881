"""The one training loop: every task, every method, CPU or GPU, with or without Ray around it.

``run_trial(config, callback)`` reads top to bottom as four steps: ``setup`` builds the model, task head, method,
optimizer and data from a ``TrialConfig``; ``train`` evaluates the untrained model on test once
(``evaluate_baseline``; DPO also keeps its starting weights' generations, ``Task.keeps_start_generations``), then
takes optimizer steps (``optimizer_step``) and evaluates (``validate``, with early stopping) until the step budget is
spent or the trial stops; ``finish`` evaluates the final weights, generates from them and returns the
``FinalRecord``. Everything reported goes through ``callback(record)`` as a typed record of ``sweeps/records.py``.
Checkpoints (saved along training, resumed from before it) are ``sweeps/checkpoints.py``'s; the ``Trial`` and its
``TrainState`` live in ``sweeps/trial_state.py``. Ray Tune's trainable is a thin adapter over this function; nothing
here imports Ray.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from model import GPT2, ConfigError, GPT2Config, get_tokenizer
from model.adapters import quantize_base_weights
from model.lora import lora_plus_lr_scales
from model.methods import apply_method, cast_frozen
from model.tokenizer import EOT_TOKEN_ID
from sweeps import memory
from sweeps.checkpoints import (
    load_trainable_state,
    resume,
    save_checkpoint_if_finite,
    trainable_state,
    weights_diverged,
)
from sweeps.config import ModelConfig, TrialConfig
from sweeps.optim import EmbeddingGrads, build_optimizer, build_scheduler
from sweeps.records import CheckpointRecord, EvalRecord, FinalRecord, Generation, Record, StepRecord
from sweeps.trial_state import Trial
from tasks import ExampleResults, batch_order, get_task

Callback = Callable[[Record], None]
SUBSET_SEED = 123  # subsets of the data are the same for every trial seed: seeds vary init and order, not data


class TrialResult(NamedTuple):
    """A trial's final record and the trained modules beside it (for exports; never serialised)."""

    record: FinalRecord
    model: GPT2
    head: nn.Module | None


# --------------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is available")
    return device


def build_model(config: ModelConfig, seed: int, start_from: str | None = None) -> GPT2:
    """The trial's GPT-2: a checkpoint (``model.init=pretrained``), a seeded random init of a preset's shape, or an
    earlier result (``start_from``: a checkpoint directory or a ``sweeps/train.py --out`` folder, e.g. DPO after
    instruction tuning)."""
    dropout = {"embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "resid_pdrop": config.dropout}
    if start_from is not None:
        path = Path(start_from)
        return GPT2.from_pretrained(path / "model" if (path / "model" / "config.json").is_file() else path, **dropout)
    if config.init == "pretrained":
        return GPT2.from_pretrained(config.name, **dropout)
    overrides = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd") if getattr(config, k) is not None}
    torch.manual_seed(seed if config.init_seed is None else config.init_seed)
    return GPT2(GPT2Config.from_preset(config.name, **overrides, **dropout))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(config: TrialConfig) -> Trial:
    """Data, model, task head, method and optimizer of a trial, seeded, on its device; the task prepared."""
    train = config.train
    seed_everything(train.seed)
    device = pick_device(train.device)
    memory.reset_cuda_peak(device)
    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    task = get_task(config.task, dpo=config.dpo)
    splits = task.load(get_tokenizer(), seed=SUBSET_SEED)
    if train.train_metrics:  # before prepare: DPO computes the subset's reference log-probs with the others
        splits[TRAIN_SUBSET] = splits["train"].subset(range(min(len(splits["train"]), len(splits["validation"]))))
    model = build_model(config.model, train.seed, None if config.dpo.init == "base" else config.dpo.init)
    torch.manual_seed(train.seed)
    head = task.make_head(model.config.n_embd)
    summary = apply_method(model, config.method, config.lora, head)
    if config.model.frozen_dtype == "bfloat16":
        if not use_bf16:
            raise ConfigError([("model.frozen_dtype", f"bf16 frozen weights compute under bf16 autocast, which "
                                                      f"train.precision={train.precision} on {device.type} is not")])
        cast_frozen(model, torch.bfloat16)
    if config.model.quantize == "nf4":  # after the adapters (PiSSA's residual is what gets quantized), before moving
        quantize_base_weights(model)
    model.to(device)
    if head is not None:
        head.to(device)
    lr_scales = lora_plus_lr_scales(model, config.lora.lr_ratio) if config.method.name == "lora" else {}
    optimizer = build_optimizer([model] if head is None else [model, head], config.optim, lr_scales)
    batches_per_epoch = math.ceil(len(splits["train"]) / train.batch_size)
    total_steps = train.max_steps or train.epochs * math.ceil(batches_per_epoch / train.grad_accum)
    trial = Trial(config, task, splits, model, head, summary, optimizer,
                  build_scheduler(optimizer, config.schedule, total_steps), device, use_bf16, total_steps,
                  notes={}, prepare_seconds=0.0)
    started = time.perf_counter()
    trial.notes = task.prepare(model, splits, device, trial.autocast(), train.eval_batch_size)  # DPO: reference
    trial.prepare_seconds = time.perf_counter() - started
    if train.compile:  # each block, so every forward path is compiled (torch.compile(model) covers forward only)
        model.compile_blocks()
    model.checkpoint_activations(train.activation_checkpointing)
    return trial


# --------------------------------------------------------------------------------------------------------------------
# Training: optimizer steps and evaluation
# --------------------------------------------------------------------------------------------------------------------


def step_groups(trial: Trial) -> Iterator[list[list[int]]]:
    """The micro-batch index lists of each remaining optimizer step, epoch after epoch, from where the state is.

    The order of an epoch depends on (seed, epoch) alone, so a resumed run continues the very same sequence.
    """
    state, train = trial.state, trial.config.train
    lengths = trial.splits["train"].lengths
    while state.step < trial.total_steps:
        order = batch_order(lengths, train.batch_size, train.seed, state.epoch, group_by_length=train.group_by_length)
        while state.batch_in_epoch < len(order) and state.step < trial.total_steps:
            yield order[state.batch_in_epoch : state.batch_in_epoch + train.grad_accum]
        if state.batch_in_epoch >= len(order):
            state.epoch += 1
            state.batch_in_epoch = 0


def optimizer_step(trial: Trial, group: list[list[int]], grads: EmbeddingGrads | None = None) -> StepRecord | None:
    """Forward and backward over the group's micro-batches, clip, step; None when the loss is not finite. ``grads``
    gathers sparse embedding gradients into kept dense buffers (``train`` sets it up on CPU)."""
    state, train = trial.state, trial.config.train
    started = time.perf_counter()
    trial.optimizer.zero_grad(set_to_none=True)
    loss_value, step_tokens, padded = 0.0, 0, 0
    measure = trial.activation_bytes is None and not train.compile  # saved-tensor hooks do not trace under compile
    for i, indices in enumerate(group):
        batch = trial.task.collate(trial.splits["train"], indices)
        step_tokens += batch.real_tokens  # counted on the host: no wait for the device
        padded += batch.padded_tokens
        batch = batch.to(trial.device)
        with trial.autocast(), memory.measure_saved(trial.modules) if measure else contextlib.nullcontext() as saved:
            loss, _ = trial.task.loss(trial.model, trial.head, batch)
        if measure:
            trial.activation_bytes = max(trial.activation_bytes or 0, saved.nbytes)
        (loss / len(group)).backward()
        value = loss.item()  # the one wait for the device per micro-batch, once its backward is queued
        if not math.isfinite(value):
            return None  # before any optimizer step: the weights stay those of the last finite step
        if grads is not None:
            grads.collect(first=i == 0)
        loss_value += value / len(group)
    if grads is not None:
        grads.apply()
    if train.max_grad_norm is not None:
        params = [p for m in trial.modules for p in m.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
    trial.optimizer.step()
    trial.scheduler.step()
    elapsed = time.perf_counter() - started
    state.step += 1
    state.batch_in_epoch += len(group)
    state.tokens_seen += step_tokens
    state.padded_tokens += padded
    state.train_seconds += elapsed
    return StepRecord(state.step, state.epoch, loss_value, float(trial.scheduler.get_last_lr()[0]),
                      step_tokens / max(elapsed, 1e-9), state.tokens_seen)


TRAIN_SUBSET = "train_subset"  # the fixed training examples evaluated along training (train.train_metrics)


def evaluate(trial: Trial, split: str, examples: ExampleResults | None = None) -> dict[str, float]:
    """The task's metrics of the current weights on a split (evaluation mode, then back to training); with
    ``examples``, each example's outcome under its index in the split."""
    trial.model.eval()
    train = trial.config.train
    order = batch_order(trial.splits[split].lengths, train.eval_batch_size, 0, 0, shuffle=False)
    batches = (trial.task.collate(trial.splits[split], b).to(trial.device) for b in order)
    started = time.perf_counter()
    if examples is not None:
        examples.example += [i for indices in order for i in indices]
    try:
        with trial.autocast():
            return trial.task.evaluate(trial.model, trial.head, batches, examples=examples)
    finally:
        trial.model.train()
        trial.eval_seconds += time.perf_counter() - started


def validate(trial: Trial, emit: Callback) -> EvalRecord:
    """Validation metrics (and, with ``train.train_metrics``, the training subset's) into the history and the
    callback."""
    on_train = evaluate(trial, TRAIN_SUBSET) if TRAIN_SUBSET in trial.splits else {}
    record = EvalRecord(trial.state.step, evaluate(trial, "validation"), train=on_train)
    trial.state.history.append(record)
    emit(record)
    return record


def evaluate_baseline(trial: Trial) -> None:
    """The test metrics of the model before any training (base weights, freshly initialised head; LoRA's B = 0
    leaves the base model), kept in the state so a checkpoint carries them to a resumed run. Evaluation time, not
    setup or training time."""
    trial.state.baseline_test = evaluate(trial, "test")


def should_stop(trial: Trial, record: EvalRecord) -> bool:
    """Track the best validation metric (keeping its weights for early stopping); True when patience ran out."""
    state, task, patience = trial.state, trial.task, trial.config.train.early_stopping_patience
    value = record.metrics[task.primary_metric]
    better = state.best_metric is None or (value > state.best_metric if task.higher_is_better
                                           else value < state.best_metric)
    if better:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        if patience:
            trial.best_weights = trainable_state(trial)
        return False
    state.evals_without_improvement += 1
    return bool(patience) and state.evals_without_improvement >= patience


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def train(trial: Trial, emit: Callback, checkpoint_dir: str | Path | None = None) -> str:
    """Optimizer steps until the budget is spent; returns ``completed``, ``early_stopped`` or ``diverged``."""
    state, config = trial.state, trial.config.train
    if config.baseline_eval and state.step == 0:
        evaluate_baseline(trial)
    if trial.task.keeps_start_generations and state.step == 0:  # in the state: a resumed run still has them
        state.start_generations = timed_generations(trial, "start")
    if config.eval_at_start and state.step == 0:
        validate(trial, emit)
    for module in trial.modules:
        module.train()
    # CPU, a task head (no LM head reads wte), eager: embedding gradients in kept buffers (sweeps/optim.py says why)
    sparse = trial.device.type == "cpu" and trial.head is not None and not config.compile
    grads = EmbeddingGrads.attach([trial.model]) if sparse else None
    try:
        for group in step_groups(trial):
            record = optimizer_step(trial, group, grads)
            if record is None:
                return "diverged"
            if state.step == 1 or _due(state.step, config.log_every):
                emit(record)
            evaluates = _due(state.step, config.eval_every) and state.step < trial.total_steps  # the end does anyway
            if evaluates and should_stop(trial, validate(trial, emit)):
                return "early_stopped"
            if checkpoint_dir is not None and _due(state.step, config.checkpoint_every):
                saved = save_checkpoint_if_finite(trial, checkpoint_dir)  # None: weights not finite, nothing saved
                if saved is None:
                    return "diverged"
                emit(CheckpointRecord(state.step, str(saved)))
    finally:
        if grads is not None:
            grads.release()
    return "completed"


# --------------------------------------------------------------------------------------------------------------------
# Finish
# --------------------------------------------------------------------------------------------------------------------


def account_memory(trial: Trial, record: FinalRecord) -> None:
    """The trial's memory account and, on CUDA, its measured peaks (``sweeps/memory.py``); ``peak_memory_mb`` is
    the measured peak where there is one, else the account."""
    trainable = memory.weight_bytes(trial.modules, trainable_only=True)
    record.weight_bytes = memory.weight_bytes(trial.modules)
    record.gradient_bytes = trainable
    record.kept_bytes = trainable
    record.optimizer_state_bytes = memory.optimizer_state_bytes(trial.optimizer)
    record.activation_bytes = trial.activation_bytes
    record.memory_account_bytes = (record.weight_bytes + record.gradient_bytes + record.optimizer_state_bytes
                                   + (record.activation_bytes or 0))
    record.cuda_peak_allocated_bytes, record.cuda_peak_reserved_bytes = memory.cuda_peaks(trial.device)
    measured = record.cuda_peak_allocated_bytes
    record.memory_source = "account" if measured is None else "cuda_peak"
    record.peak_memory_mb = (record.memory_account_bytes if measured is None else measured) / 2**20


def finish(trial: Trial, status: str, wall_start: float, setup_seconds: float) -> FinalRecord:
    """Evaluate the final weights (the best ones after early stopping), generate from them, and assemble the trial's
    final record (its generations: the starting weights' kept in the state, then the final ones). Final weights
    that are not finite make the trial ``diverged`` (at the last step), never a result."""
    state, task, summary = trial.state, trial.task, trial.summary
    if status == "early_stopped" and trial.best_weights is not None:
        load_trainable_state(trial, trial.best_weights)
    if status != "diverged" and weights_diverged(trial):
        status = "diverged"
    record = FinalRecord(
        status=status, task=task.name, task_kind=task.kind, primary_metric=task.primary_metric,
        higher_is_better=task.higher_is_better, step=state.step, total_steps=trial.total_steps,
        model_init=trial.config.model.init, method=summary.method, trainable_params=summary.trainable_params,
        total_params=summary.total_params, trainable_fraction=summary.trainable_fraction,
        method_notes=list(summary.notes), tokens_seen=state.tokens_seen, train_seconds=state.train_seconds,
        tokens_per_s=state.tokens_seen / max(state.train_seconds, 1e-9),
        padding_share=1 - state.tokens_seen / max(state.padded_tokens, 1), device=str(trial.device),
        precision="bf16" if trial.use_bf16 else "fp32", prepare_seconds=trial.prepare_seconds,
        history=list(state.history), split_sizes={k: len(v) for k, v in trial.splits.items()},
        resumed_from_step=trial.resumed_from_step, notes=dict(trial.notes), baseline_test=dict(state.baseline_test),
        baseline_majority=task.majority_baseline(trial.splits["train"], trial.splits["test"]))
    if status == "diverged":  # a non-finite loss stops before its step; non-finite weights came from the last one
        record.diverged_at_step = state.step if "non_finite_weights" in trial.notes else state.step + 1
    else:
        if status == "early_stopped" and trial.best_weights is not None:
            record.best_step = state.best_step
        outcomes = {split: ExampleResults() for split in ("validation", "test")}
        record.validation = evaluate(trial, "validation", outcomes["validation"])
        if TRAIN_SUBSET in trial.splits:  # the training-subset curve ends where validation's does
            record.history.append(EvalRecord(state.step, record.validation, train=evaluate(trial, TRAIN_SUBSET)))
        record.test = evaluate(trial, "test", outcomes["test"])
        record.predictions = {split: results.columns() for split, results in outcomes.items()}
        record.generations = list(state.start_generations) + timed_generations(trial, "final")
    account_memory(trial, record)
    record.setup_seconds, record.eval_seconds = setup_seconds, trial.eval_seconds
    record.wall_seconds = time.perf_counter() - wall_start
    return record


def timed_generations(trial: Trial, stage: str) -> list[Generation]:
    """The kept generations of the current weights when the task keeps any (``task.num_generations``), their time
    counted as evaluation time."""
    if not (trial.task.generates and trial.config.task.num_generations):
        return []
    started = time.perf_counter()
    try:
        return generate_samples(trial, stage)
    finally:
        trial.eval_seconds += time.perf_counter() - started


@torch.no_grad()
def generate_samples(trial: Trial, stage: str) -> list[Generation]:
    """Greedy continuations of the first ``task.num_generations`` test prompts (fixed across trials), decoded, with
    the reference answer, in example order.

    Batched for speed (``train.eval_batch_size`` rows, similar prompt lengths together, left-padded: ``GPT2.generate``
    continues each row exactly as it would alone) wherever prompt + ``train.max_new_tokens`` fits the context; a
    longer prompt generates alone with what room is left, and one that leaves no room is skipped."""
    enc, split, train = get_tokenizer(), trial.splits["test"], trial.config.train
    n_positions = trial.model.config.n_positions
    pairs = {i: trial.task.prompt_and_reference(split, i) for i in range(min(trial.config.task.num_generations,
                                                                              len(split)))}
    fits = sorted((i for i, (p, _) in pairs.items() if len(p) + train.max_new_tokens <= n_positions),
                  key=lambda i: len(pairs[i][0]))
    responses: dict[int, list[int]] = {}
    for start in range(0, len(fits), train.eval_batch_size):
        rows = fits[start : start + train.eval_batch_size]
        responses.update(zip(rows, _greedy(trial, [pairs[i][0] for i in rows], train.max_new_tokens), strict=True))
    for i, (prompt, _) in pairs.items():
        if i not in responses and n_positions - len(prompt) >= 1:
            responses[i] = _greedy(trial, [prompt], n_positions - len(prompt))[0]
    return [Generation(stage, i, enc.decode(pairs[i][0].tolist()), enc.decode(pairs[i][1]), enc.decode(responses[i]))
            for i in sorted(responses)]


def _greedy(trial: Trial, prompts: list[torch.Tensor], budget: int) -> list[list[int]]:
    """The new tokens of each prompt's greedy continuation, up to ``budget`` and without end-of-text tokens (a row
    that ended is filled with them); the prompts left-padded into one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), EOT_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    with trial.autocast():
        out = trial.model.generate(ids.to(trial.device), budget, eos_token_id=EOT_TOKEN_ID,
                                   attention_mask=mask.to(trial.device))
    return [[t for t in row if t != EOT_TOKEN_ID] for row in out[:, width:].tolist()]


# --------------------------------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------------------------------


def run_trial(
    config: TrialConfig,
    callback: Callback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | Sequence[str | Path] | None = None,
) -> TrialResult:
    """Train and evaluate one trial; the final record (also sent to ``callback``) and the trained modules.

    ``resume_from``: a checkpoint folder (a damaged one falls back to its newest good older sibling, with a warning)
    or candidate folders, newest first; ``sweeps.checkpoints.NoGoodCheckpoint`` when none is good (see
    ``sweeps.checkpoints.resume``)."""
    emit = callback or (lambda record: None)
    wall_start = time.perf_counter()
    trial = setup(config)
    if resume_from is not None:
        resume(trial, resume_from)
    setup_seconds = time.perf_counter() - wall_start
    status = train(trial, emit, checkpoint_dir)
    record = finish(trial, status, wall_start, setup_seconds)
    emit(record)
    return TrialResult(record, trial.model, trial.head)
