"""The guide from a database with planted effects: exactly the planted conclusions, and numbers equal to SQL."""

from __future__ import annotations

import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from scipy import stats

from analysis import queries
from analysis.build_guide import build, main
from analysis.db import connect
from analysis.guide import collect
from tests.analysis import synthetic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("guide")
    db = synthetic.build(tmp / "study.duckdb")
    out = tmp / "reports"
    build(db, out)
    return db, out


def test_states_exactly_the_planted_conclusions(planted: tuple[Path, Path]) -> None:
    db, out = planted
    con = connect(db, read_only=True)
    guide = collect(con)
    assert {f.key for f in guide.findings} == synthetic.EXPECTED
    md = (out / "guide.md").read_text()
    assert guide.unfinished == [] and "Unfinished sweep" not in md  # a finished sweep: no partial banner
    for f in guide.findings:
        if f.kind != "single_seed":
            assert f.text in md
    # the sentences themselves say it, with their numbers
    assert ("full beats lora on sms_spam by 15.0 accuracy points (full − lora = +15.0 points, 95% CI +13.6 to "
            "+16.4; paired over 3 seeds and 4,000 test examples; Holm-adjusted p < 0.001 over 1 comparison)") in md
    assert "full and lora are equivalent on imdb within ±1 accuracy point: the whole interval lies inside it" in md
    assert "take lora when memory or checkpoint size matters" in md
    assert ("Inconclusive on imdb between full and bitfit (full − bitfit = +1.3 points, 95% CI −3.9 to +6.5; "
            "paired over 3 seeds and 4,000 test examples; Holm-adjusted p = 1 over 3 comparisons). With 3 seeds the "
            "smallest difference this study can detect is about 10.5 points; about 32 seeds would settle") in md
    assert "No conclusion on nli: full 0.600 (1 seed), lora 0.500 (1 seed). With a single seed no interval" in md
    assert "full at learning rate 1e-3 diverged in 1 of 3 seeds" in md
    # and nothing else is claimed (each appears in Recommendations and again in its dimension's section)
    claims = md.split("## Recommendations")[1].split("## Pareto")[0]  # recommendations, across tasks, sections
    assert {ln for ln in claims.splitlines() if " beats " in ln} == {
        next(f.text for f in guide.findings if f.kind == "beats").join(["- ", ""]),
        "- Classification (sms_spam): full is best on validation (test 0.960 ± 0.026); full beats lora."}
    assert {ln for ln in md.splitlines() if "are equivalent on" in ln} == {
        next(f.text for f in guide.findings if f.kind == "equivalent").join(["- ", ""])}
    assert "± 0.000" not in md and "Random-init" not in md
    # the data a task actually read is labelled at the top (NLI fell back to SICK)
    assert ("Data: nli read **sick** in 2 trials (configured: None; all_nli_med unavailable)."
            in md.split("## What to use")[0])


def test_groups_tied_on_validation_are_both_references(planted: tuple[Path, Path]) -> None:
    _db, out = planted
    md = (out / "guide.md").read_text()
    table = {row[0]: row[4] for row in _table(md, "IMDB reviews (sentiment)")}
    assert table["full"] == table["lora"] == "tied best on validation"
    assert table["bitfit"].startswith("vs full: inconclusive: −1.3 points") and "; vs lora: inconclusive:" in \
        table["bitfit"]
    assert "(best)" not in md


def test_best_learning_rate_is_chosen_on_validation_and_never_a_diverged_one(planted: tuple[Path, Path]) -> None:
    db, _ = planted
    con = connect(db, read_only=True)
    queries.select_sweeps(con, [synthetic.SWEEP])
    best = {(r["task"], r["group"]): r["lr"] for r in queries.records(con, queries.BEST, {"dimension": "method"})}
    # 1e-4 has the better test score and 1e-3 the best validation, but 1e-3 diverged once: 5e-5 it is
    assert best[("sms_spam", "full")] == pytest.approx(5e-5)
    assert best[("imdb", "lora")] == pytest.approx(5e-4)  # 1e-3 only failed


def _table(md: str, task_title: str) -> list[list[str]]:
    part = md.split("## Summary")[1].split("## Recommendations")[0].split(f"### {task_title}")[1].split("###")[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def _mean_interval(seed_values: list[float], example_means: list[float], pseudo: tuple[float, float]
                   ) -> tuple[float, float]:
    """Mean and 95% half-width over seeds and test examples, written out from the formulas in How to read:
    var = s²(seeds)/n + s²(examples, with two pseudo-examples)/N, t quantile at n - 1 degrees of freedom."""
    n, big_n = len(seed_values), len(example_means)
    seed_part = statistics.variance(seed_values) / n
    example_part = statistics.variance([*example_means, *pseudo]) / big_n
    return statistics.fmean(seed_values), stats.t.ppf(0.975, n - 1) * math.sqrt(seed_part + example_part)


def _chosen_lr(con: duckdb.DuckDBPyConnection, task: str, group: str) -> float:
    """The learning rate: best mean validation accuracy among LRs where no seed diverged or failed."""
    lr_rows = con.execute("""
        SELECT optim_lr, avg(val_primary) FILTER (WHERE status = 'completed') AS val,
               count(*) FILTER (WHERE status <> 'completed') AS bad
        FROM trials WHERE task = ? AND "group" = ? GROUP BY optim_lr
        HAVING count(*) FILTER (WHERE status = 'completed') > 0""", [task, group]).fetchall()
    return sorted(lr_rows, key=lambda r: (r[2], -r[1]))[0][0]


PAIRED_SQL = """
-- per seed and example: group A's outcome minus group B's, each at its chosen learning rate
SELECT ta.seed, pa.example, CAST(pa.correct AS INTEGER) - CAST(pb.correct AS INTEGER) AS diff
FROM trials ta JOIN predictions pa ON pa.trial_id = ta.id AND pa.split = 'test'
JOIN trials tb ON tb.task = ta.task AND tb.seed = ta.seed AND tb."group" = $b AND tb.optim_lr = $lr_b
JOIN predictions pb ON pb.trial_id = tb.id AND pb.split = 'test' AND pb.example = pa.example
WHERE ta.task = $task AND ta."group" = $a AND ta.optim_lr = $lr_a AND ta.status = 'completed'
  AND tb.status = 'completed'
"""


def _paired(con: duckdb.DuckDBPyConnection, task: str, a: str, b: str) -> tuple[float, float, float]:
    """A minus B in accuracy points: mean and 95% interval, from the predictions table by hand."""
    params = {"task": task, "a": a, "b": b, "lr_a": _chosen_lr(con, task, a), "lr_b": _chosen_lr(con, task, b)}
    per_seed = [r[0] for r in con.execute(f"SELECT avg(diff) FROM ({PAIRED_SQL}) GROUP BY seed ORDER BY seed",
                                          params).fetchall()]
    per_example = [r[0] for r in con.execute(f"SELECT avg(diff) FROM ({PAIRED_SQL}) GROUP BY example",
                                             params).fetchall()]
    mean, half = _mean_interval(per_seed, per_example, (-1.0, 1.0))
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


def test_every_summary_number_equals_a_direct_query(planted: tuple[Path, Path]) -> None:
    db, out = planted
    md = (out / "guide.md").read_text()
    con = duckdb.connect(str(db), read_only=True)
    titles = {"sms_spam": "SMS spam (classification)", "imdb": "IMDB reviews (sentiment)",
              "nli": "Natural-language inference (3-class)"}
    references = {"sms_spam": ["full"], "imdb": ["full", "lora"], "nli": ["full"]}
    checked = compared = 0
    for task, title in titles.items():
        rows = _table(md, title)
        step0, majority = rows.pop(), rows.pop()  # the baselines close each table: majority class, then step 0
        assert majority[:4] == ["majority class", "baseline", "–", "0.500"]
        mean0, seeds0 = con.execute("""SELECT avg(baseline_step0), count(DISTINCT seed) FROM trials
                                       WHERE task = ? AND status = 'completed'""", [task]).fetchone()
        assert step0[:4] == ["before training (step 0)", "baseline", "–",
                             f"{mean0:.3f} (mean of {seeds0} seed{'s' if seeds0 > 1 else ''})"]
        for group, method, lr, shown, versus, seeds, trainable, share, wall, tps, mem in rows:
            want_lr = _chosen_lr(con, task, group)
            assert float(lr) == pytest.approx(want_lr)
            values = [r[0] for r in con.execute("""
                SELECT test_accuracy FROM trials WHERE task = ? AND "group" = ? AND optim_lr = ?
                AND status = 'completed' ORDER BY seed""", [task, group, want_lr]).fetchall()]
            example_means = [r[0] for r in con.execute("""
                SELECT avg(CAST(p.correct AS INTEGER)) FROM trials t JOIN predictions p ON p.trial_id = t.id
                WHERE t.task = ? AND t."group" = ? AND t.optim_lr = ? AND t.status = 'completed'
                  AND p.split = 'test' GROUP BY p.example""", [task, group, want_lr]).fetchall()]
            n, params, total, wall_s, rate, peak = con.execute("""
                SELECT count(*), avg(trainable_params), avg(total_params), avg(train_seconds), avg(tokens_per_s),
                       avg(peak_memory_mb)
                FROM trials WHERE task = ? AND "group" = ? AND optim_lr = ? AND status = 'completed'""",
                [task, group, want_lr]).fetchone()
            if n > 1:
                mean, half = _mean_interval(values, example_means, (0.0, 1.0))
                assert shown == f"{mean:.3f} ± {half:.3f}"
            else:
                assert shown == f"{values[0]:.3f} (1 seed)"
            for ref in references[task]:
                if group in references[task] or n < 2:
                    continue
                diff, lo, hi = _paired(con, task, group, ref)
                prefix = f"vs {ref}: " if len(references[task]) > 1 else ""
                cell = re.search(re.escape(prefix) + r"\w+: (\S+) points \((\S+) to (\S+)\)", versus)
                assert cell, versus
                assert [float(x.replace("−", "-")) for x in cell.groups()] == pytest.approx([diff, lo, hi], abs=0.051)
                compared += 1
            assert int(seeds) == n and method == group
            assert trainable == f"{params / 1e6:.3g}M" if params >= 1e6 else trainable == f"{params / 1e3:.3g}K"
            assert share == (f"{100 * params / total:.0f}%" if params / total >= 0.1
                             else f"{100 * params / total:.3g}%")
            assert wall == f"{wall_s:.1f} s" and tps == f"{rate:,.0f}" and mem == f"{peak:,.0f} MB (account)"
            checked += 1
    assert checked == 7 and compared == 3


def test_reproduce_lists_the_sweep_and_every_trial_that_did_not_complete(planted: tuple[Path, Path]) -> None:
    _, out = planted
    md = (out / "guide.md").read_text()
    part = md.split("## Reproduce")[1]
    assert synthetic.SWEEP in part and "launch.py grid --study synthetic" in part and "0123456789abcdef" in part
    assert "torch 2.13.0" in part
    assert "### Trials that did not complete (2)" in part
    assert "| diverged | sms_spam | method | full | 1e-3 | 0 | 7 | sms_spam-full-0.001-0 | loss became nan at step 7 |" in part
    assert "| failed | imdb | method | lora | 1e-3 | 0 |" in part and "traceback" not in part


def test_figures_exist_for_every_reference_and_html_escapes(planted: tuple[Path, Path]) -> None:
    _, out = planted
    md, html = (out / "guide.md").read_text(), (out / "guide.html").read_text()
    refs = set(re.findall(r"\]\((figures/[^)]+\.png)\)", md))
    assert refs == set(re.findall(r'<img src="(figures/[^"]+\.png)"', html))
    assert refs and all((out / r).stat().st_size > 5000 for r in refs)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(Path(r).name for r in refs)
    assert "<script" not in html and "http://" not in html and "https://" not in html  # works offline


@pytest.mark.slow
def test_random_init_results_are_labelled_at_the_top(tmp_path: Path) -> None:
    db = synthetic.build(tmp_path / "random.duckdb", init="random")
    build(db, tmp_path / "out")
    md = (tmp_path / "out" / "guide.md").read_text()
    html = (tmp_path / "out" / "guide.html").read_text()
    head = md.split("## How to read")[0]
    assert "Random-init results" in head and "not findings about pretrained" in head
    assert 'class="banner"' in html.split("<h2")[0]


@pytest.mark.slow
def test_text_from_the_database_is_escaped_in_html(tmp_path: Path) -> None:
    plant = {("nli", "full", 5e-5, 0): ("failed", None, None), ("nli", "full", 5e-5, 1): ("completed", 0.5, 0.5)}
    db = synthetic.build(tmp_path / "x.duckdb", plant=plant)
    con = duckdb.connect(str(db))
    con.execute("UPDATE trials SET error = '<img src=x onerror=alert(1)> | pipe' WHERE status = 'failed'")
    con.close()
    build(db, tmp_path / "out")
    html = (tmp_path / "out" / "guide.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "\\| pipe" in (tmp_path / "out" / "guide.md").read_text()


def test_missing_database_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--db", str(tmp_path / "none.duckdb"), "--out", str(tmp_path / "out")]) == 2
    assert "none.duckdb: no such database" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_completed_trial_exits_2_and_keeps_the_previous_guide(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "guide.md").write_text("previous guide")
    db = synthetic.build(tmp_path / "x.duckdb", plant={("nli", "full", 5e-5, 0): ("failed", None, None)})
    assert main(["--db", str(db), "--out", str(out)]) == 2
    assert "no completed trials" in capsys.readouterr().err
    assert (out / "guide.md").read_text() == "previous guide" and sorted(p.name for p in out.iterdir()) == ["guide.md"]


def test_unknown_sweep_exits_2(planted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db, _ = planted
    assert main(["--db", str(db), "--out", str(tmp_path), "--sweep", "nope"]) == 2
    assert "no sweep nope" in capsys.readouterr().err


@pytest.mark.slow
def test_locked_database_exits_2_with_the_lock_message(planted: tuple[Path, Path], tmp_path: Path) -> None:
    db, _ = planted
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = subprocess.run([sys.executable, "analysis/build_guide.py", "--db", str(db), "--out", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 2, run.stderr
    assert "in use by another process" in run.stderr and not (tmp_path / "guide.md").exists()


def test_margin_option_changes_equivalence_and_bad_values_exit_2(planted: tuple[Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    db, _ = planted
    assert main(["--db", str(db), "--out", str(tmp_path / "bad"), "--margin=accuracy=-0.01"]) == 2
    assert "--margin 'accuracy=-0.01': expected METRIC=VALUE with a positive number" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # a margin of 0.1 point is narrower than the full/lora interval on imdb: no longer equivalent, but inconclusive
    guide = collect(connect(db, read_only=True), margins={"accuracy": 0.001})
    kinds = {(f.a, f.b): f.kind for f in guide.findings if f.task == "imdb"}
    assert kinds[("full", "lora")] == "inconclusive"
    assert any("±0.1 accuracy points" in line for line in guide.how_to_read)


def test_decision_table_has_exactly_the_planted_rows(planted: tuple[Path, Path]) -> None:
    """What to use, per task, follows from the verdicts alone: full where it beats lora; lora where the two tie on
    validation and are equivalent (lora is far cheaper); no conclusion from one seed; inconclusive where the planted
    difference is below what three seeds can detect."""
    _, out = planted
    md = (out / "guide.md").read_text()
    assert md.index("## What to use") < md.index("## How to read")  # the first thing a reader sees
    part = md.split("## What to use")[1].split("## How to read")[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")][2:]
    rows = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}
    summary = {(title, r[0]): r[3] for title in rows for r in _table(md, title)}
    assert set(rows) == {"SMS spam (classification)", "IMDB reviews (sentiment)",
                         "Natural-language inference (3-class)", "Preference pairs (DPO)"}
    sms, imdb, nli, pref = (rows[t] for t in ("SMS spam (classification)", "IMDB reviews (sentiment)",
                                              "Natural-language inference (3-class)", "Preference pairs (DPO)"))
    assert sms[1] == "full" and sms[7] == "best on validation; beats lora"
    assert sms[8] == "– (nothing cheaper is shown equivalent)"
    assert imdb[1] == "lora" and imdb[7].startswith("tied best on validation, equivalent; the cheapest of them")
    assert "equivalent to full" in imdb[7] and "inconclusive against bitfit (detectable: about " in imdb[7]
    assert imdb[2].startswith("LoRA r8, α 16; layers all;") and imdb[6] == "1.69 MB"  # 442,368 parameters × 4 bytes
    assert nli[1] == "full" and nli[7] == "no conclusion (single seed): best on validation; not compared (single " \
                                          "seed) with lora"
    assert pref[1] == "full" and pref[7].startswith("inconclusive: best on validation; inconclusive against lora "
                                                    "(detectable: about ")
    for title, row in rows.items():  # the expected metric is the summary's own number
        assert row[3] == summary[(title, row[1])]


def test_lora_to_full_learning_rate_ratio_is_measured_per_seed() -> None:
    from analysis.guide import lr_ratios

    def row(group: str, method: str, seed: int, lr: float, val: float) -> dict:
        return {"task": "sms_spam", "dimension": "method", "group": group, "method": method, "seed": seed, "lr": lr,
                "val": val, "higher_is_better": True}

    rows = [row("full", "full", 0, 1e-5, 0.8), row("full", "full", 0, 3e-5, 0.9), row("full", "full", 1, 1e-5, 0.9),
            row("full", "full", 1, 3e-5, 0.7), row("lora", "lora", 0, 1e-4, 0.5), row("lora", "lora", 0, 3e-4, 0.95),
            row("lora", "lora", 1, 1e-4, 0.9), row("lora", "lora", 1, 3e-4, 0.8),
            row("r8", "lora", 0, 1e-4, 0.9), row("r8", "lora", 0, 3e-4, 0.8)]  # another dimension: left out
    rows[-2]["dimension"] = rows[-1]["dimension"] = "lora_rank"
    [sentence] = lr_ratios(rows, {"sms_spam": "method"})["sms_spam"]
    # seed 0: 3e-4 / 3e-5 = 10; seed 1: 1e-4 / 1e-5 = 10
    assert sentence.startswith("On sms_spam, lora's best learning rate is 10× full's (geometric mean over 2 seeds; "
                               "per seed 10×, 10×)")


def test_the_decision_tables_settings_name_each_variant_and_memory_saver() -> None:
    """The settings cell reads the variant keys from the trials' flat configuration (as JSON text): DoRA, LoRA+'s ratio,
    PiSSA's start, NF4, bf16 frozen weights, checkpointing and 8-bit AdamW each say themselves; plain LoRA says none."""
    from analysis.guide.decisions import fmt_settings
    from analysis.guide.records import Group

    def group(method: str) -> Group:
        return Group("sms_spam", "lora_variant", "g", method, 5e-4, "accuracy", True, 1, 1, 0, 0, 0.9, 0.9, None,
                     [0.9], [0], 1.0, 10.0, 1.0, 1.0, 1.0, None, None)

    lora = {"lora_rank": 8, "lora_alpha": 16.0, "lora_layers": "all", "lora_targets": "all", "lora_dora": "false",
            "lora_init": "default", "lora_lr_ratio": "1.0", "model_quantize": "none", "model_frozen_dtype": "float32",
            "activation_checkpointing": "false", "optim_name": "adamw"}
    assert fmt_settings(group("lora"), lora) == "LoRA r8, α 16; layers all; targets all; LR 5e-4"
    everything = {**lora, "lora_dora": "true", "lora_init": "pissa", "lora_lr_ratio": "16", "model_quantize": "nf4",
                  "model_frozen_dtype": "bfloat16", "activation_checkpointing": "true", "optim_name": "adamw8bit"}
    assert fmt_settings(group("lora"), everything) == (
        "DoRA r8, α 16; layers all; targets all; LoRA+ (B at 16x the LR); pissa start; NF4 base weights (QLoRA); "
        "bf16 frozen weights; activation checkpointing; 8-bit AdamW; LR 5e-4")
    assert fmt_settings(group("ia3"), {"optim_name": "adamw"}) == "IA3; LR 5e-4"


def test_loras_variants_stand_among_the_methods_once() -> None:
    """The variants join their task's method family (summary, decision table, across tasks, Pareto fronts); the
    variants' plain-LoRA reference is the method dimension's own LoRA and joins once; other dimensions stay out, and a
    task without a method dimension takes none."""
    from analysis.guide.records import Group
    from analysis.guide.summary import join_main, joined_settings

    def group(dimension: str, name: str, method: str = "lora", task: str = "nli") -> Group:
        return Group(task, dimension, name, method, 5e-4, "accuracy", True, 1, 1, 0, 0, 0.9, 0.9, None, [0.9], [0],
                     1.0, 10.0, 1.0, 1.0, 1.0, None, None)

    groups = [group("method", "full", "full"), group("method", "lora"), group("lora_variant", "lora"),
              group("lora_variant", "dora"), group("lora_variant", "ia3", "ia3"), group("lora_rank", "r4"),
              group("dpo", "lora_b0.1", task="preference"), group("lora_variant", "dora", task="preference")]
    joined = join_main(groups, {"nli": "method", "preference": "dpo"})
    assert [(g.task, g.dimension, g.group) for g in joined] == [("nli", "method", "dora"), ("nli", "method", "ia3")]
    assert joined[0].iv == groups[3].iv  # the same measurements, only filed under another dimension
    settings = joined_settings({("nli", "lora_variant", "dora"): {"lora_dora": "true"}}, joined)
    assert settings[("nli", "method", "dora")] == {"lora_dora": "true"}
