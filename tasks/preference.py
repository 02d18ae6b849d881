"""Preference pairs (prompt, chosen, rejected) for DPO.

Sources (``task.source``):
- ``instruction`` (default): the 1,100-pair instruction preference set (Alpaca-style prompts; chosen/rejected
  responses written by Llama 3.1 70B), ``preference/instruction-data-with-preference.json.gz``. 6 pairs have
  chosen == rejected and are dropped, leaving 1,094; shuffled with seed 123 into train 929 / validation 54 / test 111
  (85 / 5 / 10 %, the proportions of the set's reference notebook, rounded down for train and validation).
- ``hh_helpful``: Anthropic HH-RLHF helpful-base, the test file (2,354 dialogues; 2 identical pairs dropped). The
  conversation up to the final ``\\n\\nAssistant:`` is the prompt, the final assistant turn the response; a pair whose
  two dialogues differ before that turn is dropped and counted. Split with seed 123 into 80 / 10 / 10 %.
- ``hh_helpful_train``: the same for the full helpful-base *train* file (43,835 dialogues, downloaded with its
  checksum when missing; not in the offline data directory), split 90 / 5 / 5 %.

Encoding: each pair is stored as one entry, ``prompt + chosen + <|endoftext|>`` followed by
``prompt + rejected + <|endoftext|>``, with the prompt length (``prompt_lengths``); responses never contain
``<|endoftext|>``, so the first one after the prompt marks where the chosen sequence ends. Responses are cut so each
sequence fits ``task.max_length`` (default 256) with its end token; a pair whose prompt leaves fewer than 8 response
tokens is dropped, as is one whose two responses become identical once cut. A batch of B pairs is 2B rows: the
chosen sequences, then the rejected ones.

The reference model is the policy's starting point. With LoRA it is the policy with its adapters disabled (no second
copy); otherwise its log-probs are computed once, before training, for every pair (``Preference.prepare``): one pass
over the data instead of a frozen copy in memory and a second forward pass at every step (``sweeps/bench/dpo.py``
measures the two).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tiktoken
import torch
from torch import nn

from model.adapters import adapter_layers, disable_adapters
from model.gpt2 import GPT2, eval_mode
from model.tokenizer import EOT_TOKEN_ID
from tasks.alpaca import format_prompt
from tasks.base import (
    Batch,
    EncodedSplit,
    Example,
    ExampleResults,
    Task,
    pad_right,
    scored_hidden,
    token_logps,
)
from tasks.data import DataError, Source, open_text, read_json_list
from tasks.dpo import DPOConfig, dpo_loss

if TYPE_CHECKING:
    from tasks.options import TaskOptions

SOURCES = {
    "instruction": Source(
        relpath="preference/instruction-data-with-preference.json.gz",
        url="https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/"
            "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        sha256="305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
    ),
    "hh_helpful": Source(
        relpath="preference/hh-rlhf_helpful-base_test.jsonl.gz",
        url="https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz",
        sha256="41c3a32fe45a7075f7e32b11bd29383f9fe650287354a95568f61295a8e694da",
    ),
    "hh_helpful_train": Source(
        relpath="preference/hh-rlhf_helpful-base_train.jsonl.gz",
        url="https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz",
        sha256=None,  # only the compressed file's hash is published (its git-LFS oid)
        download_sha256="518a5bf288456fc9f3b7c980c54116fba0c52f274d3f4d344675d83e4058f6f4",
    ),
}
SPLIT_SHARES = {"instruction": (0.85, 0.05), "hh_helpful": (0.8, 0.1), "hh_helpful_train": (0.9, 0.05)}
MIN_RESPONSE_TOKENS = 8
ASSISTANT = "\n\nAssistant:"


def read_instruction(path: Path) -> tuple[list[Example], int]:
    """Pairs of the instruction preference set, and how many were dropped (chosen == rejected)."""
    records = read_json_list(path)
    pairs, dropped = [], 0
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("instruction", "chosen", "rejected")):
            raise DataError(f"{path}: record {i}: expected string fields instruction, input, chosen, rejected; got "
                            f"{sorted(r) if isinstance(r, dict) else type(r).__name__}")
        if r["chosen"].strip() == r["rejected"].strip():
            dropped += 1
            continue
        pairs.append(Example(text=format_prompt(r["instruction"], r.get("input") or ""), response=r["chosen"],
                             rejected=r["rejected"]))
    return pairs, dropped


def split_dialogue(text: str) -> tuple[str, str]:
    """HH-RLHF dialogue -> (everything up to and including the last ``\\n\\nAssistant:``, the final reply)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return "", ""
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]


def read_hh(path: Path) -> tuple[list[Example], int]:
    """HH-RLHF pairs (JSON Lines with ``chosen``/``rejected`` dialogues) and how many were dropped."""
    pairs, dropped = [], 0
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("chosen"), str) or not isinstance(r.get("rejected"), str):
                raise DataError(f"{path}:{line_no}: expected string fields chosen and rejected")
            prompt, chosen = split_dialogue(r["chosen"])
            other, rejected = split_dialogue(r["rejected"])
            if not prompt or prompt != other or chosen.strip() == rejected.strip():
                dropped += 1
                continue
            pairs.append(Example(text=prompt, response=chosen, rejected=rejected))
    return pairs, dropped


class Preference(Task):
    """DPO on (prompt, chosen, rejected) pairs, each stored as one entry with its prompt length (module docstring)."""

    name = "preference"
    kind = "preference"
    per_example = "prompt_lengths"
    default_max_length = 256
    source_names = tuple(SOURCES)
    primary_metric = "preference_accuracy"
    higher_is_better = True
    generates = True
    keeps_start_generations = True

    def __init__(self, config: TaskOptions, dpo: DPOConfig | None = None) -> None:
        super().__init__(config)
        self.dpo = dpo if dpo is not None else DPOConfig()

    @classmethod
    def for_trial(cls, config: TaskOptions, dpo: DPOConfig | None = None, **sections: Any) -> Preference:
        return cls(config, dpo)

    # --- data -----------------------------------------------------------------------------------------------------
    def sources(self) -> list[Source]:
        return [SOURCES[self.source]]

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        pairs, dropped = read_instruction(paths[0]) if self.source == "instruction" else read_hh(paths[0])
        self.dropped_identical = dropped
        train_share, val_share = SPLIT_SHARES[self.source]
        order = np.random.RandomState(123).permutation(len(pairs))
        n_train, n_val = int(len(pairs) * train_share), int(len(pairs) * val_share)
        return {"train": [pairs[i] for i in sorted(order[:n_train])],
                "validation": [pairs[i] for i in order[n_train : n_train + n_val]],
                "test": [pairs[i] for i in order[n_train + n_val :]]}

    def encode(self, example: Example, enc: tiktoken.Encoding) -> tuple[list[int], int] | None:
        prompt = enc.encode_ordinary(example.text)
        room = self.max_length - len(prompt) - 1
        if room < MIN_RESPONSE_TOKENS:
            return None
        chosen = enc.encode_ordinary(example.response)[:room]
        rejected = enc.encode_ordinary(example.rejected)[:room]
        if chosen == rejected:
            return None
        return prompt + chosen + [EOT_TOKEN_ID] + prompt + rejected + [EOT_TOKEN_ID], len(prompt)

    @staticmethod
    def boundary(ids: torch.Tensor, prompt_len: int) -> int:
        """Where the chosen sequence ends in a pair entry (just after its end token)."""
        eot = (ids[prompt_len:] == EOT_TOKEN_ID).nonzero()
        return prompt_len + int(eot[0]) + 1

    def collate(self, split: EncodedSplit, indices: Sequence[int]) -> Batch:
        seqs, prompts = [], []
        for i in indices:
            ids, p = split.ids(i), int(split.prompt_lengths[i])
            cut = self.boundary(ids, p)
            seqs.append((ids[:cut], ids[cut:]))
            prompts.append(p)
        input_ids, mask = pad_right([c for c, _ in seqs] + [r for _, r in seqs], EOT_TOKEN_ID)  # chosen, then rejected
        ref_logps = split.ref_logps[list(indices)] if split.ref_logps is not None else None
        return Batch(input_ids, mask, prompt_lengths=torch.tensor(prompts + prompts, dtype=torch.long),
                     ref_logps=ref_logps)

    def prompt_and_reference(self, split: EncodedSplit, i: int) -> tuple[torch.Tensor, list[int]]:
        ids, p = split.ids(i), int(split.prompt_lengths[i])
        return ids[:p], ids[p : self.boundary(ids, p) - 1].tolist()  # the chosen answer

    # --- the reference model --------------------------------------------------------------------------------------
    @staticmethod
    def sequence_logps(model: GPT2, batch: Batch) -> torch.Tensor:
        """Summed log-probability of each row's response tokens (prompt and padding masked), ``(2B,)``."""
        hidden, targets, scored = scored_hidden(model, batch, batch.prompt_lengths)  # (N, C), (N,), (2B, T-1)
        token_logp = token_logps(model, hidden, targets)  # (N,)
        rows = scored.nonzero()[:, 0]  # the row of each scored token
        return torch.zeros(len(batch.input_ids), device=token_logp.device).index_add_(0, rows, token_logp)

    def reference_logps(self, model: GPT2, batch: Batch) -> torch.Tensor:
        """Reference log-probs ``(B, 2)`` (chosen, rejected) of a batch."""
        if batch.ref_logps is not None:
            return batch.ref_logps.float()
        with eval_mode(model), torch.no_grad(), disable_adapters(model):
            logps = self.sequence_logps(model, batch)
        return logps.view(2, -1).T

    def prepare(self, model: GPT2, splits: dict[str, EncodedSplit], device: torch.device, autocast: Any,
                batch_size: int) -> dict[str, Any]:
        if any(True for _ in adapter_layers(model)):
            return {"dpo_reference": "adapters_disabled"}
        with eval_mode(model), torch.no_grad():
            for split in splits.values():
                split.ref_logps = self._split_logps(model, split, device, autocast, batch_size)
        return {"dpo_reference": "precomputed"}

    def _split_logps(self, model: GPT2, split: EncodedSplit, device: torch.device, autocast: Any,
                     batch_size: int) -> torch.Tensor:
        """Log-probs ``(n, 2)`` (chosen, rejected) of every pair of a split, on the CPU."""
        out = torch.empty(len(split), 2)
        for start in range(0, len(split), batch_size):
            idx = list(range(start, min(start + batch_size, len(split))))
            with autocast:
                logps = self.sequence_logps(model, self.collate(split, idx).to(device))
            out[idx] = logps.view(2, -1).T.float().cpu()
        return out

    # --- loss and metrics -----------------------------------------------------------------------------------------
    def pair_terms(self, model: GPT2, batch: Batch) -> tuple[torch.Tensor, ...]:
        policy = self.sequence_logps(model, batch).view(2, -1)  # (2, B): chosen, rejected
        ref = self.reference_logps(model, batch).to(policy.device)  # (B, 2)
        loss, chosen_reward, rejected_reward = dpo_loss(policy[0], policy[1], ref[:, 0], ref[:, 1], self.dpo)
        return loss, chosen_reward, rejected_reward, policy.detach(), ref

    def loss(self, model: GPT2, head: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, int]:
        loss, *_ = self.pair_terms(model, batch)
        return loss.mean(), len(loss)

    @torch.no_grad()
    def evaluate(self, model: GPT2, head: nn.Module | None, batches: Iterator[Batch],
                 examples: ExampleResults | None = None) -> dict[str, float]:
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
            if examples is not None:  # label 0: the chosen answer; predicted when its reward is higher
                examples.label += [0] * len(loss)
                examples.prediction += (cr <= rr).long().tolist()
        return {k: v / max(n, 1) for k, v in sums.items()}
