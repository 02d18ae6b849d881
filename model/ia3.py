"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"):
learned vectors that rescale activations, nothing else.

The paper rescales keys, values and the MLP's inner activation. GPT-2 computes q, k and v in one projection
(``attn.c_attn``), so, as PEFT does for GPT-2, the vector on ``attn.c_attn`` rescales its whole output (q, k and v);
``mlp.c_proj`` is a *feed-forward* target whose vector rescales its input, which is the MLP's inner activation:

    y = (x W ᵀ + b) ⊙ l   (output targets, l: (out,))        y = (x ⊙ l) Wᵀ + b   (feed-forward targets, l: (in,))

Vectors start at ones, so an adapted model starts as the base model. Merging multiplies them into the weight (and,
for output targets, the bias), exactly as PEFT's merge does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.adapters import Adapter, Tensors, adapter_layers, dense
from model.config import Problems
from model.gpt2 import GPT2
from model.lora import parse_targets

FEEDFORWARD = ("mlp.c_proj",)  # the projection whose input is the MLP's inner activation


@dataclass
class IA3Config:
    """Where IA3's vectors go, in every block (PEFT's IA3 has no per-layer choice). The defaults are PEFT's for GPT-2
    (and the paper's choice, as close as GPT-2 allows)."""

    targets: str | Sequence[str] = ("attn.c_attn", "mlp.c_proj")
    """Projections that get a vector: any of ``attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj`` or a group; ``mlp.c_proj``
    rescales its input, the others their output."""
    def __post_init__(self) -> None:
        problems = Problems()
        self.targets = parse_targets(self.targets, problems)
        problems.raise_if_any("invalid IA3 configuration")

    @property
    def feedforward(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in FEEDFORWARD)


class IA3Linear(Adapter):
    """A projection whose output (or, for a feed-forward target, input) is rescaled by a learned vector ``ia3_l``."""

    def __init__(self, base: nn.Linear, feedforward: bool) -> None:
        super().__init__(base)
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        if self.feedforward:
            return F.linear(x * self.ia3_l, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * self.ia3_l

    def merged_tensors(self) -> Tensors:
        if self.feedforward:  # (x ⊙ l) Wᵀ = x (W diag l)ᵀ: scale W's columns
            return dense(self.weight) * self.ia3_l[None, :], None
        bias = None if self.bias is None else self.bias * self.ia3_l
        return dense(self.weight) * self.ia3_l[:, None], bias

    def unmerged_tensors(self) -> Tensors:
        if self.feedforward:
            return self.weight / self.ia3_l[None, :], None
        bias = None if self.bias is None else self.bias / self.ia3_l
        return self.weight / self.ia3_l[:, None], bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scales={'input' if self.feedforward else 'output'}"


def apply_ia3(model: GPT2, config: IA3Config) -> list[str]:
    """Swap ``IA3Linear`` in for the configured projections of ``model``, in place; returns the wrapped names."""
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has adapters")
    wrapped = []
    for i in range(model.config.n_layer):
        for target in config.targets:
            parent_name, attr = target.split(".")
            parent = getattr(model.h[i], parent_name)
            setattr(parent, attr, IA3Linear(getattr(parent, attr), feedforward=target in FEEDFORWARD))
            wrapped.append(f"h.{i}.{target}")
    model.ia3_config = config
    return wrapped
