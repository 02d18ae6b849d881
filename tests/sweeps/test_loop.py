"""The one training loop on real data: it learns, resumes exactly, survives divergence, stops early, and runs every
method on every task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model import get_tokenizer
from model.tokenizer import EOT_TOKEN_ID
from sweeps import loop
from sweeps.config import TrialConfig
from sweeps.loop import TrialResult, generate_samples, run_trial, setup
from sweeps.records import CheckpointRecord, FinalRecord, StepRecord
from tasks.base import ClassificationTask

TINY = {"model.init": "random", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64}
SMALL_DATA = {"task.max_train_examples": 48, "task.max_eval_examples": 24, "task.max_length": 48}


def _config(**flat) -> TrialConfig:
    return TrialConfig.from_flat({**TINY, **{k.replace("__", "."): v for k, v in flat.items()}})


@pytest.mark.slow
def test_sms_spam_beats_the_majority_baseline(real_data) -> None:
    config = TrialConfig.from_flat({**TINY, "model.n_embd": 128, "model.n_head": 4, "task.name": "sms_spam",
                                    "optim.lr": 1e-3, "train.epochs": 3, "train.batch_size": 16,
                                    "schedule.warmup_steps": 10})
    result = run_trial(config).record
    majority = 151 / 300  # the larger class of the 300 test messages
    assert result.status == "completed"
    assert result.test["accuracy"] >= majority + 0.3, result.test["accuracy"]
    assert 0 < result.padding_share < 0.5 and result.tokens_seen > 0
    assert result.trainable_params == result.total_params


@pytest.mark.slow
def test_alpaca_lowers_held_out_perplexity(real_data) -> None:
    config = _config(task__name="alpaca", task__max_train_examples=256, task__max_eval_examples=32,
                     task__max_length=96, optim__lr=3e-3, train__max_steps=30, train__eval_at_start=True,
                     task__num_generations=2, train__max_new_tokens=6)
    result = run_trial(config).record
    before, after = result.history[0].metrics["perplexity"], result.validation["perplexity"]
    assert result.history[0].step == 0
    assert after < 0.5 * before, (before, after)
    assert [(g.stage, g.example) for g in result.generations] == [("final", 0), ("final", 1)]
    assert result.generations[0].prompt.endswith("### Response:\n") and result.generations[0].reference


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nli", "imdb"])
def test_nli_and_imdb_complete_and_report(task: str, real_data) -> None:
    result = run_trial(_config(task__name=task, train__max_steps=6, train__batch_size=8, optim__lr=1e-3,
                               task__max_train_examples=96, task__max_eval_examples=48, task__max_length=96)).record
    assert result.status == "completed"
    for metrics in (result.validation, result.test):
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert result.split_sizes == {"train": 96, "validation": 48, "test": 48}


def _trainable(result: TrialResult) -> dict[str, torch.Tensor]:
    tensors = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    tensors.update({f"head.{n}": p for n, p in result.head.named_parameters()})
    return tensors


def test_resume_mid_run_is_bit_identical(real_data, tmp_path: Path) -> None:
    # dropout on (RNG matters), LoRA, 40 examples / batch 8 = 5 batches per epoch: the run crosses an epoch
    config = _config(task__name="sms_spam", task__max_train_examples=40, task__max_eval_examples=24,
                     model__dropout=0.1, method__name="lora", lora__dropout=0.1, lora__targets="all",
                     optim__lr=5e-3, train__max_steps=8, train__batch_size=8, train__checkpoint_every=3,
                     schedule__name="cosine", schedule__warmup_steps=2)
    events: list = []
    straight = run_trial(config, events.append, checkpoint_dir=tmp_path / "ckpt")
    checkpoints = [e.path for e in events if isinstance(e, CheckpointRecord)]
    assert [Path(c).name for c in checkpoints] == ["step_0000003", "step_0000006"]
    resumed = run_trial(config, checkpoint_dir=tmp_path / "ckpt2", resume_from=checkpoints[0])
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        assert torch.equal(a[name], b[name]), name
    flat_straight, flat_resumed = straight.record.to_dict(), resumed.record.to_dict()
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "tokens_seen", "step"):
        assert flat_straight[key] == flat_resumed[key], key


def test_nan_loss_stops_the_trial_as_diverged(real_data) -> None:
    events: list = []
    result = run_trial(_config(task__name="sms_spam", **{k.replace(".", "__"): v for k, v in SMALL_DATA.items()},
                               optim__name="sgd", optim__lr=1e30, train__max_grad_norm=None, train__max_steps=20),
                       events.append).record
    assert result.status == "diverged"
    assert 1 < result.diverged_at_step <= 20
    assert "test_accuracy" not in result.to_dict()
    assert isinstance(events[-1], FinalRecord) and events[-1].status == "diverged"


def test_early_stopping_restores_the_best_weights(real_data, monkeypatch: pytest.MonkeyPatch) -> None:
    scores = iter([0.5, 0.7, 0.6, 0.65])
    seen_heads: list[torch.Tensor] = []

    def scripted(self, model, head, batches, examples=None):
        seen_heads.append(head.weight.detach().clone())
        return {"accuracy": next(scores, 0.0), "macro_f1": 0.0, "loss": 1.0}

    monkeypatch.setattr(ClassificationTask, "evaluate", scripted)
    result = run_trial(_config(task__name="sms_spam", **{k.replace(".", "__"): v for k, v in SMALL_DATA.items()},
                               optim__lr=1e-2, train__max_steps=50, train__eval_every=1,
                               train__early_stopping_patience=2, train__baseline_eval=False))  # scripts validation only
    assert result.record.status == "early_stopped" and result.record.step == 4 and result.record.best_step == 2
    assert torch.equal(result.head.weight, seen_heads[1])  # the weights evaluated at step 2
    assert not torch.equal(seen_heads[1], seen_heads[3])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "last_k", "head_only", "bitfit", "lora"])
@pytest.mark.parametrize("task", ["sms_spam", "imdb", "nli", "alpaca"])
def test_every_method_on_every_task_runs(task: str, method: str, real_data) -> None:
    result = run_trial(_config(task__name=task, method__name=method, method__k=1, train__max_steps=2,
                               train__batch_size=4, task__num_generations=1, train__max_new_tokens=4,
                               **{k.replace(".", "__"): v for k, v in SMALL_DATA.items()})).record
    assert result.status == "completed" and result.step == 2
    assert f"test_{result.primary_metric}" in result.to_dict()
    assert 0 < result.trainable_params <= result.total_params


def test_memory_account_and_time_split_per_trial(real_data) -> None:
    """The trial's own memory, from its tensors: AdamW in float32 keeps exactly 8 bytes per trainable parameter;
    head-only trains and keeps far less than full fine-tuning; time is split into setup, training and evaluation."""
    small = {k.replace(".", "__"): v for k, v in SMALL_DATA.items()}
    full = run_trial(_config(task__name="sms_spam", method__name="full", train__max_steps=2, **small)).record
    head = run_trial(_config(task__name="sms_spam", method__name="head_only", train__max_steps=2, **small)).record
    for r in (full, head):
        assert r.optimizer_state_bytes == 8 * r.trainable_params
        assert r.gradient_bytes == r.kept_bytes == 4 * r.trainable_params
        assert r.weight_bytes == 4 * r.total_params and r.activation_bytes > 0
        assert r.memory_account_bytes == (r.weight_bytes + r.gradient_bytes + r.optimizer_state_bytes
                                          + r.activation_bytes)
        assert r.memory_source == "account" and r.peak_memory_mb == r.memory_account_bytes / 2**20
        assert r.setup_seconds > 0 and r.train_seconds > 0 and r.eval_seconds > 0
        assert r.setup_seconds + r.train_seconds + r.eval_seconds <= r.wall_seconds
    assert head.memory_account_bytes < full.memory_account_bytes and head.kept_bytes < full.kept_bytes / 100
    # a frozen body saves fewer activations: no gradient flows into the blocks' weights
    assert head.activation_bytes < full.activation_bytes


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sms_spam", "alpaca", "preference"])
def test_per_example_results_add_up_to_the_metrics(task: str, real_data) -> None:
    """Every validation and test example once, under its index in the split; their outcomes give the split's
    metric back (accuracy from right/wrong, perplexity's loss from summed losses over tokens)."""
    record = run_trial(_config(task__name=task, train__max_steps=2, train__batch_size=4, task__num_generations=0,
                               task__max_train_examples=24, task__max_eval_examples=20,
                               task__max_length=128 if task != "sms_spam" else 48)).record
    for split, metrics in (("validation", record.validation), ("test", record.test)):
        columns = record.predictions[split]
        assert sorted(columns["example"]) == list(range(record.split_sizes[split]))
        if task == "alpaca":
            assert sum(columns["loss"]) / sum(columns["tokens"]) == pytest.approx(metrics["loss"], rel=1e-5)
        else:
            right = [a == b for a, b in zip(columns["label"], columns["prediction"], strict=True)]
            assert sum(right) / len(right) == pytest.approx(metrics[record.primary_metric])
    rows = record.prediction_rows()
    assert len(rows) == record.split_sizes["validation"] + record.split_sizes["test"]
    assert "predictions" not in record.to_row()["result"]  # a table of their own, not inside trials.result


def _untrained_test_metrics(config: TrialConfig) -> tuple[float, float]:
    """Accuracy and mean loss on test of the model and head exactly as ``setup`` builds them, before any step,
    scored one unpadded example at a time (none of ``evaluate``'s batching)."""
    trial = setup(config)
    trial.model.eval()
    split, right, loss = trial.splits["test"], 0, 0.0
    with torch.no_grad():
        for i in range(len(split)):
            ids = split.ids(i)[None]
            logits = trial.head(trial.model.hidden_states(ids, torch.ones_like(ids))[0, -1])
            label = split.labels[i]
            right += int(logits.argmax()) == int(label)
            loss += float(torch.nn.functional.cross_entropy(logits[None], label[None]))
    return right / len(split), loss / len(split)


def test_the_untrained_model_is_the_step_0_baseline(real_data) -> None:
    """``baseline_test`` is the test score of the model before training (an independent evaluation of a freshly
    built model and head agrees), it reaches the metrics table at step 0, and the majority baseline comes with it."""
    small = {k.replace(".", "__"): v for k, v in SMALL_DATA.items()}
    config = _config(task__name="sms_spam", optim__lr=1e-2, train__max_steps=3, model__dropout=0.1, **small)
    record = run_trial(config).record
    accuracy, loss = _untrained_test_metrics(config)
    assert record.baseline_test["loss"] == pytest.approx(loss, rel=1e-4)
    assert abs(record.baseline_test["accuracy"] - accuracy) <= 1 / record.split_sizes["test"]  # a near-tie may flip
    assert record.test["loss"] != pytest.approx(record.baseline_test["loss"], rel=1e-3)  # training moved it
    assert (0, "test", "loss", record.baseline_test["loss"]) in record.metric_rows()
    assert record.to_row()["baseline_step0"] == record.baseline_test["accuracy"]
    assert record.baseline_majority == pytest.approx(0.5)  # the 24 test messages hold 12 of each class here
    assert record.to_row()["baseline_majority"] == record.baseline_majority
    skipped = run_trial(_config(task__name="sms_spam", optim__lr=1e-2, train__max_steps=3, model__dropout=0.1,
                                train__baseline_eval=False, **small)).record
    assert skipped.baseline_test == {} and skipped.to_row()["baseline_step0"] is None
    assert skipped.test == record.test  # the baseline changes nothing about training (dropout's RNG included)


@pytest.mark.slow
def test_a_resumed_trial_keeps_its_baseline_without_evaluating_again(real_data, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    evaluated: list[tuple[str, int]] = []
    real_evaluate = loop.evaluate

    def spy(trial, split, examples=None):
        evaluated.append((split, trial.state.step))
        return real_evaluate(trial, split, examples)

    monkeypatch.setattr(loop, "evaluate", spy)
    small = {k.replace(".", "__"): v for k, v in SMALL_DATA.items()}
    config = _config(task__name="alpaca", optim__lr=3e-3, train__max_steps=4, train__checkpoint_every=2,
                     task__num_generations=0, **{**small, "task__max_length": 96})
    events: list = []
    straight = run_trial(config, events.append, checkpoint_dir=tmp_path / "ckpt").record
    assert evaluated == [("test", 0), ("validation", 4), ("test", 4)]
    assert straight.baseline_test["perplexity"] > straight.test["perplexity"] and straight.baseline_majority is None
    evaluated.clear()
    checkpoint = next(e.path for e in events if isinstance(e, CheckpointRecord))
    resumed = run_trial(config, resume_from=checkpoint).record
    assert evaluated == [("validation", 4), ("test", 4)]
    assert resumed.resumed_from_step == 2 and resumed.baseline_test == straight.baseline_test


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sms_spam", "preference"])
def test_training_metrics_along_training_come_from_a_fixed_training_subset(task: str, real_data) -> None:
    """train.train_metrics: every validation also scores the first len(validation) training examples, recorded as
    the ``train`` split at that step; the last one equals an independent evaluation of the final weights there."""
    flat = {"task__name": task, "train__max_steps": 4, "train__eval_every": 2, "train__batch_size": 8,
            "optim__lr": 1e-3, "train__train_metrics": True, "task__max_train_examples": 40,
            "task__max_eval_examples": 16, "task__max_length": 64 if task == "sms_spam" else 128}
    result = run_trial(_config(**flat))
    record = result.record
    metric = record.primary_metric
    assert [e.step for e in record.history] == [2, 4] and all(metric in e.train for e in record.history)
    rows = {(step, name) for step, split, name, _ in record.metric_rows() if split == "train"}
    assert {(2, metric), (4, metric)} <= rows
    assert record.split_sizes["train_subset"] == 16
    trial = setup(_config(**flat))
    trial.model.load_state_dict(result.model.state_dict())
    if result.head is not None:
        trial.head.load_state_dict(result.head.state_dict())
    assert loop.evaluate(trial, loop.TRAIN_SUBSET)[metric] == pytest.approx(record.history[-1].train[metric])
    off = run_trial(_config(**{**flat, "train__train_metrics": False})).record
    assert all(not e.train for e in off.history) and "train_subset" not in off.split_sizes


def test_a_full_trial_trains_the_same_weights_with_and_without_kept_embedding_buffers(
        real_data, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrialConfig.from_flat({
        "model.init": "random", "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "task.name": "sms_spam",
        "task.max_train_examples": 48, "task.max_eval_examples": 8, "task.max_length": 48, "train.max_steps": 4,
        "train.grad_accum": 2, "train.baseline_eval": False, "optim.lr": 1e-3, "train.device": "cpu"})
    attached = []
    real_attach = loop.EmbeddingGrads.attach
    monkeypatch.setattr(loop.EmbeddingGrads, "attach", lambda modules: attached.append(real_attach(modules))
                        or attached[-1])
    kept = run_trial(config).model
    monkeypatch.setattr(loop.EmbeddingGrads, "attach", lambda modules: None)
    dense = run_trial(config).model
    assert attached and attached[0] is not None and not kept.wte.sparse  # used, then released
    for (name, a), b in zip(kept.named_parameters(), dense.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_train_compile_compiles_the_blocks_every_task_calls(real_data, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile`` used to wrap the model in ``torch.compile``, which compiles ``forward`` only: classification
    and language-model losses call ``hidden_states`` and ran eager. Now each block is compiled; the trial's numbers
    match eager's (``aot_eager`` here: inductor needs a compiler run of tens of seconds on 2 cores)."""
    from torch._dynamo.utils import counters

    from model import GPT2

    real = GPT2.compile_blocks
    monkeypatch.setattr(GPT2, "compile_blocks", lambda self: real(self, backend="aot_eager"))
    flat = {"model.init": "random", "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "task.name": "sms_spam",
            "task.max_train_examples": 16, "task.max_eval_examples": 8, "task.max_length": 32, "train.max_steps": 2,
            "train.baseline_eval": False, "train.device": "cpu"}
    eager = run_trial(TrialConfig.from_flat(flat)).record
    torch._dynamo.reset()
    counters.clear()
    compiled = run_trial(TrialConfig.from_flat({**flat, "train.compile": True})).record
    assert counters["stats"]["unique_graphs"] >= 2  # the whole-sequence block and the last-position block
    assert compiled.test == pytest.approx(eager.test, rel=1e-4)


@pytest.mark.slow
def test_batched_generations_are_what_each_prompt_generates_alone(real_data) -> None:
    """Batches of left-padded prompts of different lengths give each prompt's own greedy continuation; a prompt too
    long for the batch budget generates alone with the room left, and one that leaves no room is skipped."""
    trial = setup(_config(task__name="alpaca", task__max_eval_examples=16, task__max_length=96,
                          task__num_generations=8, train__max_new_tokens=8, train__eval_batch_size=3,
                          train__precision="fp32"))
    model, enc = trial.model, get_tokenizer()
    prompts = {i: trial.task.prompt_and_reference(trial.splits["test"], i)[0] for i in range(8)}
    model.config.n_positions = max(len(p) for p in prompts.values())  # the longest prompt leaves no room
    room = {i: model.config.n_positions - len(p) for i, p in prompts.items()}
    batched, alone = [i for i in room if room[i] >= 8], [i for i in room if 1 <= room[i] < 8]
    assert len(batched) > 3 and alone and len({len(prompts[i]) for i in batched}) > 3  # every case, mixed lengths
    expected = []
    for i in sorted(batched + alone):
        out = model.generate(prompts[i][None], min(8, room[i]), eos_token_id=EOT_TOKEN_ID)[0, len(prompts[i]):]
        expected.append((i, enc.decode([t for t in out.tolist() if t != EOT_TOKEN_ID])))
    sizes: list[int] = []
    generate = model.generate
    model.generate = lambda ids, *args, **kwargs: sizes.append(len(ids)) or generate(ids, *args, **kwargs)
    samples = generate_samples(trial, "final")
    assert [(g.example, g.response) for g in samples] == expected and {g.stage for g in samples} == {"final"}
    assert sorted(sizes) == sorted([len(batched[k : k + 3]) for k in range(0, len(batched), 3)] + [1] * len(alone))


@pytest.mark.slow
def test_dpo_keeps_its_starting_generations_across_a_resume(real_data, tmp_path: Path) -> None:
    """A preference (DPO) trial keeps the generations of its starting weights beside its final ones, on the same
    prompts; a checkpoint carries them, so a resumed run has the same without generating again."""
    config = _config(task__name="preference", task__max_train_examples=16, task__max_eval_examples=8,
                     task__max_length=128, task__num_generations=3, train__max_new_tokens=4, train__batch_size=4,
                     train__max_steps=2, train__checkpoint_every=1, optim__lr=1e-2)
    events: list = []
    straight = run_trial(config, events.append, checkpoint_dir=tmp_path / "ckpt").record
    by_stage = {stage: [g for g in straight.generations if g.stage == stage] for stage in ("start", "final")}
    assert [g.example for g in by_stage["start"]] == [g.example for g in by_stage["final"]] == [0, 1, 2]
    assert [g.prompt for g in by_stage["start"]] == [g.prompt for g in by_stage["final"]]
    assert straight.eval_seconds > 0
    assert {r[:2] for r in straight.generation_rows()} == {(s, i) for s in ("start", "final") for i in range(3)}
    checkpoint = next(e.path for e in events if isinstance(e, CheckpointRecord))
    resumed = run_trial(config, resume_from=checkpoint).record
    assert resumed.resumed_from_step == 1 and resumed.generations == straight.generations
    alpaca = run_trial(_config(task__name="alpaca", task__max_train_examples=8, task__max_eval_examples=8,
                               task__max_length=96, task__num_generations=2, train__max_new_tokens=2,
                               train__max_steps=1)).record
    assert {g.stage for g in alpaca.generations} == {"final"}  # instruction tuning keeps its final weights' only


def test_a_fixed_init_seed_keeps_one_random_model_across_trial_seeds() -> None:
    """model.init_seed: the random weights stand still while train.seed changes (as a pretrained checkpoint does);
    unset, each trial seed draws its own model; a bad value is a ConfigError naming the key."""
    from model import ConfigError
    from sweeps.config import ModelConfig
    from sweeps.loop import build_model

    def wte(seed: int, init_seed: int | None) -> torch.Tensor:
        config = ModelConfig(init="random", n_layer=1, n_head=2, n_embd=8, init_seed=init_seed)
        return build_model(config, seed).wte.weight

    assert torch.equal(wte(0, 7), wte(1, 7))
    assert not torch.equal(wte(0, None), wte(1, None))
    with pytest.raises(ConfigError, match="init_seed"):
        ModelConfig(init="random", init_seed=-1)


def test_a_lora_plus_trial_trains_b_at_its_ratio_of_the_rate(real_data) -> None:
    """``lora.lr_ratio`` reaches the trial's optimizer: every ``lora_B`` in one group at 16 × ``optim.lr``, the rest
    (A and the task head) at ``optim.lr``."""
    from model.lora import lora_layers

    trial = setup(_config(task__name="sms_spam", method__name="lora", lora__lr_ratio=16, optim__lr=1e-3,
                          **{k.replace(".", "__"): v for k, v in SMALL_DATA.items()}))
    b_ids = {id(layer.lora_B) for _, layer in lora_layers(trial.model)}
    groups = {round(g["initial_lr"], 12): {id(p) for p in g["params"]} for g in trial.optimizer.param_groups}
    assert set(groups) == {1e-3, 1.6e-2} and groups[1.6e-2] == b_ids and b_ids


@pytest.mark.parametrize("variant", [{"method.name": "lora", "lora.dora": True},
                                     {"method.name": "lora", "lora.init": "pissa", "lora.targets": "all"},
                                     {"method.name": "ia3"},
                                     {"method.name": "lora", "train.activation_checkpointing": True},
                                     {"method.name": "lora", "lora.dora": True, "model.quantize": "nf4",
                                      "lora.lr_ratio": 4},
                                     pytest.param({"method.name": "lora", "optim.name": "adamw8bit",
                                                   "lora.targets": "all"}, marks=pytest.mark.slow)],
                         ids=["dora", "pissa", "ia3", "lora-checkpointed", "qdora-plus", "lora-adamw8bit"])
def test_each_lora_variant_and_ia3_train_through_one_loop(variant: dict, real_data) -> None:
    """A few steps of each through ``run_trial``: only the method's tensors (and the task head) train, and they move
    off their start (B is zero at the start of default LoRA and DoRA, IA3's scales are ones); the memory account has
    the trial's saved activations; what it reports are plain numbers (torchao's 8-bit AdamW keeps lr as a tensor)."""
    from model.adapters import adapter_parameters

    steps: list[StepRecord] = []
    result = run_trial(_config(task__name="sms_spam", optim__lr=1e-2, train__max_steps=3, train__batch_size=8,
                               **{k.replace(".", "__"): v for k, v in {**SMALL_DATA, **variant}.items()}),
                       callback=lambda r: steps.append(r) if isinstance(r, StepRecord) else None)
    record, model = result.record, result.model
    assert record.status == "completed" and record.activation_bytes > 0
    assert steps and all(type(s.lr) is float for s in steps)  # plain numbers: Ray refuses tensors in metrics
    trained = dict(adapter_parameters(model))
    head = sum(p.numel() for p in result.head.parameters())
    assert record.trainable_params == sum(p.numel() for p in trained.values()) + head
    kinds = {name.rsplit(".", 1)[1] for name in trained}
    expected = {"ia3": {"ia3_l"}}.get(variant["method.name"], {"lora_A", "lora_B"})
    assert kinds == expected | ({"lora_magnitude"} if variant.get("lora.dora") else set())
    if variant["method.name"] == "ia3":
        assert any((p - 1).abs().max() > 0 for p in trained.values())
    elif variant.get("lora.init") != "pissa":
        assert any(p.abs().max() > 0 for n, p in trained.items() if n.endswith("lora_B"))


def test_activation_checkpointing_shrinks_the_trials_saved_activations(real_data) -> None:
    """The memory account's activations are measured (saved-tensor hooks over one micro-batch), so checkpointing
    shows in them: each block keeps its input, not its activations."""
    measured = {}
    for checkpointed in (False, True):
        record = run_trial(_config(task__name="sms_spam", method__name="lora", train__max_steps=1, train__batch_size=8,
                                   model__n_layer=4, train__activation_checkpointing=checkpointed,
                                   **{k.replace(".", "__"): v for k, v in SMALL_DATA.items()})).record
        measured[checkpointed] = record.activation_bytes
    assert 0 < measured[True] < 0.5 * measured[False], measured


def test_the_memory_account_counts_nf4_weights_at_their_stored_size(real_data) -> None:
    """QLoRA's account: the adapted projections' weights at their packed size (measured from the inner tensors'
    storages), so the trial's weight bytes drop by what NF4 saves on them, and nothing else changes."""
    from model.adapters import adapter_layers

    base = {"task.name": "sms_spam", "method.name": "lora", "lora.targets": "all", "train.max_steps": 1,
            "train.batch_size": 8, "model.n_embd": 128, "model.n_head": 4, **SMALL_DATA}
    plain = run_trial(TrialConfig.from_flat({**TINY, **base}))
    nf4 = run_trial(TrialConfig.from_flat({**TINY, **base, "model.quantize": "nf4"}))
    layers = [layer.weight for _, layer in adapter_layers(nf4.model)]
    stored = sum(getattr(w, n).untyped_storage().nbytes() for w in layers for n in w.__tensor_flatten__()[0])
    full = sum(w.numel() * 4 for w in layers)
    assert stored <= 0.135 * full
    assert plain.record.weight_bytes - nf4.record.weight_bytes == full - stored
    assert nf4.record.optimizer_state_bytes == plain.record.optimizer_state_bytes


def test_bf16_frozen_weights_halve_what_the_method_does_not_train(real_data) -> None:
    """A LoRA trial with ``model.frozen_dtype=bfloat16`` under bf16 autocast on the CPU: every frozen parameter is bf16,
    every trained one float32, the account's weights drop by half the frozen bytes; without autocast the trial is
    refused before training, naming the key."""
    from model import ConfigError

    flat = {"task.name": "sms_spam", "method.name": "lora", "train.max_steps": 2, "train.batch_size": 8,
            "train.precision": "bf16", **SMALL_DATA}
    plain = run_trial(TrialConfig.from_flat({**TINY, **flat}))
    half = run_trial(TrialConfig.from_flat({**TINY, **flat, "model.frozen_dtype": "bfloat16"}))
    assert half.record.status == "completed" and all(math.isfinite(v) for v in half.record.test.values())
    params = dict(half.model.named_parameters())
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    frozen = sum(p.numel() for p in params.values() if not p.requires_grad)
    assert plain.record.weight_bytes - half.record.weight_bytes == 2 * frozen
    with pytest.raises(ConfigError, match=r"model\.frozen_dtype"):
        setup(TrialConfig.from_flat({**TINY, **flat, "train.precision": "auto", "train.device": "cpu",
                                     "model.frozen_dtype": "bfloat16"}))
