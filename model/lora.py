"""LoRA and its variants for GPT-2: adapters swapped in for projections, and the free functions around them.

``LoRALinear`` owns the ``weight``/``bias`` of the projection it replaces (``model.adapters.Adapter``), so
``h.0.attn.c_attn.weight`` keeps its key and a base checkpoint still loads into a LoRA model with only the adapter keys
missing. Adapters are injected by swapping modules (``apply_lora``), never by subclassing the model.

    y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ,   A: (rank, in), B: (out, rank), scaling = alpha / rank (or / √rank)

Variants, each a setting of ``LoRAConfig``:

- ``init``: PEFT's default start (A Kaiming-uniform, B zero: the adapter starts as no change), ``gaussian`` (A normal
  with std 1/r, B zero) or ``pissa`` (Meng et al., 2024: A and B from the top-r singular vectors of W, and W keeps the
  residual, so the layer is unchanged at the start but the adapter trains the principal directions).
- ``dora`` (Liu et al., 2024): the weight split into a magnitude (one trainable scalar per output unit) and a
  direction that LoRA updates, ``y = m ⊙ (W + ΔW) x / ||W + ΔW|| + b`` with the norm per output unit.
- ``lr_ratio`` (LoRA+, Hayou et al., 2024): B trains at a multiple of A's learning rate (the optimizer's business; this
  module only says which tensors are B).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.adapters import Adapter, Tensors, adapter_layers, dense
from model.config import ConfigError, Problems, is_int, is_number
from model.gpt2 import GPT2

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TARGET_GROUPS = {"all": TARGETS, "attention": TARGETS[:2], "mlp": TARGETS[2:]}
INITS = ("default", "gaussian", "pissa")


def parse_targets(value: str | Sequence[str], problems: Problems) -> tuple[str, ...]:
    """Projection names (or the groups ``all attention mlp``; a comma-separated string is accepted) as a tuple in
    GPT-2's order; unknown names are added to ``problems`` under ``targets``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen: set[str] = set()
    for name in (n.strip() for n in names):
        if name in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[name])
        elif name in TARGETS:
            chosen.add(name)
        else:
            problems.add("targets", f"unknown target {name!r}; choose from {', '.join(TARGETS)} or "
                                    f"{', '.join(TARGET_GROUPS)}")
    if not names or (not chosen and not problems.items):
        problems.add("targets", "at least one target is needed")
    return tuple(t for t in TARGETS if t in chosen)


def check_layers(layers: str | Sequence[int], problems: Problems) -> str | tuple[int, ...]:
    """``all``, ``last:N``, ``first:N`` or distinct block indices (returned sorted); problems under ``layers``."""
    if isinstance(layers, str):
        kind, _, count = layers.partition(":")
        if layers != "all" and not (kind in ("last", "first") and count.isdigit() and int(count) >= 1):
            problems.add("layers", f"expected 'all', 'last:N', 'first:N' (N >= 1) or a list of indices, got {layers!r}")
        return layers
    if not layers or not all(is_int(i) and i >= 0 for i in layers) or len(set(layers)) != len(layers):
        problems.add("layers", f"expected distinct block indices >= 0, got {layers!r}")
        return tuple(layers)
    return tuple(sorted(layers))


def resolve_layers(layers: str | Sequence[int], n_layer: int) -> list[int]:
    """Block indices for a model of ``n_layer`` blocks; refuses indices or counts the model does not have."""
    if layers == "all":
        return list(range(n_layer))
    if isinstance(layers, str):
        kind, _, count = layers.partition(":")
        n = int(count)
        if n > n_layer:
            raise ConfigError([("layers", f"{layers!r} asks for {n} blocks; the model has {n_layer}")])
        return list(range(n_layer - n, n_layer)) if kind == "last" else list(range(n))
    bad = [i for i in layers if i >= n_layer]
    if bad:
        raise ConfigError([("layers", f"block indices {bad} out of range for a model of {n_layer} blocks")])
    return list(layers)


@dataclass
class LoRAConfig:
    """Where adapters go, how big they are, and which variant. Plain values, so a sweep can vary each one."""

    rank: int = 8
    """Rank r of each adapter (A is r × in, B is out × r); r ≥ 1."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / √r with ``rslora``); > 0."""
    dropout: float = 0.0
    """Dropout on the adapter's input only (the frozen path is untouched); in [0, 1)."""
    targets: str | Sequence[str] = ("attn.c_attn",)
    """Projections to adapt: any of ``attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj``, or ``all`` / ``attention`` /
    ``mlp``; a comma-separated string is accepted. Normalised to a tuple in GPT-2's order."""
    layers: str | Sequence[int] = "all"
    """Blocks that get adapters: ``all``, ``last:N``, ``first:N``, or a list of block indices."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / √r (Kalajdzievski, 2023), which keeps updates comparable across ranks."""
    lr_ratio: float = 1.0
    """LoRA+ (Hayou et al., 2024): B's learning rate is this multiple of A's (``optim.lr``), in an optimizer group of
    its own; 1 is plain LoRA. The paper's ratios are about 16 for GPT-2-sized models; > 0."""
    dora: bool = False
    """DoRA (Liu et al., 2024): a trainable magnitude per output unit on top of the LoRA-updated direction."""
    init: str = "default"
    """How A and B start: ``default`` (PEFT's: A Kaiming-uniform, B zero), ``gaussian`` (A ~ N(0, 1/r²), B zero) or
    ``pissa`` (top-r singular vectors of W; W keeps the residual)."""

    def __post_init__(self) -> None:
        problems = Problems()
        if not is_int(self.rank) or self.rank < 1:
            problems.add("rank", f"must be an integer >= 1, got {self.rank!r}")
        if not is_number(self.alpha) or not self.alpha > 0:
            problems.add("alpha", f"must be > 0, got {self.alpha!r}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.add("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not is_number(self.lr_ratio) or not 0 < self.lr_ratio < math.inf:
            problems.add("lr_ratio", f"must be a finite number > 0, got {self.lr_ratio!r}")
        for key in ("rslora", "dora"):
            if not isinstance(getattr(self, key), bool):
                problems.add(key, f"must be true or false, got {getattr(self, key)!r}")
        if self.init not in INITS:
            problems.add("init", f"unknown initialisation {self.init!r}; choose one of {', '.join(INITS)}")
        self.targets = parse_targets(self.targets, problems)
        self.layers = check_layers(self.layers, problems)
        problems.raise_if_any("invalid LoRA configuration")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def resolve_layers(self, n_layer: int) -> list[int]:
        return resolve_layers(self.layers, n_layer)


class LoRALinear(Adapter):
    """A projection plus a low-rank update (optionally DoRA's magnitude, optionally PiSSA's start)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, init: str = "default") -> None:
        super().__init__(base)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.register_buffer("lora_A0", None)  # PiSSA only: the start (A0, B0), which the base weight lacks
        self.register_buffer("lora_B0", None)
        self._initialise(init)
        self.register_parameter("lora_magnitude", None)
        if dora:  # DoRA's magnitude starts at the column norms, so the adapted layer starts as the base layer
            with torch.no_grad():
                self.lora_magnitude = nn.Parameter(self._weight_norm())
        self._norm_at_merge: torch.Tensor | None = None

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as PEFT
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.lora_A.shape[0])
        elif init == "pissa":
            self._pissa_start()
        else:
            raise ConfigError([("init", f"unknown initialisation {init!r}; choose one of {', '.join(INITS)}")])

    def _pissa_start(self) -> None:
        """PiSSA: A and B from the top-r singular triplets (√σ on each side, scaled so ``scaling · B A`` is the rank-r
        part of W); the base weight keeps the residual, so the layer's output is unchanged at the start."""
        rank = self.lora_A.shape[0]
        weight = self.weight.float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(s[:rank] / self.scaling)
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]  # (rank, in), (out, rank)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.weight.copy_(weight - self.scaling * b @ a)
        self.lora_A0, self.lora_B0 = a.to(self.weight.dtype), b.to(self.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update in the weight's own layout ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def _weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W + ΔW||`` per output unit (the norm of each row of the ``(out, in)`` weight), shape ``(out,)``."""
        return torch.linalg.norm(dense(self.weight) + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.disabled:
            out = F.linear(x, self.weight, self.bias)
            if self.lora_A0 is not None:  # PiSSA's base holds the residual: the start added back is the base layer
                out = out + F.linear(F.linear(x, self.lora_A0), self.lora_B0) * self.scaling
            return out
        h = self.lora_dropout(x)
        # (..., in) -> (..., rank) -> (..., out)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        if self.lora_magnitude is None:
            return F.linear(x, self.weight, self.bias) + update
        # DoRA: y = m / ||W + ΔW|| · (W + ΔW) h + b, the norm treated as a constant (the paper's section 4.3, and PEFT).
        # With adapter dropout the frozen path sees x, the rescaled part sees dropout(x), as in PEFT.
        with torch.no_grad():  # a constant: no graph, nothing saved for backward
            norm = self._weight_norm()
        scale = self.lora_magnitude / norm  # (out,)
        wx = F.linear(x, self.weight)
        wh = wx if isinstance(self.lora_dropout, nn.Identity) or not self.training else F.linear(h, self.weight)
        out = wx + (scale - 1) * wh + scale * update
        return out if self.bias is None else out + self.bias

    def merged_tensors(self) -> Tensors:
        weight = dense(self.weight) + self.delta_weight()
        if self.lora_magnitude is not None:
            weight = (self.lora_magnitude / torch.linalg.norm(weight, dim=1))[:, None] * weight
        return weight, None

    def unmerged_tensors(self) -> Tensors:
        weight = self.weight
        if self.lora_magnitude is not None:
            weight = weight * (self._norm_at_merge / self.lora_magnitude)[:, None]
        return weight - self.delta_weight(), None

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged and self.lora_magnitude is not None:  # unmerging needs the norm the merge divided by
            self._norm_at_merge = self._weight_norm()
        super().merge()

    def extra_repr(self) -> str:
        kind = "dora" if self.lora_magnitude is not None else "lora"
        return (f"in={self.in_features}, out={self.out_features}, {kind}, rank={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}{', pissa' if self.lora_A0 is not None else ''}")


# --------------------------------------------------------------------------------------------------------------------
# Free functions (the kind-independent ones, merge, disable, export, are in model.adapters)
# --------------------------------------------------------------------------------------------------------------------


def apply_lora(model: GPT2, config: LoRAConfig) -> list[str]:
    """Swap ``LoRALinear`` in for the configured projections of ``model``, in place; returns the wrapped names.

    Does not change what is trainable: ``model.methods.apply_method`` decides that.
    """
    if any(True for _ in adapter_layers(model)):
        raise ValueError("model already has adapters")
    sites = [(f"h.{i}.{target}", getattr(model.h[i], target.split(".")[0]), target.split(".")[1])
             for i in config.resolve_layers(model.config.n_layer) for target in config.targets]
    if config.init == "pissa":  # checked before any SVD rewrites a base weight, so a refusal changes nothing
        smallest = min(min(getattr(parent, attr).weight.shape) for _, parent, attr in sites)
        if config.rank > smallest:
            raise ConfigError([("rank", f"PiSSA needs rank <= {smallest} here (the smallest side of an adapted "
                                        f"projection), got {config.rank}")])
    for _, parent, attr in sites:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout,
                                         config.rslora, config.dora, config.init))
    wrapped = [name for name, _, _ in sites]
    model.lora_config = config
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_plus_lr_scales(model: nn.Module, ratio: float) -> dict[int, float]:
    """LoRA+'s learning-rate multipliers, by parameter id: ``ratio`` for every ``lora_B``; A and the rest keep 1.
    Empty for plain LoRA (ratio 1), so the optimizer builds the groups it always did."""
    if ratio == 1:
        return {}
    return {id(layer.lora_B): float(ratio) for _, layer in lora_layers(model)}
