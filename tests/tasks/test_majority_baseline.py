"""The majority-class baseline: the training split's most frequent label (ties: the smallest id), scored on test; none
for tasks without class labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tasks import EncodedSplit, TaskConfig, get_task
from tasks.base import SPLITS


def _labelled(labels: list[int]) -> EncodedSplit:
    return EncodedSplit.from_lists([[7, 8]] * len(labels), labels=labels)


def _nli():
    return get_task(TaskConfig(name="nli"))


def test_majority_comes_from_train_and_is_scored_on_test() -> None:
    # train's majority is 1 (3 of 5); test's own majority would be 2, which would score 3/5
    train, test = _labelled([1, 0, 1, 2, 1]), _labelled([2, 1, 2, 0, 2])
    assert _nli().majority_baseline(train, test) == pytest.approx(1 / 5)
    assert get_task(TaskConfig(name="sms_spam")).majority_baseline(_labelled([0, 1, 1]), _labelled([1, 1, 0, 1])) \
        == pytest.approx(3 / 4)


def test_a_tie_goes_to_the_smallest_label_id() -> None:
    test = _labelled([1, 2, 2, 2])
    assert _nli().majority_baseline(_labelled([2, 2, 1, 1, 0]), test) == pytest.approx(1 / 4)  # 1 over 2
    assert _nli().majority_baseline(_labelled([2, 1, 2, 1]), test) == pytest.approx(1 / 4)  # order does not matter
    assert _nli().majority_baseline(_labelled([2, 2, 2, 1]), test) == pytest.approx(3 / 4)  # no tie: 2
    # a class absent from train cannot win: all of train is class 2, test has none of it
    assert _nli().majority_baseline(_labelled([2]), _labelled([0, 1])) == 0.0


@pytest.mark.parametrize("name", ["alpaca", "preference"])
def test_tasks_without_class_labels_have_none(name: str) -> None:
    split = EncodedSplit.from_lists([[1, 2, 3], [4, 5, 6]], prompt_lengths=[1, 1])
    assert get_task(TaskConfig(name=name)).majority_baseline(split, split) is None


@pytest.mark.parametrize("balanced", [True, False])
def test_sms_spam_majority_by_hand(balanced: bool, enc, data_dir: Path) -> None:
    """On the real messages: ham is the training majority when all 5,574 are kept, and it scores ham's share of
    test; the balanced reference split's train majority is whatever its 1,045 messages hold."""
    task = get_task(TaskConfig(name="sms_spam", balanced=balanced))
    splits = task.load(enc, root=data_dir)
    assert set(splits) == set(SPLITS)
    counts = Counter(splits["train"].labels.tolist())
    majority = min(counts, key=lambda label: (-counts[label], label))
    if not balanced:
        assert majority == 0  # ham: 87% of the messages
    expected = sum(label == majority for label in splits["test"].labels.tolist()) / len(splits["test"])
    assert task.majority_baseline(splits["train"], splits["test"]) == pytest.approx(expected)
    assert 0.4 < expected < (0.6 if balanced else 0.9)
