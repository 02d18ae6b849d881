"""QLoRA: the adapted projections' frozen base weights in NF4 (torchao), LoRA and DoRA on top."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from model import GPT2
from model.adapters import adapter_layers, dense, is_nf4, merge_adapters, quantize_base_weights, save_merged
from model.lora import LoRAConfig, apply_lora
from model.methods import MethodConfig, apply_method
from tests.model.conftest import nonzero_adapters

MOVED = ("lora_A", "lora_B", "lora_magnitude")


def _qlora(path: Path, config: LoRAConfig) -> GPT2:
    model = GPT2.from_pretrained(path).eval()
    apply_method(model, MethodConfig(name="lora"), config)
    nonzero_adapters(model, MOVED)
    quantize_base_weights(model)
    return model


@pytest.mark.parametrize("config", [LoRAConfig(rank=4, targets="all"), LoRAConfig(rank=2, dora=True),
                                    LoRAConfig(rank=2, targets="mlp", init="pissa")], ids=["lora", "dora", "pissa"])
def test_nf4_base_is_dequantized_per_matmul_and_adapters_train_on_top(config: LoRAConfig, base, tmp_path: Path) -> None:
    """The NF4 model computes exactly what the same model with its base weights replaced by their dequantized values
    computes (and differs from the full-precision one by the quantization only); gradients reach the adapters and
    nothing else; the merged export is full precision and loads in transformers with the NF4 model's logits."""
    _, path = base
    model = _qlora(path, config)
    layers = dict(adapter_layers(model))
    assert layers and all(is_nf4(layer.weight) for layer in layers.values())
    reference = GPT2.from_pretrained(path).eval()
    apply_lora(reference, config)
    with torch.no_grad():
        reference.load_state_dict({k: dense(v) for k, v in model.state_dict().items()})
    ids = torch.randint(0, 60, (2, 9))
    out = model(ids)
    torch.testing.assert_close(out, reference(ids), atol=1e-5, rtol=0)
    out.pow(2).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    assert all(not layer.weight.requires_grad for layer in layers.values())
    save_merged(model, tmp_path / "merged")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (exported(ids).logits - model(ids)).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="NF4: merging in place"):
        merge_adapters(model)


def test_nf4_is_refused_before_anything_changes_where_it_cannot_apply(base) -> None:
    _, path = base
    model = GPT2.from_pretrained(path)
    with pytest.raises(ValueError, match="no adapters"):
        quantize_base_weights(model)
    apply_lora(model, LoRAConfig(rank=2))  # adapters, but their base weights still train
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight trains"):
        quantize_base_weights(model)
    assert not any(is_nf4(p) for p in model.parameters())
