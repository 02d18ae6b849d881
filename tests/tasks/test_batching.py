"""Batches: every example once per epoch, determined by (seed, epoch), length-grouped, right-padded; metrics."""

from __future__ import annotations

import pytest
import torch

from tasks import EncodedSplit, batch_order, collate
from tasks.metrics import classification_metrics


def _split(lengths: list[int]) -> EncodedSplit:
    return EncodedSplit.from_lists([[7] * n for n in lengths], labels=list(range(len(lengths))))


def test_epoch_order_covers_everything_once_and_is_reproducible() -> None:
    lengths = torch.randint(1, 200, (1000,))
    a = batch_order(lengths, 16, seed=3, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert a == batch_order(lengths, 16, seed=3, epoch=0)
    assert a != batch_order(lengths, 16, seed=3, epoch=1)
    assert a != batch_order(lengths, 16, seed=4, epoch=0)


def _padding_share(split: EncodedSplit, batches: list[list[int]]) -> float:
    padded = sum(collate(split, b).padded_tokens for b in batches)
    return 1 - sum(collate(split, b).real_tokens for b in batches) / padded


def test_length_grouping_cuts_padding() -> None:
    lengths = torch.randint(1, 300, (2000,), generator=torch.Generator().manual_seed(0))
    split = _split(lengths.tolist())
    grouped = _padding_share(split, batch_order(lengths, 16, 0, 0, group_by_length=True))
    random_order = _padding_share(split, batch_order(lengths, 16, 0, 0, group_by_length=False))
    assert grouped < 0.1 < random_order


def test_collate_right_pads_with_mask() -> None:
    split = EncodedSplit.from_lists([[1, 2, 3], [4]], labels=[0, 1])
    batch = collate(split, [0, 1], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [0, 1] and batch.real_tokens == 4 and batch.padded_tokens == 6


def test_class_ids_and_prompt_lengths_never_share_a_split() -> None:
    split = EncodedSplit.from_lists([[1, 2, 3], [4, 5]], prompt_lengths=[1, 1])
    batch = collate(split, [1, 0])
    assert batch.labels is None and batch.prompt_lengths.tolist() == [1, 1]
    assert split.subset([1]).prompt_lengths.tolist() == [1] and split.subset([1]).labels is None
    for columns in ({}, {"labels": [0, 1], "prompt_lengths": [1, 1]}):
        with pytest.raises(ValueError, match="exactly one of labels"):
            EncodedSplit.from_lists([[1, 2, 3], [4, 5]], **columns)


def test_classification_metrics_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 0, 1])
    m = classification_metrics(preds, labels, ("a", "b", "c"))
    # a: tp 2, fp 1, fn 1 -> f1 2/3; b: tp 1, fp 2, fn 1 -> f1 0.4; c: never predicted -> 0
    assert m["accuracy"] == 3 / 6
    assert abs(m["f1_a"] - 2 / 3) < 1e-12 and abs(m["f1_b"] - 0.4) < 1e-12 and m["f1_c"] == 0.0
    assert abs(m["macro_f1"] - (2 / 3 + 0.4) / 3) < 1e-12


@pytest.mark.parametrize("chunk_bytes", [None, 3 * 4 * 50257], ids=["default-chunk", "three-rows"])
def test_token_logps_without_autograd_equal_the_whole_projection_in_chunks(
        chunk_bytes: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scored positions' log-probabilities: chunked under no_grad (evaluation, a DPO reference), whole under autograd,
    the same numbers either way (and as log_softmax then gather), also for a batch with nothing scored."""
    from model import GPT2, GPT2Config
    from tasks import base

    if chunk_bytes is not None:
        monkeypatch.setitem(base.LOGIT_CHUNK_BYTES, "cpu", chunk_bytes)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16)).eval()
    split = EncodedSplit.from_lists([list(range(5, 25)), list(range(30, 42)), [7, 8, 9]], prompt_lengths=[4, 6, 3])
    batch = collate(split, [0, 1, 2])
    hidden, targets, scored = base.scored_hidden(model, batch, batch.prompt_lengths)
    assert len(targets) == 16 + 6 + 0 == int(scored.sum())
    whole = base.token_logps(model, hidden, targets)  # autograd on: one projection
    by_hand = torch.log_softmax(model.lm_head(hidden).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    projected = []
    lm_head = model.lm_head
    monkeypatch.setattr(model, "lm_head", lambda h: projected.append(len(h)) or lm_head(h))
    with torch.no_grad():
        chunked = base.token_logps(model, hidden, targets)
        nothing = base.token_logps(model, hidden[:0], targets[:0])
    assert projected == ([3] * 7 + [1] if chunk_bytes else [22]) + [0]  # never more rows at once than the budget
    assert whole.requires_grad and not chunked.requires_grad
    torch.testing.assert_close(chunked, whole.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, by_hand, rtol=0, atol=1e-5)
    assert nothing.shape == (0,)
