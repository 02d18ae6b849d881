"""Checkpoints: round trips both ways, strict checking, safe pickles, and the hub path (offline and faked)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import GPT2, CheckpointError, GPT2Config
from model import checkpoint as ckpt


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_transformers_to_ours_to_transformers_keeps_logits(tiny_checkpoint, tmp_path: Path) -> None:
    hf, path = tiny_checkpoint
    ids = torch.randint(0, 1000, (2, 10))
    ours = GPT2.from_pretrained(path).eval()
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(_logits(back, ids), _logits(hf, ids))
    for name, tensor in hf.state_dict().items():  # the weights themselves survive bit for bit
        if not name.endswith((".attn.bias", ".attn.masked_bias")):
            assert torch.equal(back.state_dict()[name], tensor), name


def test_ours_to_hf_format_to_ours_keeps_logits(tmp_path: Path) -> None:
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=32)).eval()
    model.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "model.safetensors")
    assert "transformer.h.0.attn.c_attn.weight" in saved and "lm_head.weight" not in saved
    assert saved["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D layout (in, out)
    again = GPT2.from_pretrained(tmp_path / "a").eval()
    ids = torch.randint(0, 300, (2, 12))
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "a").eval()
    assert (_logits(hf, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    assert not list(tmp_path.joinpath("a").glob(".saving-*")), "temporary files left behind"


def test_original_openai_layout_and_pytorch_bin_load(tmp_path: Path) -> None:
    """The hub's gpt2 files have no `transformer.` prefix and carry `attn.bias` mask buffers; older ones are .bin."""
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300,
                                                              n_positions=32)).eval()
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    state["lm_head.weight"] = hf.state_dict()["lm_head.weight"].clone()  # tied: stored twice in old files
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = GPT2.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (1, 9))
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max().item() <= 1e-5
    assert not any(p.is_meta for p in ours.parameters())


def test_dtype_and_config_overrides(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path, dtype=torch.bfloat16, embd_pdrop=0.1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.embd_pdrop == 0.1
    with pytest.raises(CheckpointError, match="not_a_field"):
        GPT2.from_pretrained(path, not_a_field=1)


# --- strict checking ---------------------------------------------------------------------------------------------------


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_extra_and_wrong_shape_are_listed_together(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint

    def break_it(t: dict) -> None:
        del t["transformer.h.1.mlp.c_fc.bias"]
        t["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
        t["transformer.ln_f.weight"] = torch.ones(65)

    _edit_weights(path, break_it)
    with pytest.raises(CheckpointError) as err:
        GPT2.from_pretrained(path)
    message = str(err.value)
    assert "model.safetensors" in message
    assert "missing (1): h.1.mlp.c_fc.bias" in message
    assert "unexpected (1): transformer.h.0.attn.rotary.weight" in message
    assert "transformer.ln_f.weight: (65,) in file, expected (64,)" in message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.pop("transformer.wpe.weight"), "missing (1): wpe.weight"),
        (lambda t: t.__setitem__("transformer.extra.weight", torch.zeros(1)), "unexpected (1): transformer.extra.weight"),
        (lambda t: t.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(192, 64)),
         "transformer.h.0.attn.c_attn.weight: (192, 64) in file, expected (64, 192)"),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_each_mismatch_alone_is_a_clear_error(tiny_checkpoint, edit, expected: str) -> None:
    _, path = tiny_checkpoint
    _edit_weights(path, edit)
    with pytest.raises(CheckpointError, match=r"does not match") as err:
        GPT2.from_pretrained(path)
    assert expected in str(err.value)


def test_untied_lm_head_is_refused(tmp_path: Path) -> None:
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                                              n_positions=16))
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = torch.randn(50, 16)
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="ties the LM head"):
        GPT2.from_pretrained(tmp_path)


class _Exploit:
    """Unpickling this would create a file: the proof that a checkpoint's code ran."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_is_not_a_state_dict_is_refused_not_executed(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint
    (path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"transformer.wte.weight": torch.zeros(1000, 64), "payload": exploit}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused.*not executed"):
        GPT2.from_pretrained(path)
    assert not marker.exists(), "the pickle's code ran"


def test_pickle_of_plain_objects_that_is_not_a_state_dict_is_refused(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    (path / "model.safetensors").unlink()
    torch.save({"model": {"wte.weight": torch.zeros(2)}, "epoch": 3}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"not a plain state dict.*'model' \(dict\)"):
        GPT2.from_pretrained(path)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("{not json", r"config\.json:1: not valid JSON"),
        ('{"model_type": "llama"}', "model_type: is 'llama'"),
        ('{"n_embd": 64, "n_head": 5}', "divisible by n_head"),
        ('{"activation_function": "relu"}', "activation_function: 'relu'"),
    ],
)
def test_bad_config_json_names_the_file(tiny_checkpoint, config: str, expected: str) -> None:
    _, path = tiny_checkpoint
    (path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=expected) as err:
        GPT2.from_pretrained(path)
    assert str(path / "config.json") in str(err.value)


def test_missing_files_and_directories(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        GPT2.from_pretrained(tmp_path / "nowhere")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        GPT2.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        GPT2.from_pretrained(path)


# --- hub ---------------------------------------------------------------------------------------------------------------


def test_offline_hub_id_gives_clear_error_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        GPT2.from_pretrained("gpt2-medium")
    assert time.monotonic() - start < 30, "offline failure must not hang"
    message = str(err.value)
    assert "'gpt2-medium'" in message and "openai-community/gpt2-medium" in message
    assert "local directory" in message
    assert "Traceback" not in message


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl", "openai-community/gpt2-large", "someone/my-gpt2"])
def test_hub_ids_download_into_the_cache_and_load(name: str, tiny_checkpoint, monkeypatch) -> None:
    hf, path = tiny_checkpoint
    asked: list[str] = []

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append(repo_id)
        assert "config.json" in allow_patterns
        return str(path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(ckpt, "_RESOLVED", {})
    model = GPT2.from_pretrained(name).eval()
    expected = name if "/" in name else f"openai-community/{name}"
    assert asked == [expected]
    GPT2.from_pretrained(name)  # a reused sweep worker's next trial: the hub is asked once per process
    assert asked == [expected]
    ids = torch.randint(0, 1000, (1, 6))
    assert (_logits(model, ids) - _logits(hf, ids)).abs().max().item() <= 1e-5


def test_hub_repo_id_aliases() -> None:
    assert ckpt.hub_repo_id("gpt2") == "openai-community/gpt2"
    assert ckpt.hub_repo_id("openai-community/gpt2-xl") == "openai-community/gpt2-xl"
    assert ckpt.hub_repo_id("distilbert/distilgpt2") == "distilbert/distilgpt2"
