"""sweeps/bench/step.py runs both sides on the same shapes and prints a ratio (timing itself is not asserted)."""

from __future__ import annotations

import re

import pytest

from sweeps.bench.step import main


def test_bench_smoke_prints_both_sides_and_a_ratio(capsys) -> None:
    assert main(["--smoke"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"(instruction|classification) ", line)]
    assert [r.split()[:2] for r in rows] == [["instruction", "full"], ["instruction", "lora"],
                                             ["classification", "full"], ["classification", "lora"]]
    for row in rows:
        assert re.search(r"[\d,]+\s+[\d,]+\s+\d+\.\d\dx", row), row


@pytest.mark.slow
def test_dpo_reference_bench_smoke_compares_both_strategies(capsys) -> None:
    from sweeps.bench.dpo import main as bench_dpo

    assert bench_dpo(["--smoke"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"(full|last_k) ", line)]
    assert [r[:2] for r in rows] == [["full", "1"], ["full", "2"], ["last_k", "1"], ["last_k", "2"]]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and r[4].endswith("x") for r in rows)


def test_trial_level_runs_the_trial_benchmark(real_data, capsys) -> None:
    assert main(["--level", "trial", "--smoke", "--methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert "Trainer" in out and re.search(r"^lora .*\dx", out, re.M)


@pytest.mark.slow
def test_variants_bench_smoke_prints_every_side_with_its_ratios_to_lora(capsys) -> None:
    from sweeps.bench.variants import main as bench_variants

    assert bench_variants(["--smoke", "--sides", "lora,dora,qlora,lora_ckpt,ia3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if re.match(r"(lora|dora|qlora|lora_ckpt|ia3) ", line)]
    assert [r[0] for r in rows] == ["lora", "dora", "qlora", "lora_ckpt", "ia3"]
    assert all(r[2] == "1.00x" for r in rows[:1]) and all(len(r) == 12 and r[2].endswith("x") for r in rows)
    adapted = {r[0]: float(r[6].rstrip("x")) for r in rows}  # the adapted projections' base weights, x lora
    assert adapted["qlora"] < 0.2 and adapted["dora"] == adapted["lora_ckpt"] == 1.0
    with pytest.raises(SystemExit):
        bench_variants(["--smoke", "--sides", "dora"])  # no plain LoRA to compare with


def test_adapters_bench_prints_every_kind_matching_peft(capsys) -> None:
    from sweeps.bench.adapters import main as bench_adapters

    assert bench_adapters([]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if re.match(r"(lora|dora|pissa|gaussian|rslora|ia3) ", line)]
    assert [r[0] for r in rows] == ["lora", "dora", "pissa", "gaussian", "rslora", "ia3"]
    for kind, ours, theirs, *deltas, moved in rows:
        assert ours == theirs, kind
        assert all(float(d) < 1e-4 for d in deltas) and float(moved) > 1e-2, (kind, deltas, moved)
