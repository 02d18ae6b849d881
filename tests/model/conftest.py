from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import transformers


def hf_gpt2(**config) -> transformers.GPT2LMHeadModel:
    """A randomly initialised `transformers` GPT-2 in eval mode (dropout off), ids kept inside its vocabulary."""
    vocab = config.get("vocab_size", 50257)
    config.setdefault("bos_token_id", min(50256, vocab - 1))
    config.setdefault("eos_token_id", min(50256, vocab - 1))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()


TINY = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 1000, "n_positions": 64}


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[transformers.GPT2LMHeadModel, Path]:
    hf = hf_gpt2(**TINY)
    hf.save_pretrained(tmp_path / "tiny")
    return hf, tmp_path / "tiny"


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., tuple[transformers.GPT2LMHeadModel, Path]]:
    def make(name: str = "ckpt", **config) -> tuple[transformers.GPT2LMHeadModel, Path]:
        hf = hf_gpt2(**{**TINY, **config})
        hf.save_pretrained(tmp_path / name)
        return hf, tmp_path / name

    return make


SMALL = {"n_layer": 3, "n_head": 2, "n_embd": 16, "vocab_size": 60, "n_positions": 32}  # the adapter tests' base


@pytest.fixture
def base(tmp_path: Path) -> tuple[transformers.GPT2LMHeadModel, Path]:
    """A small random GPT-2 saved with ``transformers``, for adapter tests against PEFT. Its biases are non-zero
    (``transformers`` starts them at zero), so an adapter that mishandles a bias cannot pass."""
    hf = hf_gpt2(**SMALL)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    hf.save_pretrained(tmp_path / "base")
    return hf, tmp_path / "base"


def peft_lora(path: Path, kwargs: dict) -> peft.PeftModel:
    """PEFT's LoRA (``LoraConfig(**kwargs)``) on the ``transformers`` GPT-2 at ``path``, in eval mode."""
    model = transformers.GPT2LMHeadModel.from_pretrained(path)
    return peft.get_peft_model(model, peft.LoraConfig(fan_in_fan_out=True, **kwargs)).eval()


def nonzero_adapters(model: torch.nn.Module, names: tuple[str, ...] = ("lora_B",), seed: int = 1) -> None:
    """Move the named adapter tensors off their start (B is zero, a magnitude is the weight's norm, IA3's scales are
    ones): at the start every output comparison would be unable to fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
