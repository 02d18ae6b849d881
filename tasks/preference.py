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
``prompt + rejected + <|endoftext|>``, with the prompt length as its label; responses never contain
``<|endoftext|>``, so the first one after the prompt marks where the chosen sequence ends. Responses are cut so each
sequence fits ``task.max_length`` (default 256) with its end token; a pair whose prompt leaves fewer than 8 response
tokens is dropped, as is one whose two responses become identical once cut.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import tiktoken

from model.tokenizer import EOT_TOKEN_ID
from tasks.alpaca import format_prompt
from tasks.base import Example, PreferenceTask
from tasks.data import DataError, Source, open_text, read_json_list

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


class Preference(PreferenceTask):
    name = "preference"
    default_max_length = 256
    source_names: ClassVar[tuple[str, ...]] = tuple(SOURCES)

    @property
    def source(self) -> str:
        return self.config.source or "instruction"

    def cache_options(self) -> dict:
        return {**super().cache_options(), "source": self.source}

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
