"""LoRA against PEFT (counts, outputs, files both ways), merge/unmerge with a non-zero B, disabling, validation."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
import transformers

from model import GPT2, CheckpointError, ConfigError, NonFiniteWeightsError
from model.adapters import (
    adapter_parameters,
    disable_adapters,
    merge_adapters,
    save_merged,
    unmerge_adapters,
)
from model.lora import LoRAConfig, LoRALinear, apply_lora
from model.methods import MethodConfig, apply_method
from model.peft_format import load_peft_adapter, save_peft_adapter
from tests.model.conftest import nonzero_adapters, peft_lora

IN_OUT = {"attn.c_attn": (16, 48), "attn.c_proj": (16, 16), "mlp.c_fc": (16, 64), "mlp.c_proj": (64, 16)}

# (our config, the same thing written independently as PEFT's LoraConfig kwargs, wrapped blocks)
CASES = {
    "c_attn-all-r4": (LoRAConfig(rank=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["c_attn"]), [0, 1, 2]),
    "all-last2-r8": (LoRAConfig(rank=8, alpha=16, targets="all", layers="last:2"),
                     dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], layers_to_transform=[1, 2],
                          layers_pattern="h"), [1, 2]),
    "proj-fc-layers02-r2-rslora": (LoRAConfig(rank=2, alpha=3, targets=["attn.c_proj", "mlp.c_fc"], layers=[0, 2],
                                              rslora=True),
                                   dict(r=2, lora_alpha=3, target_modules=["attn.c_proj", "mlp.c_fc"],
                                        layers_to_transform=[0, 2], layers_pattern="h", use_rslora=True), [0, 2]),
    "mlp-first1-r16": (LoRAConfig(rank=16, alpha=7, targets="mlp", layers="first:1"),
                       dict(r=16, lora_alpha=7, target_modules=["mlp.c_fc", "mlp.c_proj"], layers_to_transform=[0],
                            layers_pattern="h"), [0]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_trainable_count_and_outputs_match_peft(case: str, base) -> None:
    ours_cfg, peft_kwargs, blocks = CASES[case]
    _, path = base
    reference = peft_lora(path, peft_kwargs)
    nonzero_adapters(reference)
    ours = GPT2.from_pretrained(path).eval()
    summary = apply_method(ours, MethodConfig(name="lora"), ours_cfg)

    formula = sum(ours_cfg.rank * sum(IN_OUT[t]) for t in ours_cfg.targets) * len(blocks)
    assert summary.trainable_params == reference.get_nb_trainable_parameters()[0] == formula

    peft_state = reference.state_dict()
    with torch.no_grad():
        for name, param in adapter_parameters(ours):
            param.copy_(peft_state[f"base_model.model.transformer.{name}.default.weight"])
    ids = torch.randint(0, 60, (2, 11))
    with torch.no_grad():
        delta = (ours(ids) - reference(ids).logits).abs().max().item()
        with reference.disable_adapter():
            moved = (ours(ids) - reference(ids).logits).abs().max().item()
    assert delta <= 1e-5
    assert moved > 1e-3, "adapters had no effect: the comparison could not fail"


def test_merge_unmerge_withnonzero_adapters(base) -> None:
    _, path = base
    model = GPT2.from_pretrained(path).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all"))
    nonzero_adapters(model)
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        unmerged = model(ids)
        merge_adapters(model)
        merged = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert (model.h[0].attn.c_attn.weight - original["h.0.attn.c_attn.weight"]).abs().max() > 1e-3
    unmerge_adapters(model)
    for key, tensor in original.items():
        torch.testing.assert_close(model.state_dict()[key], tensor, atol=1e-6, rtol=0)


def test_merge_refuses_non_finite_and_changes_nothing(base) -> None:
    _, path = base
    model = GPT2.from_pretrained(path)
    apply_lora(model, LoRAConfig(rank=2, targets="all"))
    nonzero_adapters(model)
    with torch.no_grad():
        model.h[2].mlp.c_proj.lora_B.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"h\.2\.mlp\.c_proj"):
        merge_adapters(model)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, LoRALinear))
    for key, tensor in before.items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_both_lora_exports_refuse_non_finite_weights_and_write_nothing(base, tmp_path: Path) -> None:
    """A nan adapter: the PEFT export and the merged export both refuse (CheckpointError: exit code 2 from the CLI);
    a nan base weight outside any adapter is refused by the merged export too."""
    _, path = base
    model = GPT2.from_pretrained(path)
    apply_lora(model, LoRAConfig(rank=2, targets="all"))
    nonzero_adapters(model)
    with torch.no_grad():
        model.h[1].attn.c_attn.lora_B[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"adapter_model\.safetensors: non-finite weights in .*h\.1\.attn"):
        save_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn gives non-finite weights; .*merged not saved"):
        save_merged(model, tmp_path / "merged")
    with torch.no_grad():
        model.h[1].attn.c_attn.lora_B[0, 0] = 0.0
        model.wpe.weight[0, 0] = float("-inf")
    with pytest.raises(NonFiniteWeightsError, match=r"transformer\.wpe\.weight \(1 of"):
        save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "merged").exists()


def test_peft_export_loads_in_peft_with_equal_logits(base, tmp_path: Path) -> None:
    _, path = base
    model = GPT2.from_pretrained(path).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all", layers="last:2"))
    nonzero_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model=str(path))
    loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), tmp_path / "adapter")
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert (loaded.eval()(ids).logits - model(ids)).abs().max().item() <= 1e-5


def test_peft_trained_adapter_loads_into_ours(base, tmp_path: Path) -> None:
    _, path = base
    reference = peft_lora(path, CASES["all-last2-r8"][1])
    nonzero_adapters(reference)
    reference.save_pretrained(tmp_path / "from-peft")
    ours = load_peft_adapter(GPT2.from_pretrained(path).eval(), tmp_path / "from-peft")
    expected = CASES["all-last2-r8"][0]
    assert (ours.lora_config.rank, ours.lora_config.alpha, ours.lora_config.targets) == (8, 16, expected.targets)
    assert ours.lora_config.resolve_layers(3) == expected.resolve_layers(3) == [1, 2]
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-5


def test_merged_export_loads_in_transformers_with_equal_logits(base, tmp_path: Path) -> None:
    _, path = base
    model = GPT2.from_pretrained(path).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all"))
    nonzero_adapters(model)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    save_merged(model, tmp_path / "merged")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert (exported(ids).logits - model(ids)).abs().max().item() <= 1e-5
    for key, tensor in weights_before.items():  # exporting leaves the model untouched
        assert torch.equal(model.state_dict()[key], tensor), key
    with pytest.raises(CheckpointError, match="lora_A"):
        model.save_pretrained(tmp_path / "plain")  # adapters would be silently lost
    assert not (tmp_path / "plain").exists()


def test_base_checkpoint_loads_into_lora_model_with_only_adapters_missing(base) -> None:
    _, path = base
    model = GPT2.from_pretrained(path)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=2, targets="all"))
    result = model.load_state_dict(plain_state, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(name for name, _ in adapter_parameters(model))


def test_disable_adapters_gives_the_base_model(base) -> None:
    _, path = base
    plain = GPT2.from_pretrained(path).eval()
    model = GPT2.from_pretrained(path).eval()
    apply_lora(model, LoRAConfig(rank=4, targets="all"))
    nonzero_adapters(model)
    ids = torch.randint(0, 60, (1, 7))
    with torch.no_grad():
        with disable_adapters(model):
            assert torch.equal(model(ids), plain(ids))
        assert not torch.equal(model(ids), plain(ids))
        merge_adapters(model)
        with pytest.raises(RuntimeError, match="merged"), disable_adapters(model):
            pass


def test_scaling_and_adapter_only_dropout() -> None:
    assert LoRAConfig(rank=16, alpha=32).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=32, rslora=True).scaling == 32 / math.sqrt(16)
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5).train()
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # B = 0 at init
        layer.lora_B.fill_(1.0)
        assert not torch.equal(layer(x), layer(x))  # dropout acts on the adapter path
        layer.eval()
        assert torch.equal(layer(x), layer(x))


def test_lora_config_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        LoRAConfig(rank=0, alpha=-1, dropout=1.0, targets=["attn.c_attn", "attn.q_proj"], layers="middle:2")
    assert err.value.keys() == ["rank", "alpha", "dropout", "targets", "layers"]
    assert LoRAConfig(targets="mlp.c_fc, attn.c_attn").targets == ("attn.c_attn", "mlp.c_fc")
    with pytest.raises(ConfigError, match="asks for 5 blocks; the model has 3"):
        LoRAConfig(layers="last:5").resolve_layers(3)
    with pytest.raises(ConfigError, match=r"\[3\] out of range"):
        LoRAConfig(layers=[0, 3]).resolve_layers(3)


def test_unsupported_peft_settings_are_refused(base, tmp_path: Path) -> None:
    _, path = base
    reference = peft_lora(path, dict(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights="olora",
                                       bias="lora_only"))
    reference.save_pretrained(tmp_path / "olora")
    with pytest.raises(CheckpointError, match=r"(?s)bias: 'lora_only' is not supported.*init_lora_weights: 'olora'"):
        load_peft_adapter(GPT2.from_pretrained(path), tmp_path / "olora")
