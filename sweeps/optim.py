"""Optimizers and learning-rate schedules, chosen by plain config values so a sweep can vary them.

Optimizers are ``torch.optim``'s. Schedules are ``transformers.get_scheduler``'s formulas on a ``torch`` ``LambdaLR``
(:func:`lr_multiplier` says why not the call itself), tested equal to ``get_scheduler`` step by step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from model.adapters import import_torchao
from model.config import Problems, is_int, is_number

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "adamw8bit")
SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "inverse_sqrt")


@dataclass
class OptimConfig:
    """Optimizer and its hyperparameters (the schedule is ``ScheduleConfig``)."""

    name: str = "adamw"
    """``adamw`` (torch's fused kernel on CPU and CUDA), ``adam`` (fused likewise), ``sgd``, ``adafactor``, or
    ``adamw8bit``: AdamW with both moments stored in 8 bits (torchao's ``AdamW8bit``, Dettmers et al.'s block-wise
    quantization, blocks of 256; tensors under 4,096 values keep fp32 moments), on CPU and CUDA. Its step is compiled
    with ``torch.compile`` on first use (seconds, once per process)."""
    lr: float = 5e-5
    """Peak learning rate (after warmup); > 0."""
    weight_decay: float = 0.0
    """Decoupled for adamw/adamw8bit/adafactor, L2 for adam/sgd. Applies to matrices only: never to biases, LayerNorm or
    embeddings."""
    beta1: float = 0.9
    """First-moment decay (adam, adamw, adamw8bit)."""
    beta2: float = 0.999
    """Second-moment decay (adam, adamw, adamw8bit)."""
    eps: float = 1e-8
    """Denominator epsilon (adam, adamw, adamw8bit)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD with Nesterov momentum (needs momentum > 0)."""
    def __post_init__(self) -> None:
        problems = Problems()
        if self.name not in OPTIMIZERS:
            problems.add("name", f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not is_number(self.lr) or not self.lr > 0 or not math.isfinite(self.lr):
            problems.add("lr", f"must be a finite number > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            problems.add("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        for key in ("beta1", "beta2", "momentum"):
            value = getattr(self, key)
            if not is_number(value) or not 0.0 <= value < 1.0:
                problems.add(key, f"must be in [0, 1), got {value!r}")
        if not is_number(self.eps) or not self.eps > 0:
            problems.add("eps", f"must be > 0, got {self.eps!r}")
        if not isinstance(self.nesterov, bool):
            problems.add("nesterov", f"must be true or false, got {self.nesterov!r}")
        elif self.nesterov and self.name == "sgd" and is_number(self.momentum) and self.momentum == 0:
            problems.add("nesterov", "Nesterov momentum needs momentum > 0")
        problems.raise_if_any("invalid optimizer configuration")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule over the run's optimizer steps."""

    name: str = "linear"
    """``constant``, ``linear`` (decay to 0), ``cosine`` (to 0), ``cosine_with_restarts``, ``inverse_sqrt``."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps; exclusive with ``warmup_ratio``."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all training steps; exclusive with ``warmup_steps``."""
    num_cycles: int = 2
    """``cosine_with_restarts``: number of hard restarts over the run."""

    def __post_init__(self) -> None:
        problems = Problems()
        if self.name not in SCHEDULES:
            problems.add("name", f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            problems.add("warmup_steps", f"must be an integer >= 0, got {self.warmup_steps!r}")
        if not is_number(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            problems.add("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        elif self.warmup_ratio > 0 and is_int(self.warmup_steps) and self.warmup_steps > 0:
            problems.add("warmup_ratio", "set warmup_steps or warmup_ratio, not both")
        if not is_int(self.num_cycles) or self.num_cycles < 1:
            problems.add("num_cycles", f"must be an integer >= 1, got {self.num_cycles!r}")
        problems.raise_if_any("invalid schedule configuration")

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps else math.ceil(self.warmup_ratio * total_steps)


def param_groups(modules: Iterable[nn.Module], weight_decay: float,
                 lr_scales: Mapping[int, float] | None = None) -> list[dict]:
    """Trainable parameters split into decayed matrices and everything else (biases, LayerNorm, embeddings), and
    further by learning-rate multiplier: ``lr_scales`` maps a parameter's id to a factor on the base rate (LoRA+
    puts B at ``lora.lr_ratio``); a group with a factor other than 1 carries ``lr_scale`` and is built with its own
    ``lr``, which the schedule then scales like any group's.

    Parameters shared between modules (the tied embedding) appear once.
    """
    scales = lr_scales or {}
    buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                is_matrix = param.ndim >= 2 and not isinstance(sub, nn.Embedding | nn.LayerNorm)
                key = (is_matrix and name != "bias", float(scales.get(id(param), 1.0)))
                buckets.setdefault(key, []).append(param)
    groups = []
    for scale in sorted({s for _, s in buckets}):
        for decayed in (True, False):
            params = buckets.get((decayed, scale))
            if params:
                group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
                groups.append(group if scale == 1.0 else {**group, "lr_scale": scale})
    return groups


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam(W) kernel can take these parameters: floating point, all on one CPU or CUDA device.
    It is the same update in one pass instead of a chain of foreach kernels: on 2 CPU cores, AdamW over 67M float32
    parameters took 0.34 s a step with foreach and 0.06 s fused (measured side by side), which dominated small-batch
    full fine-tuning on a CPU."""
    return (bool(params) and all(p.is_floating_point() for p in params)
            and len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda"))


def build_optimizer(modules: Iterable[nn.Module], config: OptimConfig,
                    lr_scales: Mapping[int, float] | None = None) -> Optimizer:
    """The configured ``torch.optim`` optimizer over the trainable parameters of ``modules``; ``lr_scales`` as in
    :func:`param_groups` (LoRA+)."""
    modules = list(modules)
    groups = param_groups(modules, config.weight_decay, lr_scales)
    if not groups:
        raise ValueError("no trainable parameters: the method froze everything")
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = config.lr * group["lr_scale"]
    fused = fused_supported([p for g in groups for p in g["params"]]) or None
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                 fused=fused)
    if config.name == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                fused=fused)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.name == "adamw8bit":
        AdamW8bit = import_torchao("torchao.optim").AdamW8bit
        return AdamW8bit(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    return torch.optim.Adafactor(groups, lr=config.lr)


def lr_multiplier(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """The factor on the base learning rate at optimizer step ``step``: ``transformers.get_scheduler``'s schedules
    (linear warmup from 0, then the decay), formula for formula, and tested equal to them step by step.

    Why not call ``get_scheduler``: importing ``transformers.optimization`` pulls in ``transformers.trainer_utils``,
    and with it peft and ``torch._dynamo`` where they are installed: about 6 s of CPU in every Ray worker process, which
    on a small machine was half a worker's start-up (the test suite starts dozens)."""
    warmup = config.warmup_for(total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if config.name == "constant":
        return 1.0
    if config.name == "inverse_sqrt":  # transformers' timescale: the warmup, or 10,000 without one
        timescale = warmup or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.name == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if config.name == "cosine":  # half a cosine period, to 0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if progress >= 1.0:  # cosine_with_restarts: num_cycles hard restarts
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((config.num_cycles * progress) % 1.0))))


def build_scheduler(optimizer: Optimizer, config: ScheduleConfig, total_steps: int) -> LambdaLR:
    """The configured schedule over ``total_steps`` optimizer steps, warmup included (:func:`lr_multiplier`)."""
    return LambdaLR(optimizer, functools.partial(lr_multiplier, config, total_steps=total_steps))



class EmbeddingGrads:
    """Dense gradients of trained embedding tables, kept in buffers that live from step to step.

    Why: on a CPU, a trained token embedding (GPT-2's 50,257 x 768, 154 MB) gets a fresh dense gradient every step;
    the allocator maps new pages for it, the backward zero-fills every one, and ``zero_grad`` unmaps them again: 38 ms
    a step on 2 cores, where the few hundred rows a batch of short texts touches take under 1 ms. Here the lookups
    run with ``sparse=True``, so the backward gives those rows only, and ``collect`` sums them into a buffer that stays
    mapped, zeroing only the rows the last step touched. The sums are the dense backward's own (each micro-batch's
    rows added in token order from zero, then added to the step's running gradient), so the optimizer and clipping
    see bit for bit the gradient they saw before. Only for tables no other computation reads (a classification
    trial's: an LM head reads ``wte`` densely); ``release`` puts the modules back as they were.
    """

    def __init__(self, embeddings: list[nn.Embedding]) -> None:
        self.embeddings = embeddings
        self.buffers: dict[int, torch.Tensor] = {}
        self.touched: dict[int, torch.Tensor] = {}  # rows of each buffer that may be non-zero
        for embedding in embeddings:
            embedding.sparse = True

    @classmethod
    def attach(cls, modules: Iterable[nn.Module]) -> EmbeddingGrads | None:
        """Sparse lookups for the trainable, dense-gradient embeddings of ``modules``; None when there are none."""
        found = [m for module in modules for m in module.modules() if isinstance(m, nn.Embedding)
                 and m.weight.requires_grad and not m.sparse and m.max_norm is None and not m.scale_grad_by_freq]
        return cls(found) if found else None

    def collect(self, first: bool) -> None:
        """Move each table's sparse gradient of the last backward into its dense buffer (``first``: the step's first
        micro-batch, so last step's rows are zeroed first)."""
        for embedding in self.embeddings:
            weight, key = embedding.weight, id(embedding)
            grad = weight.grad
            if grad is None:
                continue
            if not grad.is_sparse:
                raise RuntimeError("an embedding meant to get sparse gradients got a dense one: another computation "
                                   "reads its weight, so its gradient sums would change order")
            buffer = self.buffers.get(key)
            if buffer is None:
                buffer = self.buffers[key] = torch.zeros_like(weight)
            elif first and key in self.touched:
                buffer.index_fill_(0, self.touched.pop(key), 0)
            rows, inverse = grad._indices()[0].unique(return_inverse=True)
            summed = torch.zeros(len(rows), weight.size(1), dtype=grad.dtype, device=grad.device)
            buffer.index_add_(0, rows, summed.index_add_(0, inverse, grad._values()))
            self.touched[key] = rows if key not in self.touched else torch.cat([self.touched[key], rows])
            weight.grad = None

    def apply(self) -> None:
        """Hand the step's dense gradients to the parameters, for clipping and the optimizer."""
        for embedding in self.embeddings:
            if id(embedding) in self.touched:
                embedding.weight.grad = self.buffers[id(embedding)]

    def release(self) -> None:
        """Dense lookups again, as the modules were before ``attach``."""
        for embedding in self.embeddings:
            embedding.sparse = False
