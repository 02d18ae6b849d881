"""What the figures draw and the guide says about them: diverged learning rates off the metric axes, every metric axis
with its direction, the loss in the task's own unit, LoRA rank on a numeric axis, tied bests and edge-of-grid optima.

Figures are inspected as matplotlib objects: ``figures._save`` is replaced by a function that keeps the Figure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from analysis import figures
from analysis.db import connect
from analysis.guide import Group, across_tasks, collect, family_verdicts, lr_blocks
from tests.analysis import synthetic


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Figures by file stem, kept open instead of written (and closed after the test)."""
    found: dict[str, Any] = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: found.setdefault(path.stem, fig))
    yield found
    for fig in found.values():
        plt.close(fig)


def _lr_row(group: str, lr: float, val: float | None, test: float | None, diverged: int = 0,
            method: str = "full") -> dict[str, Any]:
    n = 3
    return {"task": "sms_spam", "group": group, "method": method, "lr": lr, "metric": "accuracy",
            "higher_is_better": True, "n_trials": n, "n_completed": n - diverged, "n_diverged": diverged,
            "n_other": 0, "val_mean": val, "test_mean": test, "test_sd": None if test is None else 0.01}


def _points(ax: Any) -> list[tuple[float, float]]:
    """Every data point an axis draws: line vertices, scatter offsets and error-bar segment ends."""
    out = [tuple(p) for line in ax.get_lines() for p in line.get_xydata()]
    for c in ax.collections:
        out += [tuple(p) for p in c.get_offsets()]
        out += [tuple(p) for seg in getattr(c, "get_segments", list)() for p in seg]
    return out


def _metric_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if "is better" in ax.get_ylabel() + ax.get_xlabel()]


def test_a_diverged_learning_rate_is_not_drawn_on_a_metric_axis(kept: dict[str, Any],
                                                                tmp_path: Path) -> None:
    rows = [_lr_row("full", 1e-4, 0.80, 0.82), _lr_row("full", 1e-3, 0.90, 0.91),
            _lr_row("full", 3e-2, None, None, diverged=3),  # every seed diverged: no metric value exists
            _lr_row("lora", 1e-3, 0.70, 0.71, method="lora"),
            _lr_row("lora", 1e-2, 0.75, 0.76, diverged=1, method="lora")]  # two seeds completed
    spec = {"kind": "lr", "file": "lr.png", "metric": "accuracy", "higher_is_better": True, "title": "t",
            "rows": rows}
    figures.render([spec], tmp_path)
    fig = kept["lr"]
    metric_axes = _metric_axes(fig)
    assert len(metric_axes) == 2  # validation and test
    for ax in metric_axes:
        xs = [x for x, _ in _points(ax)]
        assert not any(x == pytest.approx(3e-2) for x in xs), ax.get_ylabel()
    # the partly diverged learning rate sits at its completed seeds' mean, not at the axis' floor
    val_ax = next(ax for ax in metric_axes if ax.get_ylabel().startswith("validation"))
    assert {round(y, 6) for x, y in _points(val_ax) if x == pytest.approx(1e-2)} == {0.75}
    # the divergences are drawn in their own band, with their counts
    band = next(ax for ax in fig.axes if ax not in metric_axes)
    assert any(x == pytest.approx(3e-2) for x, _ in _points(band))
    texts = {t.get_text() for t in band.texts}
    assert "3/3 diverged" in texts and "1/3 diverged" in texts


@pytest.fixture(scope="module")
def alpaca_guide(tmp_path_factory: pytest.TempPathFactory) -> Any:
    db = synthetic.build(tmp_path_factory.mktemp("figures") / "study.duckdb", alpaca=True)
    return collect(connect(db, read_only=True))


def test_every_metric_axis_says_which_way_is_better(alpaca_guide: Any, kept: dict[str, Any],
                                                    tmp_path: Path) -> None:
    figures.render(alpaca_guide.figures, tmp_path)
    assert set(kept) == {Path(s["file"]).stem for s in alpaca_guide.figures}
    for name, fig in kept.items():
        labels = [label for ax in fig.axes for label in (ax.get_xlabel(), ax.get_ylabel())
                  if "accuracy" in label or "perplexity" in label]
        assert labels, name
        for label in labels:
            want = "lower is better" if "perplexity" in label else "higher is better"
            assert want in label, (name, label)


def test_training_loss_is_labelled_in_the_tasks_unit(alpaca_guide: Any, kept: dict[str, Any],
                                                     tmp_path: Path) -> None:
    figures.render([s for s in alpaca_guide.figures if s["kind"] == "dimension"], tmp_path)
    loss_labels = {name: {ax.get_ylabel() for ax in fig.axes if "training loss" in ax.get_ylabel()}
                   for name, fig in kept.items()}
    assert loss_labels["method_alpaca"] == {"training loss (nats/token)"}
    assert loss_labels["method_sms_spam"] == {"training loss (nats/example)"}


def _group(name: str, mean: float, params: float = 1e6, task: str = "sms_spam", method: str = "lora",
           dimension: str = "method") -> Group:
    values = [mean - 0.01, mean, mean + 0.01]
    return Group(task=task, dimension=dimension, group=name, method=method, lr=1e-3, metric="accuracy",
                 higher_is_better=True, n_trials=3, n_completed=3, n_diverged=0, n_other=0, val_mean=mean,
                 test_mean=mean, test_sd=0.01, test_values=values, test_seeds=[0, 1, 2], trainable_params=params,
                 total_params=1.24e8,
                 wall_seconds=10.0, train_seconds=8.0, tokens_per_s=100.0, peak_memory_mb=10.0,
                 memory_source="account")


def test_lora_rank_is_a_numeric_log2_axis(kept: dict[str, Any], tmp_path: Path) -> None:
    groups = [_group("r16", 0.8, 16e4, dimension="lora_rank"), _group("r1", 0.7, 1e4, dimension="lora_rank"),
              _group("r4", 0.75, 4e4, dimension="lora_rank")]
    assert figures.lora_ranks(groups) == {"r16": 16, "r1": 1, "r4": 4}
    assert figures.lora_ranks([_group("lora_r8", 0.8, 2e4), _group("rank2", 0.8, 1e4)]) == {"lora_r8": 8, "rank2": 2}
    assert figures.lora_ranks([_group("r8", 0.8, 1e4), _group("r2", 0.8, 2e4)]) is None  # parse contradicts params
    figures.render([{"kind": "dimension", "file": "rank.png", "dimension": "lora_rank", "title": "t",
                     "groups": groups, "curves": []}], tmp_path)
    left = kept["rank"].axes[0]
    assert left.get_xscale() == "log" and left.get_xlabel() == "LoRA rank (log2 axis)"
    assert sorted(left.get_xticks()) == [1, 4, 16]


def test_groups_tied_on_validation_are_all_marked_tied_best() -> None:
    # "zeta" sorts after "alpha" by name, and trains more parameters: neither may be singled out
    groups = [_group("zeta", 0.9, 2e6), _group("alpha", 0.9, 1e6), _group("worse", 0.5, 1e5)]
    block = across_tasks(groups, [], {("sms_spam", "method"): family_verdicts(groups)})
    cells = {row[0]: row[1] for row in block.table.rows}
    assert cells["zeta"].endswith("(tied best on validation)") and cells["alpha"].endswith("(tied best on validation)")
    assert cells["worse"].endswith("(worse)")
    assert not any(c.endswith(" (best on validation)") for c in cells.values())
    [sentence] = block.sentences
    assert "alpha and zeta tie for best on validation (alpha 0.900 ± 0.025; zeta 0.900 ± 0.025)" in sentence
    assert "is best" not in sentence


def test_a_best_learning_rate_at_the_grid_edge_says_the_optimum_may_lie_outside() -> None:
    rows = [_lr_row("interior", lr, v, v) for lr, v in ((1e-4, 0.7), (1e-3, 0.9), (1e-2, 0.8))]
    rows += [_lr_row("top", lr, v, v) for lr, v in ((1e-4, 0.7), (1e-3, 0.8), (1e-2, 0.9))]
    rows += [_lr_row("bottom", lr, v, v) for lr, v in ((1e-4, 0.9), (1e-3, 0.8))]
    [block] = lr_blocks(rows, [])
    said = "\n".join(block.sentences)
    notes = {row[0]: row[-1] for row in block.table.rows}
    assert "top on sms_spam: the best learning rate, 1e-2, is the highest one tried, so the optimum may lie outside " \
           "the grid (above 1e-2)" in said
    assert "bottom on sms_spam: the best learning rate, 1e-4, is the lowest one tried, so the optimum may lie " \
           "outside the grid (below 1e-4)" in said
    assert "interior on sms_spam: the best" not in said and "outside the grid" not in notes["interior"]
    assert notes["top"].endswith("best at the grid's highest learning rate (1e-2): the optimum may lie above the grid")
    assert "below the grid" in notes["bottom"]


def test_training_set_size_and_model_size_get_numeric_log_axes(kept: dict[str, Any], tmp_path: Path) -> None:
    sizes = [_group(f"{m}_n{n}", 0.7 + 0.01 * i, method=m, dimension="train_size")
             for i, (m, n) in enumerate([("full", "100"), ("full", "1000"), ("full", "all"), ("lora", "100"),
                                         ("lora", "1000")])]
    axis = figures.numeric_axis(sizes, "train_size")
    assert axis.x == {"full_n100": 100, "full_n1000": 1000, "full_nall": 3000, "lora_n100": 100, "lora_n1000": 1000}
    assert axis.series["full_nall"] == "full" and axis.series["lora_n100"] == "lora" and axis.ticks[3000] == "all"
    assert figures.numeric_axis([_group("a", 0.5), _group("b_n10", 0.5)], "x") is None  # not every name parses
    models = [_group("full_gpt2", 0.8, method="full", dimension="model_size"),
              _group("full_gpt2-medium", 0.85, method="full", dimension="model_size")]
    models[0].total_params, models[1].total_params = 124e6, 355e6
    models.append(_group("lora_gpt2-medium", 0.84, method="lora", dimension="model_size"))
    models[2].total_params = 355.8e6  # LoRA's adapters add a little: still the same model on the axis
    axis = figures.numeric_axis(models, "model_size")
    assert axis.x == {"full_gpt2": 124e6, "full_gpt2-medium": 355e6, "lora_gpt2-medium": 355e6}
    assert axis.ticks == {124e6: "124M", 355e6: "355M"} and axis.series["lora_gpt2-medium"] == "lora"
    batches = [_group(f"{m}_bs{b}", 0.8, method=m, dimension="batch_size") for m in ("full", "lora") for b in (8, 32)]
    axis = figures.numeric_axis(batches, "batch_size")
    assert axis.x["lora_bs32"] == 32 and axis.label.startswith("batch size") and axis.ticks == {8: "8", 32: "32"}
    figures.render([{"kind": "dimension", "file": "size.png", "dimension": "train_size", "title": "t",
                     "groups": sizes, "curves": []},
                    {"kind": "dimension", "file": "model.png", "dimension": "model_size", "title": "t",
                     "groups": models, "curves": []}], tmp_path)
    left = kept["size"].axes[0]
    assert left.get_xscale() == "log" and left.get_xlabel().startswith("training examples (log axis")
    assert sorted(t.get_text() for t in left.get_legend().get_texts()) == ["full", "lora"]
    assert kept["model"].axes[0].get_xlabel() == "model parameters (log axis)"


def test_learning_curves_mark_the_peak_and_draw_the_training_subset(kept: dict[str, Any], tmp_path: Path) -> None:
    g = _group("lora", 0.8)
    curves = [{"group": "lora", "split": "validation", "name": "accuracy", "step": s, "value": v}
              for s, v in ((10, 0.7), (20, 0.85), (30, 0.8))]
    curves += [{"group": "lora", "split": "train", "name": "accuracy", "step": s, "value": v}
               for s, v in ((10, 0.72), (20, 0.9), (30, 0.97))]
    curves += [{"group": "lora", "split": "train", "name": "loss", "step": s, "value": v} for s, v in ((10, 1.0),)]
    figures.render([{"kind": "dimension", "file": "curves.png", "dimension": "method", "title": "t",
                     "groups": [g], "curves": curves}], tmp_path)
    right = kept["curves"].axes[1]
    lines = {line.get_linestyle(): [tuple(p) for p in line.get_xydata()] for line in right.get_lines()}
    assert lines[":"] == [(10, 0.72), (20, 0.9), (30, 0.97)]  # the training subset, dotted
    [ring] = [c for c in right.collections if len(c.get_offsets()) == 1]
    assert tuple(ring.get_offsets()[0]) == (20, 0.85)  # where validation peaked
