"""sweeps/bench.py runs both sides on the same shapes and prints a ratio (timing itself is not asserted)."""

from __future__ import annotations

import re

from sweeps.bench import main


def test_bench_smoke_prints_both_sides_and_a_ratio(capsys) -> None:
    assert main(["--smoke"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"(instruction|classification) ", line)]
    assert [r.split()[:2] for r in rows] == [["instruction", "full"], ["instruction", "lora"],
                                             ["classification", "full"], ["classification", "lora"]]
    for row in rows:
        assert re.search(r"[\d,]+\s+[\d,]+\s+\d+\.\d\dx", row), row
