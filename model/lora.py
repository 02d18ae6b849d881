"""LoRA for GPT-2: adapters swapped in for projections, free functions around them, and PEFT's file format.

``LoRALinear`` owns the ``weight``/``bias`` of the projection it replaces, so ``h.0.attn.c_attn.weight`` keeps its key
and a base checkpoint still loads into a LoRA model with only the adapter keys (``lora_A``, ``lora_B``) missing.
Adapters are injected by swapping modules (``apply_lora``), never by subclassing the model.

    y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ,   A: (rank, in), B: (out, rank), scaling = alpha / rank (or / √rank)

Initialisation is PEFT's default: A Kaiming-uniform, B zero, so an adapter starts as the identity change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from model.checkpoint import CheckpointError, NonFiniteWeightsError, write_checkpoint_files
from model.config import ConfigError, Problems, is_int, is_number
from model.gpt2 import GPT2

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TARGET_GROUPS = {"all": TARGETS, "attention": TARGETS[:2], "mlp": TARGETS[2:]}
PEFT_PREFIX = "base_model.model.transformer."


@dataclass
class LoRAConfig:
    """Where adapters go and how big they are. Plain values, so a sweep can vary each one."""

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
        if not isinstance(self.rslora, bool):
            problems.add("rslora", f"must be true or false, got {self.rslora!r}")
        names = self.targets.split(",") if isinstance(self.targets, str) else list(self.targets)
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
        self.targets = tuple(t for t in TARGETS if t in chosen)
        self._check_layers(problems)
        problems.raise_if_any("invalid LoRA configuration")

    def _check_layers(self, problems: Problems) -> None:
        layers = self.layers
        if isinstance(layers, str):
            kind, _, count = layers.partition(":")
            if layers == "all":
                return
            if kind in ("last", "first") and count.isdigit() and int(count) >= 1:
                return
            problems.add("layers", f"expected 'all', 'last:N', 'first:N' (N >= 1) or a list of indices, got {layers!r}")
        elif not layers or not all(is_int(i) and i >= 0 for i in layers) or len(set(layers)) != len(layers):
            problems.add("layers", f"expected distinct block indices >= 0, got {layers!r}")
        else:
            self.layers = tuple(sorted(layers))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def resolve_layers(self, n_layer: int) -> list[int]:
        """Block indices for a model of ``n_layer`` blocks; refuses indices or counts the model does not have."""
        if self.layers == "all":
            return list(range(n_layer))
        if isinstance(self.layers, str):
            kind, _, count = self.layers.partition(":")
            n = int(count)
            if n > n_layer:
                raise ConfigError([("layers", f"{self.layers!r} asks for {n} blocks; the model has {n_layer}")])
            return list(range(n_layer - n, n_layer)) if kind == "last" else list(range(n))
        bad = [i for i in self.layers if i >= n_layer]
        if bad:
            raise ConfigError([("layers", f"block indices {bad} out of range for a model of {n_layer} blocks")])
        return list(self.layers)


def _finite(weight: torch.Tensor, action: str, outcome: str) -> torch.Tensor:
    """``weight`` when every entry is finite. A diverged adapter (inf/nan) would silently poison the base weights,
    so the result is checked before anything is written, and ``NonFiniteWeightsError`` (a ``FloatingPointError``)
    says ``action`` and ``outcome``."""
    if not torch.isfinite(weight).all():
        raise NonFiniteWeightsError(f"{action} gives non-finite weights; {outcome}")
    return weight


class LoRALinear(nn.Module):
    """A projection plus a low-rank update. Holds the base ``weight``/``bias`` (same keys as the ``nn.Linear``)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as PEFT
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return out
        # (..., in) -> (..., rank) -> (..., out)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update in the weight's own layout ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        merged = _finite(self.weight + self.delta_weight(), "merging this adapter", "refused, weights unchanged")
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        restored = _finite(self.weight - self.delta_weight(), "unmerging this adapter", "refused, weights unchanged")
        self.weight.copy_(restored)
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


# --------------------------------------------------------------------------------------------------------------------
# Free functions
# --------------------------------------------------------------------------------------------------------------------


def apply_lora(model: GPT2, config: LoRAConfig) -> list[str]:
    """Swap ``LoRALinear`` in for the configured projections of ``model``, in place; returns the wrapped names.

    Does not change what is trainable: ``model.methods.apply_method`` decides that.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already has LoRA adapters")
    wrapped = []
    for i in config.resolve_layers(model.config.n_layer):
        block = model.h[i]
        for target in config.targets:
            parent_name, attr = target.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), config.rank, config.alpha, config.dropout,
                                             config.rslora))
            wrapped.append(f"h.{i}.{target}")
    model.lora_config = config
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapter parameters (``lora_A``/``lora_B`` of every wrapped projection), with their names."""
    for name, layer in lora_layers(model):
        yield f"{name}.lora_A", layer.lora_A
        yield f"{name}.lora_B", layer.lora_B


def lora_plus_lr_scales(model: nn.Module, ratio: float) -> dict[int, float]:
    """LoRA+'s learning-rate multipliers, by parameter id: ``ratio`` for every ``lora_B``; A and the rest keep 1.
    Empty for plain LoRA (ratio 1), so the optimizer builds the groups it always did."""
    if ratio == 1:
        return {}
    return {id(layer.lora_B): float(ratio) for _, layer in lora_layers(model)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight. All merges are checked first, so a refusal changes nothing."""
    pending = [(name, layer) for name, layer in lora_layers(model) if not layer.merged]
    with torch.no_grad():
        for name, layer in pending:
            _finite(layer.weight + layer.delta_weight(), f"merging the adapter of {name}", "nothing merged")
    for _, layer in pending:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight."""
    for _, layer in lora_layers(model):
        layer.unmerge()


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Run the base model: adapters contribute nothing inside the block (the DPO reference model, without a copy)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable merged adapters; unmerge_lora(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


def save_merged(model: GPT2, path: str | Path) -> Path:
    """A plain Hugging Face GPT-2 checkpoint with the adapters folded in. The model itself is not touched (a merge and
    unmerge round trip would move its weights by rounding)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, layer in lora_layers(model):
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            if not layer.merged:
                state[f"{name}.weight"] = _finite(layer.weight + layer.delta_weight(), f"merging the adapter of {name}",
                                                  f"{path} not saved")
    return model.save_pretrained(path, state_dict=state)


# --------------------------------------------------------------------------------------------------------------------
# PEFT's format: adapter_config.json + adapter_model.safetensors
# --------------------------------------------------------------------------------------------------------------------


def _peft_config(config: LoRAConfig, n_layer: int, base_model: str | None) -> dict[str, Any]:
    layers = config.resolve_layers(n_layer)
    all_layers = layers == list(range(n_layer))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": list(config.targets),
        "layers_to_transform": None if all_layers else layers,
        "layers_pattern": None if all_layers else "h",
        "fan_in_fan_out": True,  # GPT-2's projections are Conv1D in transformers
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft_adapter(model: GPT2, path: str | Path, base_model: str | None = None) -> Path:
    """Write the adapters so that ``peft.PeftModel.from_pretrained(GPT2LMHeadModel, path)`` reproduces our logits."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("model has no LoRA adapters to save")
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("adapters are merged into the weights; unmerge_lora(model) before saving them alone")
    tensors = {f"{PEFT_PREFIX}{name}.weight": p.detach().to("cpu").contiguous() for name, p in lora_parameters(model)}
    peft_config = _peft_config(config, model.config.n_layer, base_model)
    return write_checkpoint_files(path, tensors, "adapter_model.safetensors", {"adapter_config.json": peft_config})


# PEFT matches a target by exact name or by suffix after a dot; GPT-2's short names map to ours like this.
_PEFT_TARGET_NAMES = {"c_attn": ("attn.c_attn",), "c_fc": ("mlp.c_fc",), "c_proj": ("attn.c_proj", "mlp.c_proj"),
                      **{t: (t,) for t in TARGETS}}


def read_peft_config(path: Path) -> LoRAConfig:
    """Our ``LoRAConfig`` from a PEFT ``adapter_config.json``; settings we do not compute are refused by name."""
    file = path / "adapter_config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a PEFT adapter needs adapter_config.json") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
    problems = Problems()
    unsupported = {"peft_type": "LORA", "bias": "none", "use_dora": False, "lora_bias": False, "rank_pattern": {},
                   "alpha_pattern": {}, "modules_to_save": None, "layer_replication": None}
    for key, ok in unsupported.items():
        value = data.get(key, ok)
        if value != ok and not (ok is None and not value) and not (ok == {} and not value):
            problems.add(key, f"{value!r} is not supported (expected {ok!r})")
    targets = data.get("target_modules")
    if not isinstance(targets, list):
        problems.add("target_modules", f"expected a list of module names, got {targets!r}")
        targets = []
    names: list[str] = []
    for t in targets:
        if t not in _PEFT_TARGET_NAMES:
            problems.add("target_modules", f"{t!r} is not a GPT-2 projection ({', '.join(_PEFT_TARGET_NAMES)})")
        names.extend(_PEFT_TARGET_NAMES.get(t, ()))
    layers = data.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None and data.get("layers_pattern") not in (None, "h", ["h"]):
        problems.add("layers_pattern", f"{data['layers_pattern']!r}: GPT-2's blocks are 'h'")
    if problems.items:
        raise CheckpointError(str(ConfigError(problems.items, f"{file}: unsupported PEFT adapter")))
    try:
        return LoRAConfig(rank=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                          targets=names, layers="all" if layers is None else layers,
                          rslora=bool(data.get("use_rslora", False)))
    except ConfigError as err:
        raise CheckpointError(f"{file}: {err}") from None


def _signature(config: LoRAConfig, n_layer: int) -> tuple:
    """What makes two configs the same adapters on a model of ``n_layer`` blocks (``last:2`` == ``[1, 2]`` on 3)."""
    return (config.rank, config.scaling, config.targets, config.resolve_layers(n_layer))


def load_peft_adapter(model: GPT2, path: str | Path) -> GPT2:
    """Put a PEFT LoRA adapter (ours or one trained with ``peft``) onto ``model``; strict about every tensor."""
    directory = Path(path)
    config = read_peft_config(directory)
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, config)
    elif _signature(model.lora_config, model.config.n_layer) != _signature(config, model.config.n_layer):
        raise CheckpointError(f"{directory}: adapter config {config} differs from the model's {model.lora_config}")
    file = directory / "adapter_model.safetensors"
    try:
        stored = load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None
    ours = dict(lora_parameters(model))
    expected = {f"{PEFT_PREFIX}{name}.weight": p for name, p in ours.items()}
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    wrong = [f"{k}: {tuple(stored[k].shape)} in file, expected {tuple(p.shape)}"
             for k, p in expected.items() if k in stored and stored[k].shape != p.shape]
    if missing or unexpected or wrong:
        parts = [f"missing: {', '.join(missing)}" if missing else "",
                 f"unexpected: {', '.join(unexpected)}" if unexpected else "",
                 f"wrong shape: {'; '.join(wrong)}" if wrong else ""]
        raise CheckpointError(f"{file}: does not match the adapter config:\n  - " + "\n  - ".join(p for p in parts if p))
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(stored[key])
    return model
