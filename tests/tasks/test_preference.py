"""DPO: the loss against an independent computation, the reference model, the data, and a short run that learns."""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from model.config import ConfigError
from model.gpt2 import GPT2, GPT2Config
from model.lora import LoRAConfig, apply_lora, lora_layers
from model.tokenizer import EOT_TOKEN_ID
from sweeps.config import TrialConfig
from sweeps.loop import run_trial
from tasks import TaskConfig, get_task
from tasks.base import EncodedSplit
from tasks.dpo import DPOConfig
from tasks.preference import read_hh, read_instruction

TINY = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, embd_pdrop=0.0, attn_pdrop=0.0,
                  resid_pdrop=0.0)


def _model() -> GPT2:
    torch.manual_seed(0)
    model = GPT2(TINY)
    model.eval()
    return model


def _task(**dpo) -> object:
    return get_task(TaskConfig(name="preference"), dpo=DPOConfig(**dpo))


def _logp_by_hand(model: GPT2, prompt: list[int], response: list[int]) -> float:
    """Sum of log p(token | prefix) over the response and its end token, from full-sequence logits."""
    seq = prompt + response + [EOT_TOKEN_ID % 100]
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(ids)  # (1, T, V)
    total = 0.0
    for pos in range(len(prompt), len(seq)):
        total += torch.log_softmax(logits[0, pos - 1].double(), -1)[seq[pos]].item()
    return total


def test_dpo_loss_equals_an_independent_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.preference.EOT_TOKEN_ID", EOT_TOKEN_ID % 100)  # the tiny vocabulary has no 50256
    model = _model()
    raw = [([5, 6, 7], [8, 9], [10, 11, 12, 13]), ([20, 21], [22, 23, 24], [25])]
    eot = EOT_TOKEN_ID % 100
    split = EncodedSplit.from_lists([p + c + [eot] + p + r + [eot] for p, c, r in raw],
                                 prompt_lengths=[len(p) for p, _, _ in raw])
    split.ref_logps = torch.tensor([[-20.0, -25.0], [-18.5, -9.0]])  # hand-chosen reference log-probs
    for options in ({"beta": 0.1}, {"beta": 0.5, "label_smoothing": 0.2}, {"beta": 0.3, "loss": "ipo"}):
        task = _task(**options)
        batch = task.collate(split, [0, 1])
        loss, n = task.loss(model, None, batch)
        expected = []
        for (p, c, r), (ref_c, ref_r) in zip(raw, split.ref_logps.tolist(), strict=True):
            h = (_logp_by_hand(model, p, c) - _logp_by_hand(model, p, r)) - (ref_c - ref_r)
            beta = options["beta"]
            if options.get("loss") == "ipo":
                expected.append((h - 1 / (2 * beta)) ** 2)
            else:
                eps = options.get("label_smoothing", 0.0)
                sig = 1 / (1 + math.exp(-beta * h))
                expected.append(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
        assert n == 2
        assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-4), options


def test_at_step_zero_the_loss_is_log2_and_rewards_are_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.preference.EOT_TOKEN_ID", EOT_TOKEN_ID % 100)
    model = _model()
    eot = EOT_TOKEN_ID % 100
    split = EncodedSplit.from_lists([[1, 2, 3, eot, 1, 4, eot], [7, 8, 9, 10, eot, 7, 8, 11, 12, eot]],
                                 prompt_lengths=[1, 2])
    task = _task(beta=0.1)
    notes = task.prepare(model, {"test": split}, torch.device("cpu"), torch.autocast("cpu", enabled=False), batch_size=1)
    assert notes == {"dpo_reference": "precomputed"} and split.ref_logps.shape == (2, 2)
    metrics = task.evaluate(model, None, iter([task.collate(split, [0, 1])]))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("chosen_reward", "rejected_reward", "reward_margin", "chosen_logp_drift", "rejected_logp_drift"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key


def test_lora_reference_is_the_untouched_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.preference.EOT_TOKEN_ID", EOT_TOKEN_ID % 100)
    base = _model()
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="all"))
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)  # a B of zeros would make the adapters invisible
    eot = EOT_TOKEN_ID % 100
    split = EncodedSplit.from_lists([[1, 2, 3, eot, 1, 4, 5, eot], [7, 8, 9, 10, eot, 7, 8, 11, eot]],
                                 prompt_lengths=[1, 2])
    task = _task()
    notes = task.prepare(model, {"train": split}, torch.device("cpu"), torch.autocast("cpu", enabled=False), batch_size=2)
    assert notes == {"dpo_reference": "adapters_disabled"} and split.ref_logps is None  # no copy, nothing precomputed
    batch = task.collate(split, [0, 1])
    model.train()  # the reference is taken without dropout whatever mode the policy is in
    reference = task.reference_logps(model, batch)
    assert model.training
    with torch.no_grad():
        untouched = task.sequence_logps(base, batch).view(2, -1).T
        policy = task.sequence_logps(model.eval(), batch).view(2, -1).T
    torch.testing.assert_close(reference, untouched, rtol=0, atol=1e-5)
    assert (policy - untouched).abs().max() > 1e-2  # the adapters do change the policy


def test_instruction_pairs_sizes_and_identical_pairs_dropped(data_dir: Path) -> None:
    pairs, dropped = read_instruction(data_dir / "preference" / "instruction-data-with-preference.json.gz")
    assert (len(pairs), dropped) == (1094, 6)
    task = get_task(TaskConfig(name="preference"))
    splits = task.read_splits([data_dir / "preference" / "instruction-data-with-preference.json.gz"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 929, "validation": 54, "test": 111}
    assert splits["train"][0].text.startswith("Below is an instruction") and splits["train"][0].rejected


def test_hh_dialogues_split_at_the_final_assistant_turn(data_dir: Path, tmp_path: Path) -> None:
    pairs, dropped = read_hh(data_dir / "preference" / "hh-rlhf_helpful-base_test.jsonl.gz")
    assert len(pairs) + dropped == 2354 and dropped >= 2
    assert all(p.text.endswith("\n\nAssistant:") and "\n\nAssistant:" not in p.response for p in pairs[:200])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) + "\n{oops\n")
    from tasks.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_hh(bad)
    gz = tmp_path / "one.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}))
    [pair], dropped = read_hh(gz)
    assert (pair.text, pair.response, pair.rejected, dropped) == ("\n\nHuman: hi\n\nAssistant:", " hello", " go", 0)


def test_dpo_options_are_validated_together() -> None:
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_flat({"task.name": "preference", "dpo.beta": -1, "dpo.loss": "hinge",
                               "task.source": "snli"})
    assert set(err.value.keys()) == {"dpo.beta", "dpo.loss", "task.source"}
    with pytest.raises(ConfigError, match=r"apply to task\.name=preference only"):
        TrialConfig.from_flat({"task.name": "sms_spam", "dpo.beta": 0.5})
    with pytest.raises(ConfigError, match=r"dpo\.init.*not a directory"):
        TrialConfig.from_flat({"task.name": "preference", "dpo.init": "/no/such/checkpoint"})


@pytest.mark.slow
def test_short_cpu_run_learns_held_out_preferences(real_data: Path) -> None:
    config = TrialConfig.from_flat({
        "task.name": "preference", "task.max_length": 128, "task.num_generations": 1, "model.init": "random",
        "model.n_layer": 2, "model.n_head": 4, "model.n_embd": 128, "model.dropout": 0.0, "method.name": "full",
        "optim.lr": 1e-3, "train.epochs": 1, "train.batch_size": 8, "train.eval_at_start": True,
        "train.eval_every": 1000, "train.max_new_tokens": 4, "dpo.beta": 0.1})
    result = run_trial(config).record
    history = result.history
    assert history[0].metrics["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 0: policy = reference
    assert result.test["preference_accuracy"] > 0.5 and result.test["reward_margin"] > 0
    assert result.notes["dpo_reference"] == "precomputed"
    assert [(g.stage, g.example) for g in result.generations] == [("start", 0), ("final", 0)]  # judged against start
