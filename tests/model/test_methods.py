"""Each method trains exactly what it says: gradients, changed values, frozen bits and counts from formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import GPT2, ConfigError, GPT2Config
from model.lora import LoRAConfig
from model.methods import MethodConfig, apply_method

C, L, V, P, K = 16, 3, 50, 16, 3  # width, blocks, vocab, positions, classes
BLOCK = 12 * C * C + 13 * C  # 2 LayerNorms (4C) + c_attn (3C² + 3C) + attn.c_proj (C² + C) + MLP (8C² + 5C)
EMB = V * C + P * C
HEAD = C * K + K
ALL = EMB + L * BLOCK + 2 * C


def _model_and_head() -> tuple[GPT2, nn.Linear]:
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=L, n_head=2, n_embd=C, vocab_size=V, n_positions=P)), nn.Linear(C, K)


def _expected_trainable(name: str, summary_names: list[str]) -> set[str]:
    """The intended parameter names, written from the method definitions, not from the code under test."""
    model, _ = _model_and_head()
    names = [n for n, _ in model.named_parameters()]
    head = {"head.weight", "head.bias"}
    if name == "full":
        return set(names) | head
    if name == "last_k":
        return {n for n in names if n.startswith(("h.1.", "h.2.", "ln_f."))} | head
    if name == "head_only":
        return head
    if name == "bitfit":
        return {n for n in names if n.endswith(".bias")} | head
    if name == "lora":
        return {n for n in summary_names if "lora_" in n} | head
    raise AssertionError(name)


COUNTS = {
    "full": ALL + HEAD,
    "last_k": 2 * BLOCK + 2 * C + HEAD,
    "head_only": HEAD,
    "bitfit": L * (2 * C + 3 * C + C + 4 * C + C) + C + HEAD,  # LN biases, c_attn, c_proj, c_fc, c_proj; ln_f
    "lora": L * 4 * (C + 3 * C) + HEAD,  # rank 4 on attn.c_attn: r·(in+out) per block
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_method_trains_exactly_its_parameters(name: str) -> None:
    model, head = _model_and_head()
    method = MethodConfig(name=name, k=2)
    summary = apply_method(model, method, LoRAConfig(rank=4, alpha=8), head=head)
    params = {**dict(model.named_parameters()), **{f"head.{n}": p for n, p in head.named_parameters()}}
    intended = _expected_trainable(name, list(params))

    assert set(summary.trainable_names) == intended
    assert summary.trainable_params == COUNTS[name]
    assert summary.total_params == ALL + HEAD + (L * 4 * 4 * C if name == "lora" else 0)
    assert {n for n, p in params.items() if p.requires_grad} == intended

    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, V, (4, 10))
    labels = torch.randint(0, K, (4,))
    for _ in range(2):  # LoRA's A only gets a gradient once B has moved off zero
        optimizer.zero_grad(set_to_none=True)
        hidden = model.hidden_states(ids)[:, -1]
        loss = nn.functional.cross_entropy(head(hidden), labels) + model.lm_head(hidden).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
    for n, p in params.items():
        if n in intended:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_tied_embedding_is_one_decision() -> None:
    model, head = _model_and_head()
    summary = apply_method(model, MethodConfig(name="last_k", k=1, train_embeddings=True), head=head)
    assert "wte.weight" in summary.trainable_names and "wpe.weight" in summary.trainable_names
    assert summary.trainable_params == BLOCK + 2 * C + EMB + HEAD
    assert any("wte" in note and "trains" in note for note in summary.notes)
    model, _ = _model_and_head()
    summary = apply_method(model, MethodConfig(name="full", train_embeddings=False))
    assert summary.trainable_params == ALL - EMB  # the LM head is wte, so it is frozen too: no second copy trains
    assert not model.wte.weight.requires_grad


def test_head_only_without_a_task_head_trains_the_lm_head() -> None:
    model, _ = _model_and_head()
    summary = apply_method(model, MethodConfig(name="head_only"))
    assert summary.trainable_names == ["wte.weight"] and summary.trainable_params == V * C
    assert "tied" in summary.notes[0]


def test_last_k_beyond_the_model_is_refused() -> None:
    model, _ = _model_and_head()
    with pytest.raises(ConfigError) as err:
        apply_method(model, MethodConfig(name="last_k", k=L + 1))
    assert err.value.keys() == ["method.k"]
    with pytest.raises(ConfigError) as err:
        MethodConfig(name="prefix_tuning", k=0)
    assert err.value.keys() == ["name", "k"]
