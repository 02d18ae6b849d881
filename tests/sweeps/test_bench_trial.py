"""sweeps/bench/trial.py runs a whole trial on both sides with the same work (timing itself is not asserted)."""

from __future__ import annotations

import re

import pytest

from sweeps.bench.trial import SMOKE, compare_trials, main


@pytest.mark.slow
def test_both_sides_train_the_same_examples_and_tokens(real_data) -> None:
    comparisons = compare_trials(SMOKE, ("full", "lora"), rounds=1, device="cpu", warmup=False)
    assert [c.method for c in comparisons] == ["full", "lora"]
    for c in comparisons:
        assert c.ours.examples == c.trainer.examples == SMOKE.train_examples
        assert c.ours.real_tokens == c.trainer.real_tokens > 0
        assert c.ours.real_tokens <= c.ours.padded_tokens and c.trainer.real_tokens <= c.trainer.padded_tokens
        assert 0 < c.ours.train_seconds <= c.ours.wall_seconds and 0 < c.trainer.train_seconds <= c.trainer.wall_seconds
        assert c.throughput_ratio > 0 and c.wall_ratio > 0


def test_smoke_cli_prints_a_row_per_method_with_ratios(real_data, capsys) -> None:
    assert main(["--smoke", "--methods", "lora"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"(full|lora) ", line)]
    assert [r[0] for r in rows] == ["lora"]
    assert rows[0][3].endswith("x") and rows[0][8].endswith("x")
    assert rows[0][9] == str(SMOKE.train_examples)
