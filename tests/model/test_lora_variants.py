"""LoRA's variants (DoRA, PiSSA and gaussian starts) against PEFT: counts, logits, files both ways, merged exports."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from model import GPT2, ConfigError, GPT2Config
from model.adapters import adapter_parameters, disable_adapters, merge_adapters, save_merged, unmerge_adapters
from model.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers
from model.methods import MethodConfig, apply_method
from model.peft_format import load_peft_adapter, save_peft_adapter
from tests.model.conftest import nonzero_adapters, peft_lora

MOVED = ("lora_A", "lora_B", "lora_magnitude")  # every trained tensor, so that each one matters to the comparison

# (our config, the same thing written independently as PEFT's LoraConfig kwargs)
CASES = {
    "dora-c_attn": (LoRAConfig(rank=4, alpha=8, dora=True), dict(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                 use_dora=True)),
    "dora-all-last2-rslora": (LoRAConfig(rank=2, alpha=3, targets="all", layers="last:2", dora=True, rslora=True),
                              dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True,
                                   layers_to_transform=[1, 2], layers_pattern="h", use_rslora=True)),
    "pissa-all": (LoRAConfig(rank=4, alpha=8, targets="all", init="pissa"),
                  dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="pissa")),
    "pissa-mlp-rslora": (LoRAConfig(rank=3, alpha=5, targets="mlp", init="pissa", rslora=True),
                         dict(r=3, lora_alpha=5, target_modules=["mlp.c_fc", "mlp.c_proj"], init_lora_weights="pissa",
                              use_rslora=True)),
    "pissa-dora": (LoRAConfig(rank=2, alpha=4, init="pissa", dora=True),
                   dict(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="pissa", use_dora=True)),
    "gaussian": (LoRAConfig(rank=4, alpha=8, targets="attention", init="gaussian"),
                 dict(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"], init_lora_weights="gaussian")),
}
PEFT_NAMES = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
              "lora_magnitude": "lora_magnitude_vector.default.weight"}


def _ours(path: Path, config: LoRAConfig) -> GPT2:
    model = GPT2.from_pretrained(path).eval()
    apply_method(model, MethodConfig(name="lora"), config)
    return model


def _copy_from_peft(ours: GPT2, reference: peft.PeftModel) -> None:
    state = reference.state_dict()
    with torch.no_grad():
        for name, param in adapter_parameters(ours):
            layer, _, kind = name.rpartition(".")
            param.copy_(state[f"base_model.model.transformer.{layer}.{PEFT_NAMES[kind]}"])


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_variant_counts_and_logits_match_peft(case: str, base) -> None:
    """Ours and PEFT's start from the same checkpoint (PiSSA: each takes its own SVD of it), the trained tensors are
    moved off their start in PEFT's model and copied into ours: same trainable count, same logits."""
    config, kwargs = CASES[case]
    _, path = base
    reference = peft_lora(path, kwargs)
    nonzero_adapters(reference, MOVED)
    ours = _ours(path, config)
    trainable = sum(p.numel() for _, p in adapter_parameters(ours))
    assert trainable == reference.get_nb_trainable_parameters()[0]
    _copy_from_peft(ours, reference)
    ids = torch.randint(0, 60, (2, 11))
    plain = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        assert _max_delta(ours(ids), reference(ids).logits) <= 1e-5
        assert _max_delta(ours(ids), plain(ids).logits) > 1e-3, "adapters had no effect: the test could not fail"


@pytest.mark.parametrize("case", ["dora-c_attn", "pissa-dora"])
def test_dora_adapter_dropout_acts_as_in_peft(case: str, base) -> None:
    """In training mode with adapter dropout, DoRA's frozen path sees x and its rescaled part sees dropout(x): with the
    same random stream, ours and PEFT's agree."""
    config, kwargs = CASES[case]
    _, path = base
    config = LoRAConfig(**{**config.__dict__, "dropout": 0.3})
    reference = peft_lora(path, {**kwargs, "lora_dropout": 0.3})
    nonzero_adapters(reference, MOVED)
    ours = _ours(path, config)
    _copy_from_peft(ours, reference)
    for model in (ours, reference):  # only the adapter layers train (the model's own dropout would draw too)
        for module in model.modules():
            if isinstance(module, LoRALinear | peft.tuners.lora.LoraLayer):
                module.train()
    ids = torch.randint(0, 60, (2, 11))
    with torch.no_grad():
        torch.manual_seed(5)
        train_ours = ours(ids)
        torch.manual_seed(5)
        train_peft = reference(ids).logits
        ours.eval()
        assert _max_delta(train_ours, ours(ids)) > 1e-3, "dropout had no effect: the test could not fail"
    assert _max_delta(train_ours, train_peft) <= 1e-5


def test_dora_and_pissa_start_as_the_base_model(base) -> None:
    """DoRA's magnitude starts at W's norm per output unit and PiSSA's base keeps W minus the start: either way, the
    adapted model's first forward is the base model's, and PiSSA's disabled adapters give the original model back."""
    _, path = base
    plain = GPT2.from_pretrained(path).eval()
    ids = torch.randint(0, 60, (2, 9))
    for config in (LoRAConfig(rank=4, targets="all", dora=True), LoRAConfig(rank=4, targets="all", init="pissa"),
                   LoRAConfig(rank=4, targets="all", dora=True, init="pissa")):
        model = _ours(path, config)
        layer = model.h[0].attn.c_attn
        if config.dora:
            torch.testing.assert_close(layer.lora_magnitude, plain.h[0].attn.c_attn.weight.norm(dim=1))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=0)
            nonzero_adapters(model, MOVED)
            assert _max_delta(model(ids), plain(ids)) > 1e-3
            with disable_adapters(model):
                torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=0)
        if config.init == "pissa":
            assert _max_delta(layer.weight, plain.h[0].attn.c_attn.weight) > 1e-3, "the base keeps the residual"


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_our_variant_export_loads_in_peft_with_equal_logits(case: str, base, tmp_path: Path) -> None:
    """Our PEFT-format file on the *original* checkpoint (PiSSA's, converted to a rank-2r LoRA, as PEFT does)."""
    config, _ = CASES[case]
    _, path = base
    ours = _ours(path, config)
    nonzero_adapters(ours, MOVED)
    save_peft_adapter(ours, tmp_path / "adapter", base_model=str(path))
    loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), tmp_path / "adapter")
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert _max_delta(loaded.eval()(ids).logits, ours(ids)) <= 1e-5
    again = load_peft_adapter(GPT2.from_pretrained(path).eval(), tmp_path / "adapter")
    with torch.no_grad():
        assert _max_delta(again(ids), ours(ids)) <= 1e-5


@pytest.mark.parametrize("case", ["dora-all-last2-rslora", "pissa-all", "pissa-dora"])
def test_peft_trained_variant_loads_into_ours(case: str, base, tmp_path: Path) -> None:
    """PEFT's own files (a PiSSA one as PEFT saves it unconverted: the loader redoes the SVD, as PEFT's does)."""
    config, kwargs = CASES[case]
    _, path = base
    reference = peft_lora(path, kwargs)
    nonzero_adapters(reference, MOVED)
    reference.save_pretrained(tmp_path / "from-peft")
    ours = load_peft_adapter(GPT2.from_pretrained(path).eval(), tmp_path / "from-peft")
    assert (ours.lora_config.dora, ours.lora_config.init) == (config.dora, config.init)
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert _max_delta(ours(ids), reference(ids).logits) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_variant_merge_and_merged_export_with_nonzero_adapters(case: str, base, tmp_path: Path) -> None:
    config, _ = CASES[case]
    _, path = base
    model = _ours(path, config)
    nonzero_adapters(model, MOVED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 60, (2, 9))
    save_merged(model, tmp_path / "merged")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        unmerged = model(ids)
        assert _max_delta(exported(ids).logits, unmerged) <= 1e-5
        merge_adapters(model)
        assert _max_delta(model(ids), unmerged) <= 1e-5
        unmerge_adapters(model)
    for key, tensor in before.items():
        torch.testing.assert_close(model.state_dict()[key], tensor, atol=1e-5, rtol=0)


def test_variant_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        LoRAConfig(dora="yes", init="olora")
    assert err.value.keys() == ["dora", "init"]
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=60, n_positions=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"PiSSA needs rank <= 8 .* got 9"):
        apply_lora(model, LoRAConfig(rank=9, targets="all", init="pissa"))
    assert not any(True for _ in lora_layers(model))  # refused before any layer was swapped or any SVD taken
    for key, tensor in before.items():
        assert torch.equal(model.state_dict()[key], tensor), key
