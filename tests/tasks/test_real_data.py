"""Each task on the real data: documented split sizes and label counts, encoding round trips, deterministic splits."""

from __future__ import annotations

import pytest
import torch

from model import get_tokenizer
from model.tokenizer import EOT_TOKEN_ID
from tasks import TaskConfig, get_task

# (task config, {split: size}, {split: label counts in label order} or None for language modelling)
DOCUMENTED = {
    "sms_spam": (TaskConfig(name="sms_spam"), {"train": 1045, "validation": 149, "test": 300},
                 {"train": [528, 517], "validation": [70, 79], "test": [149, 151]}),
    "sms_spam-full": (TaskConfig(name="sms_spam", balanced=False), {"train": 3900, "validation": 556, "test": 1118},
                      {"train": [3378, 522], "validation": [482, 74], "test": [967, 151]}),
    "imdb": (TaskConfig(name="imdb"), {"train": 22500, "validation": 2500, "test": 25000},
             {"train": [11250, 11250], "validation": [1250, 1250], "test": [12500, 12500]}),
    # SICK's own split; SOURCE.md counts (entailment, neutral, contradiction)
    "nli-sick": (TaskConfig(name="nli", source="sick"), {"train": 4439, "validation": 495, "test": 4906},
                 {"train": [1274, 2524, 641], "validation": [143, 281, 71], "test": [1404, 2790, 712]}),
    "nli-snli": (TaskConfig(name="nli", source="snli"), {"train": 8857, "validation": 985, "test": 9824},
                 {"test": [3368, 3219, 3237]}),
    "alpaca": (TaskConfig(name="alpaca"), {"train": 49973, "validation": 1000, "test": 1000}, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DOCUMENTED, ids=list(DOCUMENTED))
def test_split_sizes_and_label_counts(case: str, real_data) -> None:
    config, sizes, counts = DOCUMENTED[case]
    task = get_task(config)
    splits = task.load(get_tokenizer())
    assert {k: len(v) for k, v in splits.items()} == sizes
    for split, expected in (counts or {}).items():
        assert torch.bincount(splits[split].labels, minlength=len(expected)).tolist() == expected
    assert all(int(v.lengths.min()) >= 1 and int(v.lengths.max()) <= task.max_length for v in splits.values())


def test_sms_balanced_split_follows_the_reference_procedure(real_data) -> None:
    """The reference's pandas calls, run here on the same messages, pick the same examples in the same order."""
    import numpy as np

    from tasks.sms_spam import SOURCE, read_messages

    messages = read_messages(real_data / SOURCE.relpath)
    ham = [m for m in messages if m.label == 0]
    spam = [m for m in messages if m.label == 1]
    import pandas as pd  # the reference's own library, as the test's independent oracle

    ham_df = pd.DataFrame({"text": [m.text for m in ham]}).sample(len(spam), random_state=123)
    pool = pd.concat([ham_df, pd.DataFrame({"text": [m.text for m in spam]})]).sample(frac=1, random_state=123)
    expected_test = pool["text"].tolist()[int(len(pool) * 0.7) + int(len(pool) * 0.1):]
    task = get_task(TaskConfig(name="sms_spam"))
    got = task.read_splits([real_data / SOURCE.relpath])["test"]
    assert [e.text for e in got] == expected_test
    assert np.bincount([e.label for e in got]).tolist() == [149, 151]


@pytest.mark.slow
@pytest.mark.parametrize("config", [TaskConfig(name="sms_spam"), TaskConfig(name="nli"), TaskConfig(name="imdb")],
                         ids=["sms_spam", "nli", "imdb"])
def test_classification_encoding_round_trips(config: TaskConfig, real_data) -> None:
    task = get_task(config)
    enc = get_tokenizer()
    raw = task.read_splits(task.resolve_paths(None))["validation"][:200]
    encoded = task.load(enc)["validation"]
    for i, example in enumerate(raw):
        ids = encoded.ids(i).tolist()
        if len(ids) < task.max_length:  # not truncated: the tokens are exactly the text
            assert enc.decode(ids) == example.text
        else:
            assert example.text.endswith(enc.decode(ids[-5:])) or example.text.startswith(enc.decode(ids[:5]))


def test_nli_truncation_keeps_the_hypothesis(real_data) -> None:
    task = get_task(TaskConfig(name="nli", max_length=16))
    enc = get_tokenizer()
    from tasks.base import Example

    ids, label = task.encode(Example(text="Premise: " + "word " * 50 + "\nHypothesis: The cat sleeps.", label=2), enc)
    assert len(ids) == 16 and label == 2
    assert enc.decode(ids).endswith("\nHypothesis: The cat sleeps.")


@pytest.mark.slow
def test_alpaca_prompt_and_loss_span(real_data) -> None:
    task = get_task(TaskConfig(name="alpaca"))
    enc = get_tokenizer()
    raw = task.read_splits(task.resolve_paths(None))["test"][:50]
    test = task.load(enc)["test"]
    for i, example in enumerate(raw):
        ids, prompt_len = test.ids(i).tolist(), int(test.prompt_lengths[i])
        assert enc.decode(ids[:prompt_len]) == example.text
        assert example.text.startswith("Below is an instruction") and example.text.endswith("### Response:\n")
        if len(ids) < task.max_length:
            assert enc.decode(ids[prompt_len:-1]) == example.response and ids[-1] == EOT_TOKEN_ID
    with_input = [e for e in raw if "### Input:" in e.text]
    assert with_input and len(with_input) < len(raw)


def test_subsets_are_deterministic_and_cached_encoding_is_reused(real_data) -> None:
    enc = get_tokenizer()
    a = get_task(TaskConfig(name="nli", max_train_examples=100, max_eval_examples=50)).load(enc)
    b = get_task(TaskConfig(name="nli", max_train_examples=100, max_eval_examples=50)).load(enc)
    assert {k: len(v) for k, v in a.items()} == {"train": 100, "validation": 50, "test": 50}
    assert torch.equal(a["train"].tokens, b["train"].tokens)
