"""What a trial holds in memory, counted per trial, on every device.

A process-wide peak (``ru_maxrss``, or a CUDA peak never reset) says more about which trials ran before in the same
Ray worker than about the method. The account here is the trial's own, in bytes, from the tensors themselves:

- weights: every parameter of the model and the task head (a tied tensor once), at the bytes it holds: an NF4
  weight (QLoRA) its packed 4-bit values and block scales, about 0.52 bytes a value;
- gradients: one per trainable parameter, same size;
- optimizer state: the optimizer's state tensors after it stepped (AdamW: two moments, 8 bytes per fp32 parameter;
  8-bit AdamW: two moments of one byte a value plus block scales; 0-dim step counters are bookkeeping and left out);
- activations: what autograd saves for the backward pass of one training micro-batch, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters saved for backward are weights, counted once above).
  With activation checkpointing that is each block's input (the checkpoint saves it through the same hooks) and what
  is saved outside the blocks; the one block recomputed at a time during backward is transient and not counted.

On CUDA the measured peaks (allocated and reserved, reset at the trial's start) are recorded as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def _unique_params(modules: Iterable[nn.Module]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield param


def _plain_parts(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data: itself, or a tensor subclass's inner tensors (torchao's NF4
    weight, its 8-bit optimizer state), whose logical size (numel × element size) is not what they occupy."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        yield tensor
        return
    names, _ = flatten(tensor)
    for name in names:
        yield from _plain_parts(getattr(tensor, name))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds. A tensor subclass holds its inner tensors' storages, each once, whole: an inner tensor
    can be a view that keeps a larger storage alive (an NF4 weight's block scales)."""
    if getattr(type(tensor), "__tensor_flatten__", None) is None:
        return tensor.nbytes
    storages = {part.untyped_storage().data_ptr(): part.untyped_storage().nbytes() for part in _plain_parts(tensor)}
    return sum(storages.values())


def weight_bytes(modules: Iterable[nn.Module], trainable_only: bool = False) -> int:
    """Bytes of the parameters of ``modules`` (of the trainable ones only with ``trainable_only``)."""
    return sum(stored_bytes(p) for p in _unique_params(modules) if p.requires_grad or not trainable_only)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (0-dim step counters left out)."""
    return sum(stored_bytes(value) for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.dim() > 0)


@dataclass
class SavedTensors:
    """Bytes autograd saved for backward inside ``measure_saved``, each storage once, parameters left out."""

    nbytes: int = 0


@contextmanager
def measure_saved(modules: Iterable[nn.Module]) -> Iterator[SavedTensors]:
    """Count the storages autograd saves for the backward pass of the forward run inside the block."""
    params = {part.untyped_storage().data_ptr() for p in _unique_params(modules) for part in _plain_parts(p)}
    seen: set[int] = set()
    counted = SavedTensors()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        for part in _plain_parts(tensor):
            storage = part.untyped_storage()
            key = storage.data_ptr()
            if key not in params and key not in seen:
                seen.add(key)
                counted.nbytes += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counted


def reset_cuda_peak(device: torch.device) -> None:
    """Start the trial's CUDA peak from what is allocated now, not from earlier trials in this process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peaks(device: torch.device) -> tuple[int | None, int | None]:
    """(peak allocated, peak reserved) bytes on CUDA since the last reset; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
