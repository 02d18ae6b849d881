"""The one training loop: every task, every method, CPU or GPU, with or without Ray around it.

``run_trial(config, callback)`` builds the model, task head and optimizer from a ``TrialConfig``, trains, evaluates and
returns the final record. Everything it reports goes through ``callback(record)``: ``event`` is ``step`` (loss, lr,
tokens/s), ``eval`` (validation metrics), ``checkpoint`` (a path to resume from) or ``final`` (status, validation and
test metrics, parameter counts, peak memory, wall time, tokens seen, padding share, generations). Ray Tune's trainable
(issue 5) is a thin adapter over this function; nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model import GPT2, GPT2Config, get_tokenizer
from model.methods import apply_method
from model.tokenizer import EOT_TOKEN_ID
from sweeps.optim import build_optimizer, build_scheduler
from tasks import Batch, Task, batch_order, get_task

Callback = Callable[[dict[str, Any]], None]
SUBSET_SEED = 123  # subsets of the data are the same for every trial seed: seeds vary init and order, not data


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
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is available")
    return device


def build_model(config: Any, seed: int, start_from: str | None = None) -> GPT2:
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
    torch.manual_seed(seed)
    return GPT2(GPT2Config.from_preset(config.name, **overrides, **dropout))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every generator a trial draws from, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model: nn.Module, head: nn.Module | None) -> dict[str, torch.Tensor]:
    tensors = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if head is not None:
        tensors.update({f"head.{n}": p.detach().clone() for n, p in head.named_parameters()})
    return tensors


def _load_trainable_state(model: nn.Module, head: nn.Module | None, tensors: dict[str, torch.Tensor]) -> None:
    params = {f"model.{n}": p for n, p in model.named_parameters()}
    if head is not None:
        params.update({f"head.{n}": p for n, p in head.named_parameters()})
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


def run_trial(
    config: Any,
    callback: Callback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate one trial; returns the ``final`` record (also sent to ``callback``)."""
    emit = callback or (lambda record: None)
    train = config.train
    wall_start = time.perf_counter()
    seed_everything(train.seed)
    device = pick_device(train.device)
    use_bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())

    enc = get_tokenizer()
    task = get_task(config.task, dpo=config.dpo)
    splits = task.load(enc, seed=SUBSET_SEED)
    model = build_model(config.model, train.seed, None if config.dpo.init == "base" else config.dpo.init)
    torch.manual_seed(train.seed)
    head = task.make_head(model.config.n_embd)
    summary = apply_method(model, config.method, config.lora, head)
    model.to(device)
    if head is not None:
        head.to(device)
    modules = [model] if head is None else [model, head]
    optimizer = build_optimizer(modules, config.optim)
    prepare_started = time.perf_counter()
    prepared = task.prepare(model, splits, device, autocast, train.eval_batch_size)  # DPO: the reference log-probs
    prepared["prepare_seconds"] = time.perf_counter() - prepare_started

    lengths = splits["train"].lengths
    batches_per_epoch = math.ceil(len(lengths) / train.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / train.grad_accum)
    total_steps = train.max_steps or train.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, config.schedule, total_steps)

    state = TrainState()
    resumed_from_step = 0
    if resume_from is not None:
        saved = torch.load(Path(resume_from) / "state.pt", weights_only=True, map_location="cpu")
        _load_trainable_state(model, head, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["state"])
        _set_rng_state(saved["rng"])
        resumed_from_step = state.step
    best_weights = None
    forward_model = torch.compile(model) if train.compile else model

    def evaluate(split: str) -> dict[str, float]:
        model.eval()
        order = batch_order(splits[split].lengths, train.eval_batch_size, 0, 0, shuffle=False)
        with autocast:
            metrics = task.evaluate(forward_model, head, (task.collate(splits[split], b).to(device) for b in order))
        model.train()
        return metrics

    def save_checkpoint() -> Path:
        path = Path(checkpoint_dir) / f"step_{state.step:07d}"
        path.mkdir(parents=True, exist_ok=True)
        payload = {"trainable": _trainable_state(model, head), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "state": asdict(state), "rng": _rng_state()}
        torch.save(payload, path / "state.pt.tmp")
        os.replace(path / "state.pt.tmp", path / "state.pt")
        return path

    def validate() -> float:
        """Validation metrics into the history and the callback; returns the primary metric."""
        metrics = {f"val_{k}": v for k, v in evaluate("validation").items()}
        state.history.append({"step": state.step, **metrics})
        emit({"event": "eval", "step": state.step, **metrics})
        return metrics[f"val_{task.primary_metric}"]

    status = "completed"
    if train.eval_at_start and state.step == 0:
        validate()
    model.train()
    if head is not None:
        head.train()
    while state.step < total_steps and status == "completed":
        order = batch_order(lengths, train.batch_size, train.seed, state.epoch, group_by_length=train.group_by_length)
        while state.batch_in_epoch < len(order) and state.step < total_steps:
            step_start = time.perf_counter()
            group = order[state.batch_in_epoch : state.batch_in_epoch + train.grad_accum]
            optimizer.zero_grad(set_to_none=True)
            loss_value, step_tokens = 0.0, 0
            for indices in group:
                batch: Batch = task.collate(splits["train"], indices).to(device)
                with autocast:
                    loss, _ = task.loss(forward_model, head, batch)
                if not torch.isfinite(loss):
                    status = "diverged"
                    break
                (loss / len(group)).backward()
                loss_value += loss.item() / len(group)
                step_tokens += batch.real_tokens
                state.padded_tokens += batch.padded_tokens
            if status == "diverged":
                break
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters() if p.requires_grad],
                                               train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += len(group)
            state.tokens_seen += step_tokens
            elapsed = time.perf_counter() - step_start
            state.train_seconds += elapsed
            if state.step == 1 or state.step % train.log_every == 0:
                emit({"event": "step", "step": state.step, "epoch": state.epoch, "loss": loss_value,
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": step_tokens / max(elapsed, 1e-9),
                      "tokens_seen": state.tokens_seen})
            if train.eval_every and state.step % train.eval_every == 0 and state.step < total_steps:
                value = validate()
                better = state.best_metric is None or (value > state.best_metric if task.higher_is_better
                                                       else value < state.best_metric)
                if better:
                    state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
                    if train.early_stopping_patience:
                        best_weights = _trainable_state(model, head)
                else:
                    state.evals_without_improvement += 1
                    if train.early_stopping_patience and state.evals_without_improvement >= train.early_stopping_patience:
                        status = "early_stopped"
                        break
            if checkpoint_dir is not None and train.checkpoint_every and state.step % train.checkpoint_every == 0:
                emit({"event": "checkpoint", "step": state.step, "checkpoint": str(save_checkpoint())})
        if state.batch_in_epoch >= len(order):
            state.epoch += 1
            state.batch_in_epoch = 0

    final: dict[str, Any] = {
        "event": "final", "status": status, "step": state.step, "total_steps": total_steps, "task": task.name,
        "task_kind": task.kind, "primary_metric": task.primary_metric, "model_init": config.model.init,
        "method": summary.method, "trainable_params": summary.trainable_params, "total_params": summary.total_params,
        "trainable_fraction": summary.trainable_fraction, "method_notes": summary.notes,
        "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
        "tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
        "padding_share": 1 - state.tokens_seen / max(state.padded_tokens, 1), "device": str(device),
        "precision": "bf16" if use_bf16 else "fp32", "history": state.history,
        "split_sizes": {k: len(v) for k, v in splits.items()}, "resumed_from_step": resumed_from_step,
    }
    if status == "diverged":
        final["diverged_at_step"] = state.step + 1
    else:
        if status == "early_stopped" and best_weights is not None:
            _load_trainable_state(model, head, best_weights)
            final["best_step"] = state.best_step
        final.update({f"val_{k}": v for k, v in evaluate("validation").items()})
        final.update({f"test_{k}": v for k, v in evaluate("test").items()})
        if task.generates and config.task.num_generations:
            final["generations"] = generate_samples(model, task, splits["test"], config, device, autocast)
    final["peak_memory_mb"] = peak_memory_mb(device)
    final.update(prepared)
    final["wall_seconds"] = time.perf_counter() - wall_start
    final["model"], final["head"] = model, head  # for the caller's export; stripped before any serialisation
    emit({k: v for k, v in final.items() if k not in ("model", "head")})
    return final


@torch.no_grad()
def generate_samples(model: GPT2, task: Task, split: Any, config: Any, device: torch.device,
                     autocast: Any) -> list[dict[str, str]]:
    """Greedy continuations of the first test prompts (fixed across trials), decoded, with the reference answer."""
    enc = get_tokenizer()
    samples = []
    model.eval()
    for i in range(min(config.task.num_generations, len(split))):
        prompt, reference = task.prompt_and_reference(split, i)
        budget = min(config.train.max_new_tokens, model.config.n_positions - len(prompt))
        if budget < 1:
            continue
        with autocast:
            out = model.generate(prompt[None].to(device), budget, eos_token_id=EOT_TOKEN_ID)[0, len(prompt):]
        new = [t for t in out.tolist() if t != EOT_TOKEN_ID]
        samples.append({"prompt": enc.decode(prompt.tolist()), "generation": enc.decode(new),
                        "reference": enc.decode(reference)})
    return samples


def strip_objects(record: dict[str, Any]) -> dict[str, Any]:
    """The record without the live model objects (for JSON and Ray)."""
    return {k: v for k, v in record.items() if k not in ("model", "head")}

