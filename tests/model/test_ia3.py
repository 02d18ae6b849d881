"""IA3 against PEFT: trainable counts, logits, files both ways, merged export, merge/unmerge, disabling."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from model import GPT2, CheckpointError
from model.adapters import adapter_parameters, disable_adapters, merge_adapters, save_merged, unmerge_adapters
from model.ia3 import IA3Config, IA3Linear, apply_ia3
from model.methods import MethodConfig, apply_method
from model.peft_format import load_peft_adapter, save_peft_adapter
from tests.model.conftest import nonzero_adapters

# (our config, the same thing as PEFT's IA3Config kwargs; None: PEFT's GPT-2 defaults)
CASES = {
    "peft-defaults": (IA3Config(), None),
    "three-targets": (IA3Config(targets=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]),
                      dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
}


def _peft_ia3(path: Path, kwargs: dict | None) -> peft.PeftModel:
    model = transformers.GPT2LMHeadModel.from_pretrained(path)
    return peft.get_peft_model(model, peft.IA3Config(fan_in_fan_out=True, **(kwargs or {}))).eval()


def _ours(path: Path, config: IA3Config) -> GPT2:
    model = GPT2.from_pretrained(path).eval()
    apply_ia3(model, config)
    apply_method(model, MethodConfig(name="ia3"))
    return model


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_ia3_counts_and_logits_match_peft(case: str, base) -> None:
    config, kwargs = CASES[case]
    _, path = base
    reference = _peft_ia3(path, kwargs)
    nonzero_adapters(reference, ("ia3_l",))
    ours = _ours(path, config)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for _, p in adapter_parameters(ours)) == reference.get_nb_trainable_parameters()[0]
    state = reference.state_dict()
    with torch.no_grad():
        for name, param in adapter_parameters(ours):
            param.copy_(state[f"base_model.model.transformer.{name}.default"].flatten())
    ids = torch.randint(0, 60, (2, 11))
    plain = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        assert _max_delta(ours(ids), reference(ids).logits) <= 1e-5
        assert _max_delta(ours(ids), plain(ids).logits) > 1e-3, "vectors had no effect: the test could not fail"
        with disable_adapters(ours):
            assert _max_delta(ours(ids), plain(ids).logits) <= 1e-5


def test_ia3_defaults_rescale_qkv_output_and_the_mlp_inner_activation(base) -> None:
    _, path = base
    model = _ours(path, IA3Config())
    c_attn, c_proj = model.h[0].attn.c_attn, model.h[0].mlp.c_proj
    assert isinstance(c_attn, IA3Linear) and not c_attn.feedforward and c_attn.ia3_l.shape == (48,)
    assert isinstance(c_proj, IA3Linear) and c_proj.feedforward and c_proj.ia3_l.shape == (64,)
    assert not isinstance(model.h[0].mlp.c_fc, IA3Linear) and not isinstance(model.h[0].attn.c_proj, IA3Linear)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_ia3_files_both_ways_and_merged_export(case: str, base, tmp_path: Path) -> None:
    config, kwargs = CASES[case]
    _, path = base
    ours = _ours(path, config)
    nonzero_adapters(ours, ("ia3_l",))
    ids = torch.randint(0, 60, (2, 9))
    save_peft_adapter(ours, tmp_path / "ours", base_model=str(path))
    in_peft = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), tmp_path / "ours")
    reference = _peft_ia3(path, kwargs)
    nonzero_adapters(reference, ("ia3_l",), seed=2)
    reference.save_pretrained(tmp_path / "peft")
    from_peft = load_peft_adapter(GPT2.from_pretrained(path).eval(), tmp_path / "peft")
    save_merged(ours, tmp_path / "merged")
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert _max_delta(in_peft.eval()(ids).logits, ours(ids)) <= 1e-5
        assert _max_delta(from_peft(ids), reference(ids).logits) <= 1e-5
        assert _max_delta(merged(ids).logits, ours(ids)) <= 1e-5


def test_ia3_merge_unmerge_with_nonzero_vectors_and_refusals(base, tmp_path: Path) -> None:
    _, path = base
    model = _ours(path, IA3Config(targets="all"))
    nonzero_adapters(model, ("ia3_l",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        unmerged = model(ids)
        merge_adapters(model)
        assert _max_delta(model(ids), unmerged) <= 1e-5
        assert _max_delta(model.h[0].attn.c_attn.bias, before["h.0.attn.c_attn.bias"]) > 1e-3  # output: bias too
        unmerge_adapters(model)
        for key, tensor in before.items():
            torch.testing.assert_close(model.state_dict()[key], tensor, atol=1e-5, rtol=1e-5)
        model.h[1].mlp.c_proj.ia3_l[3] = 0.0  # merging is fine, unmerging would divide by zero
        merge_adapters(model)
        with pytest.raises(FloatingPointError, match="unmerging"):
            unmerge_adapters(model)
    with pytest.raises(RuntimeError, match="merged"):
        save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_peft_ia3_files_we_do_not_compute_are_refused(base, tmp_path: Path) -> None:
    _, path = base
    reference = _peft_ia3(path, dict(target_modules=["c_attn", "mlp.c_fc"], feedforward_modules=["mlp.c_fc"]))
    reference.save_pretrained(tmp_path / "odd")
    with pytest.raises(CheckpointError, match="feedforward_modules"):
        load_peft_adapter(GPT2.from_pretrained(path), tmp_path / "odd")
