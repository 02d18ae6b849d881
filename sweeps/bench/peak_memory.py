"""The preflight's memory check ("Fast on this device"): peak memory of LoRA against full fine-tuning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from model import GPT2
from sweeps.bench.context import LORA, MEMORY_TARGET, Check, Context, _free
from sweeps.bench.step import make_batch


def _training_setup(ctx: Context, method: str, medium: bool) -> tuple[GPT2, Callable[[], torch.Tensor], Any]:
    """A model of the method with the trials' optimizer, and a function computing the task loss of one batch."""
    from model.lora import LoRAConfig
    from model.methods import MethodConfig, apply_method
    from sweeps.optim import OptimConfig, build_optimizer
    from tasks import TaskConfig, get_task

    model = GPT2.from_pretrained(ctx.checkpoint(medium)).to(ctx.device).train()
    apply_method(model, MethodConfig(name=method), LoRAConfig(**LORA), None)
    task = get_task(TaskConfig(name="alpaca"))
    batch = make_batch("instruction", ctx.shapes.memory_batch, ctx.shapes.memory_seq, 50257, ctx.device)

    def loss() -> torch.Tensor:
        with ctx.autocast():
            return task.loss(model, None, batch)[0]

    return model, loss, build_optimizer([model], OptimConfig(lr=1e-5))


def peak_training_bytes(ctx: Context, method: str, medium: bool = True) -> tuple[int, str]:
    """Memory of training with a method: on CUDA the allocator's peak over three steps (the model's weights
    included, what was allocated before left out); elsewhere ``sweeps/memory.py``'s account of one step."""
    from sweeps import memory

    _free(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0
    memory.reset_cuda_peak(ctx.device)
    model, loss, optimizer = _training_setup(ctx, method, medium)
    saved = memory.SavedTensors()
    for step in range(3 if ctx.device.type == "cuda" else 1):
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            with memory.measure_saved([model]) as saved:
                value = loss()
        else:
            value = loss()
        value.backward()
        optimizer.step()
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) - before, "torch.cuda.max_memory_allocated over 3 steps"
    account = (memory.weight_bytes([model]) + memory.weight_bytes([model], trainable_only=True)
               + memory.optimizer_state_bytes(optimizer) + saved.nbytes)
    return account, "memory account (sweeps/memory.py: weights + gradients + optimizer state + saved activations)"


def check_memory(ctx: Context) -> list[Check]:
    """Peak memory of LoRA (r8 on attention) against full fine-tuning of the medium model, same batch and length."""
    full, source = peak_training_bytes(ctx, "full")
    lora, _ = peak_training_bytes(ctx, "lora")
    _free(ctx.device)
    ratio = lora / full
    return [Check("fast", f"target: LoRA peak memory vs full, {ctx.shapes.medium}", ctx.judged(ratio <= MEMORY_TARGET),
                  f"{ratio:.2f}x", f"<= {MEMORY_TARGET}x", f"LoRA {lora / 2**20:,.0f} MiB, full {full / 2**20:,.0f} "
                  f"MiB; {ctx.shapes.label(medium=True)}, batch {ctx.shapes.memory_batch} x {ctx.shapes.memory_seq}, "
                  f"{ctx.precision}, AdamW; {source}")]

