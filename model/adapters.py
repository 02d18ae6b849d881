"""What every adapter shares (LoRA and its variants, IA3): it owns the projection it replaces, and free functions list,
merge, disable and export adapters whatever their kind.

An ``Adapter`` keeps the base ``weight``/``bias`` under their own keys (``h.0.attn.c_attn.weight``), so a base
checkpoint still loads into an adapted model with only the adapter's own tensors missing. Each kind says how its
adapter folds into the base tensors (``merged_tensors``) and how to take it back out (``unmerged_tensors``); merging,
refusing non-finite results, and the merged export are written once, here.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import NonFiniteWeightsError
from model.gpt2 import GPT2

Tensors = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)


def check_finite(tensors: Tensors, action: str, outcome: str) -> Tensors:
    """``tensors`` when every entry is finite. A diverged adapter (inf/nan) would silently poison the base weights, so
    a merge is checked before anything is written, and ``NonFiniteWeightsError`` (a ``FloatingPointError``) says
    ``action`` and ``outcome``."""
    if not all(t is None or torch.isfinite(t).all() for t in tensors):
        raise NonFiniteWeightsError(f"{action} gives non-finite weights; {outcome}")
    return tensors


NF4_BLOCK = 64  # values per NF4 block (QLoRA's), each with an absmax scale
NF4_MERGE_REFUSED = ("the base weights are NF4: merging in place would quantize the update away; save_merged(model, "
                     "path) writes the merged model in full precision")


def is_nf4(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a torchao NF4 weight (told without importing torchao, which takes seconds)."""
    return type(tensor).__name__ == "NF4Tensor"


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor: an NF4 weight dequantized, any other as it is."""
    return weight.get_original_weight() if is_nf4(weight) else weight


class Adapter(nn.Module):
    """A projection (GPT-2's ``nn.Linear`` layout: weight ``(out, in)``) plus trainable adapter tensors."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.merged = False
        self.disabled = False

    def merged_tensors(self) -> Tensors:
        """The base (weight, bias) with this adapter folded in, computed from the unmerged state."""
        raise NotImplementedError

    def unmerged_tensors(self) -> Tensors:
        """The base (weight, bias) recovered from the merged state."""
        raise NotImplementedError

    def adapter_keys(self) -> list[str]:
        """This module's state-dict keys that are the adapter's own (everything but the base weight and bias)."""
        return [k for k in self.state_dict() if k not in ("weight", "bias")]

    @torch.no_grad()
    def merge(self) -> None:
        if is_nf4(self.weight):
            raise RuntimeError(NF4_MERGE_REFUSED)
        if not self.merged:
            self._write(check_finite(self.merged_tensors(), "merging this adapter", "refused, weights unchanged"))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._write(check_finite(self.unmerged_tensors(), "unmerging this adapter", "refused, weights unchanged"))
            self.merged = False

    def _write(self, tensors: Tensors) -> None:
        weight, bias = tensors
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapters' own parameters (LoRA's ``lora_A``/``lora_B``, DoRA's magnitude, IA3's scales), with their names;
    never the base weights they own."""
    for name, layer in adapter_layers(model):
        for key, param in layer.named_parameters(recurse=False):
            if key not in ("weight", "bias"):
                yield f"{name}.{key}", param


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight. All merges are checked first, so a refusal changes nothing."""
    pending = [(name, layer) for name, layer in adapter_layers(model) if not layer.merged]
    if any(is_nf4(layer.weight) for _, layer in pending):
        raise RuntimeError(NF4_MERGE_REFUSED)
    with torch.no_grad():
        for name, layer in pending:
            check_finite(layer.merged_tensors(), f"merging the adapter of {name}", "nothing merged")
    for _, layer in pending:
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model: adapters contribute nothing inside the block (the DPO reference model, without a copy)."""
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("cannot disable merged adapters; unmerge_adapters(model) first")
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
        for name, layer in adapter_layers(model):
            for key in layer.adapter_keys():
                del state[f"{name}.{key}"]
            if not layer.merged:
                weight, bias = check_finite(layer.merged_tensors(), f"merging the adapter of {name}",
                                            f"{path} not saved")
                state[f"{name}.weight"] = weight
                if bias is not None:
                    state[f"{name}.bias"] = bias
    return model.save_pretrained(path, state_dict=state)


def import_torchao(module: str) -> Any:
    """``importlib.import_module(module)`` for a torchao module, imported only where used (it takes seconds). Its
    import logs warnings about optional CUDA kernels it could not load and about torch's pytree API; neither concerns
    NF4 or 8-bit AdamW, so they are kept out of trial logs (errors still show)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _scaler_block(n_scalers: int) -> int:
    """torchao quantizes NF4's block scales again in groups that must divide their number: 256 (QLoRA's) when it can,
    else the largest divisor below (gpt2-xl's 1600-wide projections have 40,000 scales: groups of 250)."""
    return next(size for size in range(min(256, n_scalers), 0, -1) if n_scalers % size == 0)


def quantize_base_weights(model: nn.Module) -> list[str]:
    """QLoRA (Dettmers et al., 2023): store the frozen base weight of every adapted projection in 4-bit NormalFloat,
    torchao's ``NF4Tensor`` (blocks of 64 values, each with an absmax scale; the scales themselves quantized to int8),
    about 0.52 bytes a value instead of 4, dequantized for each matmul. The adapters stay in full precision and train
    as before. All weights are checked before any is quantized, so a refusal changes nothing; returns the names."""
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("the model has no adapters: NF4 stores the frozen base weights of adapted projections")
    problems = [f"{name}.weight trains (only frozen base weights can be NF4)" for name, layer in layers
                if layer.weight.requires_grad]
    problems += [f"{name}.weight has {layer.weight.numel()} values, not a multiple of {NF4_BLOCK}"
                 for name, layer in layers if layer.weight.numel() % NF4_BLOCK]
    if problems:
        raise ValueError("cannot store the base weights in NF4: " + "; ".join(problems))
    to_nf4 = import_torchao("torchao.quantization").to_nf4
    for _, layer in layers:
        weight = layer.weight.detach()
        quantized = to_nf4(weight, NF4_BLOCK, _scaler_block(weight.numel() // NF4_BLOCK))
        layer.weight = nn.Parameter(quantized, requires_grad=False)
    return [name for name, _ in layers]
