"""The one small interface every task implements, and what all tasks share: encoded splits, the token cache,
length-grouped dynamic-padding batches, heads, losses and metrics.

A task subclass only says where its data is and how to read it (``sources``, ``read_splits``); the two kinds below
(``ClassificationTask``, ``LanguageModelingTask``) know how to encode, batch, compute the loss and score.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from model.config import Problems, is_int
from model.gpt2 import GPT2, last_token_hidden
from model.lora import disable_lora, lora_layers
from model.tokenizer import EOT_TOKEN_ID
from tasks.data import DataError, Source, data_dir, ensure, sha256_file
from tasks.dpo import DPOConfig, dpo_loss
from tasks.metrics import classification_metrics

SPLITS = ("train", "validation", "test")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gpt2-finetune-guide" / "tokens"
CACHE_ENV = "FINETUNE_CACHE_DIR"
_CACHE_VERSION = 1  # bump when encoding changes, so stale caches are never read


@dataclass
class TaskConfig:
    """Which task and its data options. Options a task does not use are ignored by it."""

    name: str = "sms_spam"
    """``sms_spam``, ``imdb``, ``nli``, ``alpaca`` or ``preference`` (DPO)."""
    max_length: int | None = None
    """Tokens per example after truncation; None is the task's default (sms_spam 128, imdb 256, nli 128, alpaca 512)."""
    max_train_examples: int | None = None
    """Use a deterministic random subset of the training split of this size (None: all of it)."""
    max_eval_examples: int | None = None
    """Cap validation and test at this many examples, same deterministic subsetting (None: all)."""
    balanced: bool = True
    """sms_spam: True is the GPT-2 reference setup (ham undersampled to the 747 spam); False keeps all 5,574 messages
    with a stratified split."""
    source: str | None = None
    """Which data a task reads; None is the task's default. nli: ``sick`` (default, own splits), ``snli`` (dev/test
    only; see tasks/nli.py) or ``all_nli_med`` (Hugging Face). preference: ``instruction`` (default, 1,100 pairs),
    ``hh_helpful`` or ``hh_helpful_train`` (see tasks/preference.py)."""
    prompt_loss: bool = False
    """alpaca: also train on the prompt tokens (default: loss on response tokens only)."""
    num_generations: int = 3
    """alpaca: greedy generations kept for fixed held-out prompts."""

    def __post_init__(self) -> None:
        problems = Problems()
        if self.name not in TASK_NAMES:
            problems.add("name", f"unknown task {self.name!r}; choose one of {', '.join(TASK_NAMES)}")
        for key in ("max_length", "max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value < 1):
                problems.add(key, f"must be a positive integer or null, got {value!r}")
        if not isinstance(self.balanced, bool):
            problems.add("balanced", f"must be true or false, got {self.balanced!r}")
        allowed = {"nli": NLI_SOURCES, "preference": PREFERENCE_SOURCES}.get(self.name)
        if self.source is not None and allowed and self.source not in allowed:
            problems.add("source", f"unknown {self.name} source {self.source!r}; choose one of {', '.join(allowed)}")
        elif self.source is not None and self.name in TASK_NAMES and not allowed:
            problems.add("source", f"task {self.name} has a single source; leave task.source unset")
        if not isinstance(self.prompt_loss, bool):
            problems.add("prompt_loss", f"must be true or false, got {self.prompt_loss!r}")
        if not is_int(self.num_generations) or self.num_generations < 0:
            problems.add("num_generations", f"must be an integer >= 0, got {self.num_generations!r}")
        problems.raise_if_any("invalid task configuration")


TASK_NAMES = ("sms_spam", "imdb", "nli", "alpaca", "preference")
NLI_SOURCES = ("sick", "snli", "all_nli_med")
PREFERENCE_SOURCES = ("instruction", "hh_helpful", "hh_helpful_train")


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
    """A split as token ids: one flat buffer plus offsets (compact, and safe to load with ``weights_only``).

    ``labels`` holds class ids for classification and prompt lengths for language modelling.
    """

    tokens: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (n + 1,) int64
    labels: torch.Tensor  # (n,) int64
    reference: torch.Tensor | None = None  # (n, 2) preference pairs: reference log-probs of chosen, rejected

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def ids(self, i: int) -> torch.Tensor:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]].long()

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]], labels: Sequence[int]) -> EncodedSplit:
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        flat = [t for s in sequences for t in s]
        return cls(torch.tensor(flat, dtype=torch.int32), offsets, torch.tensor(list(labels), dtype=torch.long))

    def subset(self, indices: Sequence[int]) -> EncodedSplit:
        return EncodedSplit.from_lists([self.ids(i).tolist() for i in indices], [int(self.labels[i]) for i in indices])

    def to_dict(self) -> dict[str, torch.Tensor]:  # what the token cache stores
        return {"tokens": self.tokens, "offsets": self.offsets, "labels": self.labels}


def cache_dir() -> Path:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else DEFAULT_CACHE_DIR


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
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 = token
    labels: torch.Tensor  # (B,) class ids or prompt lengths
    reference: torch.Tensor | None = None  # (B/2, 2) preference batches: precomputed reference log-probs

    def to(self, device: torch.device) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.input_ids, self.attention_mask, self.labels, self.reference)))

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
    return Batch(ids, mask, split.labels[list(indices)])


# --------------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------------


class Task:
    """What a task is: data source, splits, encoding, head, loss, metrics. Subclasses fill in the first three."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "classification" or "lm"
    default_max_length: ClassVar[int]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    generates: ClassVar[bool] = False  # keeps greedy generations of held-out prompts (task.num_generations)

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.max_length = config.max_length or self.default_max_length

    # --- to implement -------------------------------------------------------------------------------------------------
    def sources(self) -> list[Source]:
        """The data files this task reads (downloaded when missing)."""
        raise NotImplementedError

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        """Parse the files into train/validation/test examples; a bad row raises ``DataError`` naming file and line."""
        raise NotImplementedError

    def encode(self, example: Example, enc: tiktoken.Encoding) -> tuple[list[int], int] | None:
        """Token ids and the label column value for one example; None drops it (and it is counted)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------------------
    def resolve_paths(self, root: Path | None) -> list[Path]:
        """Local paths of the data files, downloaded and checked when missing."""
        return [ensure(s, root if root is not None else data_dir()) for s in self.sources()]

    def cache_options(self) -> dict[str, Any]:
        """The config values that change the encoded data (the cache key includes them)."""
        return {"max_length": self.max_length}

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
            out[split_name] = EncodedSplit.from_lists([ids for ids, _ in encoded], [lab for _, lab in encoded])
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
        """A held-out prompt to generate from, and its reference answer (language modelling tasks)."""
        ids = split.ids(i)
        prompt = ids[: int(split.labels[i])]
        return prompt, [t for t in ids[len(prompt):].tolist() if t != EOT_TOKEN_ID]

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean loss over the batch's scored items, and how many items that is."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch]) -> dict[str, float]:
        raise NotImplementedError


class ClassificationTask(Task):
    """Reads the last real token's hidden state through a new ``num_classes`` linear head."""

    kind = "classification"
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
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)  # (B, T, C)
        return head(last_token_hidden(hidden, batch.attention_mask))  # (B, num_classes)

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        return F.cross_entropy(self.logits(model, head, batch).float(), batch.labels), len(batch.labels)

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch]) -> dict[str, float]:
        preds, labels, loss_sum, n = [], [], 0.0, 0
        for batch in batches:
            logits = self.logits(model, head, batch).float()
            loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
            n += len(batch.labels)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch.labels.cpu())
        metrics = classification_metrics(torch.cat(preds), torch.cat(labels), self.label_names)
        metrics["loss"] = loss_sum / n
        return metrics


def scored_logits(model: GPT2, batch: Batch, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits and targets of the positions that count, ``(N, vocab)`` and ``(N,)``, and where they are,
    ``(B, T-1)``: a row's targets from index ``first[row]`` on, padding excluded.

    Hidden states are gathered *before* the LM head, so the vocabulary projection (the largest matmul of a small
    GPT-2) runs only where a loss is taken: prompt and padding positions skip it.
    """
    hidden = model.hidden_states(batch.input_ids, batch.attention_mask)[:, :-1]  # (B, T-1, C) predicts 1..T-1
    targets = batch.input_ids[:, 1:]  # (B, T-1)
    position = torch.arange(1, batch.input_ids.size(1), device=targets.device)[None, :]  # index of each target
    scored = (position >= first[:, None]) & batch.attention_mask[:, 1:].bool()  # (B, T-1)
    return model.lm_head(hidden[scored]), targets[scored], scored


class LanguageModelingTask(Task):
    """Next-token loss on the response (and the prompt with ``prompt_loss``); ``labels`` holds prompt lengths."""

    kind = "lm"
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
        first = torch.ones_like(batch.labels) if prompt_loss else batch.labels  # index of the first scored target
        logits, targets, _ = scored_logits(model, batch, first)
        return logits, targets

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        logits, targets = self._scored(model, batch, self.config.prompt_loss)
        return F.cross_entropy(logits.float(), targets), len(targets)

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch]) -> dict[str, float]:
        """Perplexity of held-out responses (always response tokens only, whatever the training loss used)."""
        total, count = 0.0, 0
        for batch in batches:
            logits, targets = self._scored(model, batch, prompt_loss=False)
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            count += len(targets)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(count)}


class PreferenceTask(Task):
    """DPO on (prompt, chosen, rejected) pairs. An entry holds ``prompt+chosen+EOT`` then ``prompt+rejected+EOT``;
    ``labels`` holds the prompt length. A batch of B pairs is 2B rows: the chosen sequences, then the rejected ones.

    The reference model is the policy's starting point. With LoRA it is the policy with its adapters disabled (no
    second copy); otherwise its log-probs are computed once, before training, for every pair (``prepare``): one pass
    over the data instead of a frozen copy in memory and a second forward pass at every step
    (``sweeps/bench_dpo.py`` measures the two).
    """

    kind = "preference"
    primary_metric = "preference_accuracy"
    higher_is_better = True
    generates = True

    def __init__(self, config: TaskConfig, dpo: DPOConfig | None = None) -> None:
        super().__init__(config)
        self.dpo = dpo if dpo is not None else DPOConfig()

    @staticmethod
    def boundary(ids: torch.Tensor, prompt_len: int) -> int:
        """Where the chosen sequence ends in a pair entry (just after its end token)."""
        eot = (ids[prompt_len:] == EOT_TOKEN_ID).nonzero()
        return prompt_len + int(eot[0]) + 1

    def collate(self, split: EncodedSplit, indices: Sequence[int]) -> Batch:
        seqs, prompts = [], []
        for i in indices:
            ids, p = split.ids(i), int(split.labels[i])
            cut = self.boundary(ids, p)
            seqs.append((ids[:cut], ids[cut:]))
            prompts.append(p)
        input_ids, mask = pad_right([c for c, _ in seqs] + [r for _, r in seqs], EOT_TOKEN_ID)  # chosen, then rejected
        reference = split.reference[list(indices)] if split.reference is not None else None
        return Batch(input_ids, mask, torch.tensor(prompts + prompts, dtype=torch.long), reference)

    def prompt_and_reference(self, split: EncodedSplit, i: int) -> tuple[torch.Tensor, list[int]]:
        ids, p = split.ids(i), int(split.labels[i])
        return ids[:p], ids[p : self.boundary(ids, p) - 1].tolist()  # the chosen answer

    @staticmethod
    def sequence_logps(model: GPT2, batch: Batch) -> torch.Tensor:
        """Summed log-probability of each row's response tokens (prompt and padding masked), ``(2B,)``."""
        logits, targets, scored = scored_logits(model, batch, batch.labels)  # (N, V), (N,), (2B, T-1)
        logp = F.log_softmax(logits.float(), dim=-1)
        token_logp = logp.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        rows = scored.nonzero()[:, 0]  # the row of each scored token
        return torch.zeros(len(batch.input_ids), device=logp.device).index_add_(0, rows, token_logp)

    def reference_logps(self, model: GPT2, batch: Batch) -> torch.Tensor:
        """Reference log-probs ``(B, 2)`` (chosen, rejected) of a batch."""
        if batch.reference is not None:
            return batch.reference.float()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), disable_lora(model):
                logps = self.sequence_logps(model, batch)
        finally:
            model.train(was_training)
        return logps.view(2, -1).T

    def prepare(self, model: GPT2, splits: dict[str, EncodedSplit], device: torch.device, autocast: Any,
                batch_size: int) -> dict[str, Any]:
        if any(True for _ in lora_layers(model)):
            return {"dpo_reference": "adapters_disabled"}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for split in splits.values():
                out = torch.empty(len(split), 2)
                for start in range(0, len(split), batch_size):
                    idx = list(range(start, min(start + batch_size, len(split))))
                    with autocast:
                        logps = self.sequence_logps(model, self.collate(split, idx).to(device))
                    out[idx] = logps.view(2, -1).T.float().cpu()
                split.reference = out
        model.train(was_training)
        return {"dpo_reference": "precomputed"}

    def pair_terms(self, model: GPT2, batch: Batch) -> tuple[torch.Tensor, ...]:
        policy = self.sequence_logps(model, batch).view(2, -1)  # (2, B): chosen, rejected
        ref = self.reference_logps(model, batch).to(policy.device)  # (B, 2)
        loss, chosen_reward, rejected_reward = dpo_loss(policy[0], policy[1], ref[:, 0], ref[:, 1], self.dpo)
        return loss, chosen_reward, rejected_reward, policy.detach(), ref

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        loss, *_ = self.pair_terms(model, batch)
        return loss.mean(), len(loss)

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch]) -> dict[str, float]:
        """Held-out pairs: preference accuracy (chosen reward > rejected), mean reward margin, log-prob drift of the
        chosen and rejected responses from the reference (summed over tokens), and the DPO loss."""
        sums = {"loss": 0.0, "preference_accuracy": 0.0, "reward_margin": 0.0, "chosen_reward": 0.0,
                "rejected_reward": 0.0, "chosen_logp_drift": 0.0, "rejected_logp_drift": 0.0}
        n = 0
        for batch in batches:
            loss, cr, rr, policy, ref = self.pair_terms(model, batch)
            sums["loss"] += float(loss.sum())
            sums["preference_accuracy"] += float((cr > rr).sum())
            sums["reward_margin"] += float((cr - rr).sum())
            sums["chosen_reward"] += float(cr.sum())
            sums["rejected_reward"] += float(rr.sum())
            sums["chosen_logp_drift"] += float((policy[0] - ref[:, 0]).sum())
            sums["rejected_logp_drift"] += float((policy[1] - ref[:, 1]).sum())
            n += len(loss)
        return {k: v / max(n, 1) for k, v in sums.items()}


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

