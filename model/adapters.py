"""What every adapter shares (LoRA and its variants, IA3): it owns the projection it replaces, and free functions list,
merge, disable and export adapters whatever their kind.

An ``Adapter`` keeps the base ``weight``/``bias`` under their own keys (``h.0.attn.c_attn.weight``), so a base
checkpoint still loads into an adapted model with only the adapter's own tensors missing. Each kind says how its
adapter folds into the base tensors (``merged_tensors``) and how to take it back out (``unmerged_tensors``); merging,
refusing non-finite results, and the merged export are written once, here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
