from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
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
