"""Flat dotted keys map onto the trial config; every bad key of every section comes back in one error."""

from __future__ import annotations

import pytest

from model import ConfigError
from sweeps.config import TrialConfig, parse_value


def test_issue_list_of_bad_values_is_one_error_naming_every_key() -> None:
    bad = {
        "lora.rank": 0,
        "lora.alpha": 0,
        "lora.targets": "attn.q_proj",
        "method.name": "last_k",
        "method.k": 13,  # gpt2 has 12 blocks
        "optim.lr": -1e-4,
        "optim.name": "lion",
        "optim.lrr": 1e-3,
        "schedule.name": "step",
        "model.init": "scratch",
        "trainer.epochs": 3,
    }
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat(bad)
    assert set(err.value.keys()) == set(bad) - {"method.name"}  # last_k itself is fine; k is what is wrong
    message = str(err.value)
    assert "method.k: last_k with k=13 but the model has only 12 blocks" in message
    assert "optim.lrr: unknown key" in message


def test_strings_are_read_by_field_type() -> None:
    config = TrialConfig.from_flat({
        "model.init": "random", "model.n_layer": "2", "model.dropout": "0.1",
        "method.name": "lora", "method.train_embeddings": "null",
        "lora.rank": "16", "lora.alpha": "32", "lora.layers": "[0, 1]", "lora.targets": "attention", "lora.rslora": "yes",
        "optim.lr": "3e-4", "optim.nesterov": "false", "schedule.name": "cosine", "schedule.warmup_ratio": "0.1",
    })
    assert config.model.init == "random" and config.model.n_layer == 2 and config.model.dropout == 0.1
    assert config.method.train_embeddings is None
    assert (config.lora.rank, config.lora.alpha, config.lora.layers) == (16, 32, (0, 1))
    assert config.lora.targets == ("attn.c_attn", "attn.c_proj") and config.lora.rslora is True
    assert config.optim.lr == 3e-4
    assert (config.schedule.name, config.schedule.warmup_ratio) == ("cosine", 0.1)
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"lora.rank": "four", "optim.lr": "fast", "lora.layers": "[0,"})
    assert set(err.value.keys()) == {"lora.rank", "optim.lr", "lora.layers"}


def test_lora_layers_checked_against_the_model_before_loading() -> None:
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"method.name": "lora", "lora.layers": "last:30", "model.name": "gpt2-medium"})
    assert err.value.keys() == ["lora.layers"]
    assert TrialConfig.from_flat({"method.name": "lora", "lora.layers": "last:24", "model.name": "gpt2-medium"})


def test_lora_plus_ratio_is_checked_and_applies_to_lora_only() -> None:
    assert TrialConfig.from_flat({"method.name": "lora", "lora.lr_ratio": "16"}).lora.lr_ratio == 16
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"method.name": "lora", "lora.lr_ratio": -4, "optim.lr": 0})
    assert set(err.value.keys()) == {"lora.lr_ratio", "optim.lr"}
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"method.name": "full", "lora.lr_ratio": 4})
    assert err.value.keys() == ["lora.lr_ratio"] and "method.name=lora only" in str(err.value)


def test_model_section_rules() -> None:
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"model.n_layer": 2, "model.name": "/ckpt", "model.init": "random"})
    assert set(err.value.keys()) == {"model.name"}
    with pytest.raises(ConfigError, match="random init only"):
        TrialConfig.from_flat({"model.n_layer": 2})


def test_flat_round_trip() -> None:
    config = TrialConfig.from_flat({"method.name": "lora", "lora.targets": "all", "lora.layers": [3, 1], "optim.lr": 1e-3})
    assert TrialConfig.from_flat(config.to_flat()) == config


def test_parse_value_refuses_what_it_cannot_read() -> None:
    assert parse_value("1e-3", float) == 1e-3
    assert parse_value("7", int | None) == 7
    with pytest.raises(ValueError, match=r"cannot read '2\.5' as int"):
        parse_value("2.5", int)


def test_max_length_is_checked_against_the_models_positions(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"task\.max_length: 1025 exceeds the model's 1024 positions"):
        TrialConfig.from_flat({"task.max_length": 1025, "model.init": "random", "model.n_layer": 2})
    assert TrialConfig.from_flat({"task.max_length": 1024}).task.max_length == 1024
    checkpoint = tmp_path / "small-gpt2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "gpt2", "n_positions": 128}')
    with pytest.raises(ConfigError, match=r"task\.max_length: 256 exceeds the model's 128 positions"):
        TrialConfig.from_flat({"model.name": str(checkpoint), "task.max_length": 256})
    # a hub id's positions are unknown before loading: not refused here
    assert TrialConfig.from_flat({"model.name": "someone/gpt2-like", "task.max_length": 4096})


def test_lora_variants_apply_to_lora_only_and_ia3_takes_no_lora_setting() -> None:
    """DoRA and the adapters' start are LoRA's: refused with every other method; IA3 has no rank, scale, dropout or
    targets of LoRA's, so any lora.* key off its default is refused with it, each key named."""
    assert TrialConfig.from_flat({"method.name": "lora", "lora.dora": "true", "lora.init": "pissa"}).lora.dora is True
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"method.name": "bitfit", "lora.dora": True, "lora.init": "gaussian"})
    assert err.value.keys() == ["lora.dora", "lora.init"] and "method.name=lora only" in str(err.value)
    assert TrialConfig.from_flat({"method.name": "full", "lora.rank": 4}).lora.rank == 4  # ignored, as ever
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"method.name": "ia3", "lora.rank": 4, "lora.targets": "all", "optim.lr": -1})
    assert set(err.value.keys()) == {"lora.rank", "lora.targets", "optim.lr"}
    assert TrialConfig.from_flat({"method.name": "ia3"}).method.name == "ia3"


def test_nf4_needs_lora_and_a_width_it_can_block() -> None:
    assert TrialConfig.from_flat({"method.name": "lora", "model.quantize": "nf4"}).model.quantize == "nf4"
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"method.name": "full", "model.quantize": "nf4", "model.init": "random",
                               "model.n_embd": 20, "model.n_head": 2})
    assert err.value.keys() == ["model.quantize", "model.quantize"]
    assert "needs method.name=lora" in str(err.value) and "multiple of 8, got 20" in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.quantize: must be one of none, nf4"):
        TrialConfig.from_flat({"model.quantize": "int4"})


def test_bf16_frozen_weights_need_bf16_autocast() -> None:
    assert TrialConfig.from_flat({"model.frozen_dtype": "bfloat16", "train.precision": "bf16"}).model.frozen_dtype == (
        "bfloat16")
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"model.frozen_dtype": "bfloat16", "train.precision": "fp32"})
    assert err.value.keys() == ["model.frozen_dtype"]
    with pytest.raises(ConfigError, match=r"model\.frozen_dtype: must be one of float32, bfloat16"):
        TrialConfig.from_flat({"model.frozen_dtype": "float16"})
