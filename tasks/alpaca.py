"""Stanford Alpaca instruction tuning: the Alpaca prompt template, loss on the response tokens, held-out perplexity.

The 28 records whose output is empty (a known quirk of the release) are left out: trained on, they would teach the
model to answer a real instruction with nothing. Splits, fixed by seed 123 over the remaining 51,974 records:
validation 1,000, test 1,000, train the other 49,974 (49,973 at the default max_length: one prompt alone
exceeds 512 tokens). Each example
is prompt + response + ``<|endoftext|>``, truncated to ``task.max_length`` tokens (default 512); an example whose
prompt alone fills that length has nothing to learn from and is dropped. The first ``task.num_generations`` test
prompts are the fixed prompts whose greedy generations a trial keeps for the guide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.base import Example, LanguageModelingTask
from tasks.data import DataError, Source, read_json_list

SOURCE = Source(
    relpath="alpaca/alpaca_data.json.gz",
    url="https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json",
    sha256="2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419",
)
HELD_OUT = 1000

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt, with or without an input section."""
    if input_text.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def read_records(path: Path) -> list[Example]:
    records = read_json_list(path)
    examples = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("instruction", "output")):
            raise DataError(f"{path}: record {i}: expected string fields instruction, input, output; got "
                            f"{sorted(record) if isinstance(record, dict) else type(record).__name__}")
        if not record["output"].strip():
            continue  # see the module docstring
        examples.append(Example(text=format_prompt(record["instruction"], record.get("input") or ""),
                                response=record["output"]))
    return examples


class Alpaca(LanguageModelingTask):
    name = "alpaca"
    default_max_length = 512

    def sources(self) -> list[Source]:
        return [SOURCE]

    def read_splits(self, paths: list[Path]) -> dict[str, list[Example]]:
        records = read_records(paths[0])
        if len(records) <= 2 * HELD_OUT:
            raise DataError(f"{paths[0]}: {len(records)} records; need more than {2 * HELD_OUT} for held-out splits")
        order = np.random.RandomState(123).permutation(len(records))
        return {
            "validation": [records[i] for i in order[:HELD_OUT]],
            "test": [records[i] for i in order[HELD_OUT : 2 * HELD_OUT]],
            "train": [records[i] for i in sorted(order[2 * HELD_OUT :])],
        }
