"""The one small interface every task implements, and what all tasks share: encoded splits, the token cache,
length-grouped dynamic-padding batches, heads, losses and metrics.

A task subclass only says where its data is and how to read it (``sources``, ``read_splits``); the two kinds below
(``ClassificationTask``, ``LanguageModelingTask``) know how to encode, batch, compute the loss and score. The
preference (DPO) task is its own kind, in ``tasks/preference.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from model.gpt2 import GPT2
from model.tokenizer import EOT_TOKEN_ID, cache_dir
from tasks.data import DataError, Source, data_dir, ensure, sha256_file
from tasks.metrics import classification_metrics

if TYPE_CHECKING:
    from tasks.options import TaskOptions

SPLITS = ("train", "validation", "test")
_CACHE_VERSION = 2  # bump when encoding or the cached layout changes, so stale caches are never read


@dataclass
class ExampleResults:
    """Per-example outcomes of one evaluation, in the order its batches came; whoever made the batches fills in
    ``example`` (the examples' indices in the split). Classification and preference pairs fill ``label`` and
    ``prediction`` (pairs: 0 is the chosen answer); language modelling fills ``loss`` (summed over the example's
    scored tokens, nats) and ``tokens``."""

    example: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    prediction: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def columns(self) -> dict[str, list]:
        """The filled columns by name (what a final record carries)."""
        return {k: v for k, v in vars(self).items() if v}


@dataclass
class Example:
    """One raw example. Classification: ``text`` and ``label``. Language modelling: ``text`` is the prompt and
    ``response`` the target."""

    text: str
    label: int = -1
    response: str = ""
    rejected: str = ""
    """Preference pairs: ``response`` is the chosen answer, ``rejected`` the other one."""


# --------------------------------------------------------------------------------------------------------------------
# Encoded splits and the cache
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """A split as token ids: one flat buffer plus offsets (compact, and safe to load with ``weights_only``), and one
    number per example, kept under the name of what it is: ``labels`` (class ids, classification) or
    ``prompt_lengths`` (language modelling and preference pairs). Exactly one of the two is set.
    """

    tokens: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (n + 1,) int64
    labels: torch.Tensor | None = None  # (n,) int64 class ids
    prompt_lengths: torch.Tensor | None = None  # (n,) int64 prompt tokens at the start of each example
    ref_logps: torch.Tensor | None = None  # (n, 2) preference pairs: reference log-probs of chosen, rejected

    def __post_init__(self) -> None:
        _check_one_column(self.labels, self.prompt_lengths)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def ids(self, i: int) -> torch.Tensor:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]].long()

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]], *, labels: Sequence[int] | None = None,
                   prompt_lengths: Sequence[int] | None = None) -> EncodedSplit:
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        flat = [t for s in sequences for t in s]
        return cls(torch.tensor(flat, dtype=torch.int32), offsets, labels=_long(labels),
                   prompt_lengths=_long(prompt_lengths))

    def columns(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The per-example number of the given examples, under its own name (``labels`` or ``prompt_lengths``)."""
        return {name: value[list(indices)] for name, value in self._per_example().items()}

    def subset(self, indices: Sequence[int]) -> EncodedSplit:
        columns = {name: value.tolist() for name, value in self.columns(indices).items()}
        return EncodedSplit.from_lists([self.ids(i).tolist() for i in indices], **columns)

    def to_dict(self) -> dict[str, torch.Tensor]:  # what the token cache stores
        return {"tokens": self.tokens, "offsets": self.offsets, **self._per_example()}

    def _per_example(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in (("labels", self.labels), ("prompt_lengths", self.prompt_lengths))
                if value is not None}


def _long(values: Sequence[int] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(list(values), dtype=torch.long)


def _check_one_column(labels: torch.Tensor | None, prompt_lengths: torch.Tensor | None) -> None:
    """Class ids and prompt lengths never share a split or batch: a reader of one must not get the other."""
    if (labels is None) == (prompt_lengths is None):
        raise ValueError("exactly one of labels (class ids) and prompt_lengths must be set")


def deterministic_subset(n: int, k: int | None, seed: int) -> list[int] | None:
    """``k`` of ``range(n)`` chosen by ``seed``, in their original order; None when no subsetting is needed."""
    if k is None or k >= n:
        return None
    return sorted(random.Random(seed).sample(range(n), k))


# --------------------------------------------------------------------------------------------------------------------
# Batching: dynamic padding, length-grouped sampling
# --------------------------------------------------------------------------------------------------------------------


def batch_order(
    lengths: torch.Tensor, batch_size: int, seed: int, epoch: int, shuffle: bool = True, group_by_length: bool = True
) -> list[list[int]]:
    """Index lists of one epoch's batches, determined by ``(seed, epoch)`` alone, so a resumed run sees the same ones.

    Length grouping sorts within windows of 50 batches, so batches hold similar lengths (little padding) while the
    order across the epoch stays random.
    """
    n = len(lengths)
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(order)
    if group_by_length:
        window = batch_size * 50
        order = [i for s in range(0, n, window)
                 for i in sorted(order[s : s + window], key=lambda j: -int(lengths[j]))]
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if shuffle and group_by_length:
        random.Random(f"{seed}-{epoch}-batches").shuffle(batches)
    return batches


@dataclass
class Batch:
    """Padded rows and, like ``EncodedSplit``, exactly one per-row number: ``labels`` or ``prompt_lengths``."""

    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 = token
    labels: torch.Tensor | None = None  # (B,) class ids
    prompt_lengths: torch.Tensor | None = None  # (B,) prompt tokens at the start of each row
    ref_logps: torch.Tensor | None = None  # (B/2, 2) preference batches: precomputed reference log-probs

    def __post_init__(self) -> None:
        _check_one_column(self.labels, self.prompt_lengths)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_lengths,
                                 self.ref_logps)))

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def pad_right(seqs: Sequence[torch.Tensor], pad_id: int = EOT_TOKEN_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: ``(input_ids, attention_mask)``, each ``(len(seqs), width)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return ids, mask


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int = EOT_TOKEN_ID) -> Batch:
    """Right-pad the chosen examples to the longest among them."""
    ids, mask = pad_right([split.ids(i) for i in indices], pad_id)
    return Batch(ids, mask, **split.columns(indices))


# --------------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------------


class Task:
    """What a task is: data source, splits, encoding, head, loss, metrics. Subclasses fill in the first three."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "classification", "lm" or "preference"
    default_max_length: ClassVar[int]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    generates: ClassVar[bool] = False  # keeps greedy generations of held-out prompts (task.num_generations)
    keeps_start_generations: ClassVar[bool] = False
    """Also keep the generations of the weights the trial started from (before its first step), against which its
    own generations are judged: what DPO changed is only visible next to what its starting model said."""
    source_names: ClassVar[tuple[str, ...]] = ()
    """The choices of ``task.source``, the default first; empty for a task with a single source (``task.source``
    must then stay unset). ``TaskConfig`` validates against this, so each task names its sources once."""
    per_example: ClassVar[str]
    """Which ``EncodedSplit`` field the number ``encode`` returns fills: ``labels`` or ``prompt_lengths``."""

    def __init__(self, config: TaskOptions) -> None:
        self.config = config
        self.max_length = config.max_length or self.default_max_length

    @classmethod
    def for_trial(cls, config: TaskOptions, **sections: Any) -> Task:
        """The task as a trial runs it. ``sections`` are the trial's other config sections by name (``dpo=...``): a
        task takes the ones that shape it and ignores the rest, so callers need no case per task."""
        return cls(config)

    @property
    def source(self) -> str | None:
        """The data this task reads: ``task.source``, else the default; None for a single-source task."""
        return self.config.source or (self.source_names[0] if self.source_names else None)

    # --- to implement -------------------------------------------------------------------------------------------------
    def sources(self) -> list[Source]:
        """The data files this task reads (downloaded when missing)."""
        raise NotImplementedError

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        """Parse the files into train/validation/test examples; a bad row raises ``DataError`` naming file and line."""
        raise NotImplementedError

    def encode(self, example: Example, enc: tiktoken.Encoding) -> tuple[list[int], int] | None:
        """Token ids and the example's number (see ``per_example``); None drops the example."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------------------
    def resolve_paths(self, root: Path | None) -> list[Path]:
        """Local paths of the data files, downloaded and checked when missing."""
        return [ensure(s, root if root is not None else data_dir()) for s in self.sources()]

    def cache_options(self) -> dict[str, Any]:
        """The config values that change the encoded data (the cache key includes them)."""
        return {"max_length": self.max_length, **({"source": self.source} if self.source_names else {})}

    def load(self, enc: tiktoken.Encoding, seed: int = 0, root: Path | None = None) -> dict[str, EncodedSplit]:
        """Encoded train/validation/test, from the token cache when this exact data was encoded before.

        Subsetting (``max_train_examples``, ``max_eval_examples``) happens after the cache, so trials that differ
        only in subset size share one cached encoding.
        """
        paths = self.resolve_paths(root)
        key_material = json.dumps({
            "version": _CACHE_VERSION, "task": self.name, "options": self.cache_options(),
            "sources": [sha256_file(p) for p in paths], "tokenizer": enc.name, "n_vocab": enc.n_vocab,
        }, sort_keys=True)
        key = hashlib.sha256(key_material.encode()).hexdigest()[:20]
        cache_file = cache_dir() / f"{self.name}-{key}.pt"
        splits = _read_cache(cache_file)
        if splits is None:
            splits = self._encode_all(paths, enc)
            _write_cache(cache_file, splits)
        for split_name, cap in (("train", self.config.max_train_examples), ("validation", self.config.max_eval_examples),
                                ("test", self.config.max_eval_examples)):
            chosen = deterministic_subset(len(splits[split_name]), cap, seed)
            if chosen is not None:
                splits[split_name] = splits[split_name].subset(chosen)
        return splits

    def _encode_all(self, paths: list[Path], enc: tiktoken.Encoding) -> dict[str, EncodedSplit]:
        raw = self.read_splits(paths)
        empty = [s for s in SPLITS if not raw.get(s)]
        if empty:
            raise DataError(f"{self.name}: empty split(s) {', '.join(empty)} from {', '.join(map(str, paths))}")
        out = {}
        for split_name in SPLITS:
            encoded = [e for e in (self.encode(x, enc) for x in raw[split_name]) if e is not None]
            if not encoded:
                raise DataError(f"{self.name}: every {split_name} example was dropped at max_length={self.max_length}")
            numbers = {self.per_example: [number for _, number in encoded]}
            out[split_name] = EncodedSplit.from_lists([ids for ids, _ in encoded], **numbers)
        return out

    def make_head(self, n_embd: int) -> nn.Module | None:
        return None

    def collate(self, split: EncodedSplit, indices: Sequence[int]) -> Batch:
        """One batch of the given examples."""
        return collate(split, indices)

    def prepare(self, model: GPT2, splits: dict[str, EncodedSplit], device: torch.device, autocast: Any,
                batch_size: int) -> dict[str, Any]:
        """Called once the model and method are set up, before training (DPO computes its reference here); returns
        notes for the trial's final record."""
        return {}

    def prompt_and_reference(self, split: EncodedSplit, i: int) -> tuple[torch.Tensor, list[int]]:
        """A held-out prompt to generate from, and its reference answer (tasks that ``generate``)."""
        raise NotImplementedError

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch's scored items, and how many items that is."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch],
                 examples: ExampleResults | None = None) -> dict[str, float]:
        """The split's metrics; with ``examples``, each example's outcome appended there too."""
        raise NotImplementedError

    def majority_baseline(self, train: EncodedSplit, test: EncodedSplit) -> float | None:
        """The primary metric on ``test`` of always predicting the most frequent class of ``train``: the floor a
        trained classifier must clear, since a model that learned nothing but the class prior scores it. None for
        tasks without class labels (language modelling; preference pairs, whose "label" is always the chosen
        answer)."""
        return None


class ClassificationTask(Task):
    """Reads the last real token's hidden state through a new ``num_classes`` linear head."""

    kind = "classification"
    per_example = "labels"
    label_names: ClassVar[tuple[str, ...]]
    primary_metric = "accuracy"
    higher_is_better = True

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def encode(self, example: Example, enc: tiktoken.Encoding) -> tuple[list[int], int] | None:
        ids = enc.encode_ordinary(example.text)[: self.max_length]
        return (ids, example.label) if ids else None

    def make_head(self, n_embd: int) -> nn.Module:
        head = nn.Linear(n_embd, self.num_classes)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def logits(self, model: GPT2, head: nn.Module, batch: Batch) -> torch.Tensor:
        return head(model.last_token_states(batch.input_ids, batch.attention_mask))  # (B, num_classes)

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        return F.cross_entropy(self.logits(model, head, batch).float(), batch.labels), len(batch.labels)

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch],
                 examples: ExampleResults | None = None) -> dict[str, float]:
        preds, labels, loss_sum, n = [], [], 0.0, 0
        for batch in batches:
            logits = self.logits(model, head, batch).float()
            loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            n += len(batch.labels)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch.labels.cpu())
        metrics = classification_metrics(torch.cat(preds), torch.cat(labels), self.label_names)
        metrics["loss"] = loss_sum / n
        if examples is not None:
            examples.label += torch.cat(labels).tolist()
            examples.prediction += torch.cat(preds).tolist()
        return metrics

    def majority_baseline(self, train: EncodedSplit, test: EncodedSplit) -> float:
        """The primary metric (accuracy) on ``test`` of always predicting the most frequent label of ``train`` (the
        split the trial trained on, after subsetting; ties go to the smallest label id). The majority comes from the
        training split, never from the test split, as a trained model's would. Near 1 / classes on balanced data; on
        imbalanced data it shows how much of a model's accuracy the class prior alone earns."""
        counts = torch.bincount(train.labels, minlength=self.num_classes).tolist()
        majority = max(range(len(counts)), key=lambda label: (counts[label], -label))
        predictions = torch.full_like(test.labels, majority)
        return classification_metrics(predictions, test.labels, self.label_names)[self.primary_metric]


def scored_hidden(model: GPT2, batch: Batch, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states and next-token targets of the positions that count, ``(N, C)`` and ``(N,)``, and where they
    are, ``(B, T-1)``: a row's targets from index ``first[row]`` on, padding excluded.

    Hidden states are gathered *before* the LM head, so the vocabulary projection (the largest matmul of a small
    GPT-2) runs only where a loss is taken: prompt and padding positions skip it.
    """
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]  # (B, T-1, C) predicts 1..T-1
    targets = batch.input_ids[:, 1:]  # (B, T-1)
    position = torch.arange(1, batch.input_ids.size(1), device=targets.device)[None, :]  # index of each target
    scored = (position >= first[:, None]) & batch.attention_mask[:, 1:].bool()  # (B, T-1)
    return hidden[scored], targets[scored], scored


def scored_logits(model: GPT2, batch: Batch, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scored_hidden`` through the LM head: logits ``(N, vocab)``, targets ``(N,)`` and where they are."""
    hidden, targets, scored = scored_hidden(model, batch, first)
    return model.lm_head(hidden), targets, scored


# Logits of one chunk of scored positions when no gradient is kept (token_logps): on a CPU a chunk that stays in cache
# (2x faster than the whole (N, vocab) block, measured at 1,500 positions x 50,257 on one core); on a GPU large
# enough to keep it busy, and never more than this in memory at once.
LOGIT_CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 512 * 2**20}


def token_logps(model: GPT2, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each scored position, ``(N,)`` (float32), from ``scored_hidden``'s states and targets.

    Without autograd (evaluation, a DPO reference) the vocabulary projection and its log-softmax run a chunk of
    positions at a time (``LOGIT_CHUNK_BYTES``): the (N, vocab) logits never exist whole. With autograd they do, in one
    piece: the backward of a chunked projection would allocate a whole gradient for every chunk."""
    if torch.is_grad_enabled() or len(targets) == 0:
        return -F.cross_entropy(model.lm_head(hidden).float(), targets, reduction="none")
    budget = LOGIT_CHUNK_BYTES.get(hidden.device.type, LOGIT_CHUNK_BYTES["cuda"])
    rows = max(1, budget // (4 * model.config.vocab_size))
    return torch.cat([-F.cross_entropy(model.lm_head(h).float(), t, reduction="none")
                      for h, t in zip(hidden.split(rows), targets.split(rows), strict=True)])


class LanguageModelingTask(Task):
    """Next-token loss on the response (and the prompt with ``prompt_loss``)."""

    kind = "lm"
    per_example = "prompt_lengths"
    primary_metric = "perplexity"
    higher_is_better = False
    generates = True

    def encode(self, example: Example, enc: tiktoken.Encoding) -> tuple[list[int], int] | None:
        prompt = enc.encode_ordinary(example.text)
        ids = (prompt + enc.encode_ordinary(example.response) + [EOT_TOKEN_ID])[: self.max_length]
        return (ids, len(prompt)) if len(ids) > len(prompt) else None  # no response token left: dropped

    @staticmethod
    def _scored(model: GPT2, batch: Batch, prompt_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of the response tokens (every token with ``prompt_loss``)."""
        lengths = batch.prompt_lengths
        first = torch.ones_like(lengths) if prompt_loss else lengths  # index of the first scored target
        logits, targets, _ = scored_logits(model, batch, first)
        return logits, targets

    def prompt_and_reference(self, split: EncodedSplit, i: int) -> tuple[torch.Tensor, list[int]]:
        ids = split.ids(i)
        prompt = ids[: int(split.prompt_lengths[i])]
        return prompt, [t for t in ids[len(prompt):].tolist() if t != EOT_TOKEN_ID]

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        logits, targets = self._scored(model, batch, self.config.prompt_loss)
        return F.cross_entropy(logits.float(), targets), len(targets)

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch],
                 examples: ExampleResults | None = None) -> dict[str, float]:
        """Perplexity of held-out responses (always response tokens only, whatever the training loss used)."""
        total, count = 0.0, 0
        for batch in batches:
            hidden, targets, scored = scored_hidden(model, batch, batch.prompt_lengths)  # responses only
            token_loss = -token_logps(model, hidden, targets)  # (N,)
            total += float(token_loss.sum())
            count += len(targets)
            if examples is not None:
                rows = scored.nonzero()[:, 0]  # the row of each scored token
                per_row = torch.zeros(len(scored), device=token_loss.device).index_add_(0, rows, token_loss)
                examples.loss += per_row.tolist()
                examples.tokens += scored.sum(1).tolist()
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}


def _read_cache(path: Path) -> dict[str, EncodedSplit] | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        return {s: EncodedSplit(**data[s]) for s in SPLITS}
    except Exception:  # a truncated or foreign cache file is rebuilt, never trusted
        return None


def _write_cache(path: Path, splits: dict[str, EncodedSplit]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({s: splits[s].to_dict() for s in SPLITS}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs re-tokenizing

