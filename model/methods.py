"""The one function that decides what a fine-tuning method trains.

What each method trains (the task head is the module the task adds, e.g. a ``num_classes`` classifier; language
modelling tasks have none, their head is the LM head, which *is* the token embedding ``wte``):

| method      | trains                                                                                         |
|-------------|------------------------------------------------------------------------------------------------|
| ``full``    | every parameter, ``wte`` (embedding and LM head at once) and ``wpe`` included                  |
| ``last_k``  | the last k blocks, ``ln_f``, the task head                                                     |
| ``head_only``| the task head; with no task head, the LM head, i.e. ``wte``, which is also the input embedding |
| ``bitfit``  | every bias (linear and LayerNorm), the task head                                               |
| ``lora``    | the LoRA adapters (DoRA's magnitudes too), the task head                                       |
| ``ia3``     | IA3's scaling vectors, the task head                                                           |

``train_embeddings`` overrides whether ``wte`` and ``wpe`` train (default: only ``full`` trains them, and
``head_only`` without a task head trains ``wte``). Because the LM head and ``wte`` are one tensor, there is never a
case where one trains and the other does not; the summary's notes say which way it went.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.adapters import adapter_parameters
from model.config import ConfigError, Problems, is_int
from model.gpt2 import GPT2
from model.ia3 import IA3Config, apply_ia3
from model.lora import LoRAConfig, apply_lora

METHODS = ("full", "last_k", "head_only", "bitfit", "lora", "ia3")
ADAPTER_METHODS = ("lora", "ia3")  # methods that swap adapters in and train only those (and the task head)


@dataclass
class MethodConfig:
    """Which method, and its own settings (LoRA's live in ``LoRAConfig``)."""

    name: str = "full"
    """One of ``full last_k head_only bitfit lora ia3``."""
    k: int = 2
    """``last_k`` only: how many of the last transformer blocks train (1 ... n_layer)."""
    train_embeddings: bool | None = None
    """Whether ``wte``/``wpe`` train; None keeps the method's default (see the module docstring)."""

    def __post_init__(self) -> None:
        problems = Problems()
        if self.name not in METHODS:
            problems.add("name", f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if not is_int(self.k) or self.k < 1:
            problems.add("k", f"must be an integer >= 1, got {self.k!r}")
        if self.train_embeddings is not None and not isinstance(self.train_embeddings, bool):
            problems.add("train_embeddings", f"must be true, false or null, got {self.train_embeddings!r}")
        problems.raise_if_any("invalid method configuration")

    def check_against(self, n_layer: int) -> list[tuple[str, str]]:
        """Problems that only show against a model of ``n_layer`` blocks."""
        if self.name == "last_k" and is_int(self.k) and self.k > n_layer:
            return [("k", f"last_k with k={self.k} but the model has only {n_layer} blocks")]
        return []


@dataclass
class MethodSummary:
    """What a method made trainable, for the trial record and the guide."""

    method: str
    trainable_params: int
    total_params: int
    trainable_names: list[str] = field(repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params


def apply_method(
    model: GPT2, method: MethodConfig, lora: LoRAConfig | None = None, head: nn.Module | None = None
) -> MethodSummary:
    """Set ``requires_grad`` on ``model`` (and the task ``head``) for ``method``; wraps LoRA adapters in for ``lora``.

    Everything not listed for the method is frozen, including the head's neighbours, so the summary's counts are the
    whole truth about what the optimizer can touch.
    """
    problems = method.check_against(model.config.n_layer)
    if problems:
        raise ConfigError([(f"method.{k}", m) for k, m in problems], "method does not fit the model")
    if method.name == "lora" and getattr(model, "lora_config", None) is None:
        apply_lora(model, lora if lora is not None else LoRAConfig())
    if method.name == "ia3" and getattr(model, "ia3_config", None) is None:
        apply_ia3(model, IA3Config())

    modules: list[nn.Module] = [model] if head is None else [model, head]
    for module in modules:
        module.requires_grad_(False)

    if method.name == "full":
        model.requires_grad_(True)
    elif method.name == "last_k":
        for block in model.h[-method.k :]:
            block.requires_grad_(True)
        model.ln_f.requires_grad_(True)
    elif method.name == "bitfit":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
    elif method.name in ADAPTER_METHODS:
        for _, param in adapter_parameters(model):
            param.requires_grad_(True)

    train_embeddings = method.train_embeddings if method.train_embeddings is not None else method.name == "full"
    model.wte.requires_grad_(train_embeddings)
    model.wpe.requires_grad_(train_embeddings)
    notes = [f"wte (token embedding = tied LM head) {'trains' if train_embeddings else 'is frozen'}"]
    if head is not None:
        head.requires_grad_(True)
    elif method.name == "head_only":
        model.wte.requires_grad_(True)
        notes = ["no task head: the LM head trains, and it is the tied token embedding wte (inputs change too)"]

    seen: set[int] = set()
    trainable, total, names = 0, 0, []
    for prefix, module in (("", model), ("head.", head)):
        if module is None:
            continue
        for name, param in module.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
                names.append(prefix + name)
    return MethodSummary(method.name, trainable, total, names, notes)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen parameter of ``model`` in ``dtype`` (bf16 halves the frozen weights' memory); the trained
    ones keep theirs, so the optimizer still updates float32 values. Returns the number of values cast. Frozen
    weights in bf16 need bf16 autocast to meet float32 activations and adapters."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast
