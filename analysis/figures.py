"""The guide's figures (matplotlib, Agg): one colour per method everywhere, log axes where ranges span decades."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from analysis.guide import METHOD_COLOURS, OTHER_COLOUR, Group, metric_title, task_title

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
DPI = 110


def colour(method: str) -> str:
    return METHOD_COLOURS.get(method, OTHER_COLOUR)


def _styles(groups: Sequence[Group]) -> dict[str, tuple[str, str, str]]:
    """(colour, marker, linestyle) per group: the method's colour, then marker/line to tell same-method groups apart."""
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for g in groups:
        i = seen[g.method]
        seen[g.method] += 1
        out[g.group] = (colour(g.method), MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
    return out


def _spans_decades(values: Sequence[float]) -> bool:
    values = [v for v in values if v and v > 0]
    return len(values) > 1 and max(values) / min(values) >= 20


def _metric_axis(ax: Any, metric: str, higher_is_better: bool, values: Sequence[float]) -> None:
    ax.set_ylabel(f"{metric_title(metric)} ({'higher' if higher_is_better else 'lower'} is better)")
    if metric == "perplexity" and _spans_decades(values):
        ax.set_yscale("log")
    elif metric != "perplexity":  # shares: an interval wider than [0, 1] is drawn cut at the bounds
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -0.02), min(high, 1.02))


def dimension_figure(fig_spec: dict[str, Any], path: Path) -> None:
    groups: list[Group] = fig_spec["groups"]
    styles = _styles(groups)
    metric = groups[0].metric
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    xs = range(len(groups))
    for x, g in zip(xs, groups, strict=True):
        c, m, _ = styles[g.group]
        if g.test_mean is None:
            continue
        left.errorbar([x], [g.test_mean], yerr=None if g.iv.half is None else [[g.iv.half], [g.iv.half]],
                      fmt=m, color=c, capsize=5, markersize=8, elinewidth=2)
        left.scatter([x] * len(g.test_values), g.test_values, color=c, alpha=0.35, s=14, zorder=3)
    left.set_xticks(list(xs), [g.group for g in groups], rotation=30, ha="right")
    _metric_axis(left, metric, groups[0].higher_is_better, [g.test_mean for g in groups if g.test_mean])
    left.set_title(f"test {metric_title(metric)}: mean ± 95% CI (dots: seeds)", fontsize=10)
    left.grid(axis="y", alpha=0.3)

    curves = fig_spec["curves"]
    loss_ax = None
    plotted = False
    for g in groups:
        c, m, ls = styles[g.group]
        val = sorted((r["step"], r["value"]) for r in curves if r["group"] == g.group and r["split"] == "validation")
        if val:
            right.plot([s for s, _ in val], [v for _, v in val], color=c, marker=m, linestyle=ls, markersize=4,
                       label=g.group)
            plotted = True
        loss = sorted((r["step"], r["value"]) for r in curves if r["group"] == g.group and r["split"] == "train")
        if loss:
            loss_ax = loss_ax or right.twinx()
            loss_ax.plot([s for s, _ in loss], [v for _, v in loss], color=c, linestyle="--", alpha=0.45,
                         linewidth=1)
    if plotted:
        right.set_xlabel("optimizer step")
        _metric_axis(right, metric, groups[0].higher_is_better, [r["value"] for r in curves if r["split"] == "validation"])
        right.set_title(f"validation {metric_title(metric)} (markers) and training loss (faint dashed)", fontsize=10)
        right.legend(fontsize=8, loc="best")
        right.grid(alpha=0.3)
        if loss_ax is not None:
            loss_ax.set_ylabel("training loss (nats/token)")
    else:
        right.text(0.5, 0.5, "no learning curves recorded", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    fig.suptitle(fig_spec["title"], fontsize=11)
    _save(fig, path)


def pareto_figure(fig_spec: dict[str, Any], path: Path) -> None:
    groups: list[Group] = fig_spec["groups"]
    metric = groups[0].metric
    axes_spec = (("trainable_params", "trainable parameters (log)", True),
                 ("train_seconds", "training time per trial, s (log)", True),
                 ("peak_memory_mb", "memory per trial, MB", False))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (attr, label, log) in zip(axes, axes_spec, strict=True):
        usable = [g for g in groups if getattr(g, attr)]
        if not usable:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(label)
            continue
        for g in usable:
            ax.scatter([getattr(g, attr)], [g.test_mean], color=colour(g.method), s=40, zorder=3,
                       edgecolor="black" if g.group in fig_spec["fronts"][attr] else "none")
            ax.annotate(g.group, (getattr(g, attr), g.test_mean), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        front = [g for name in fig_spec["fronts"][attr] for g in usable if g.group == name]
        if len(front) > 1:
            ax.step([getattr(g, attr) for g in front], [g.test_mean for g in front], where="post", color="black",
                    linewidth=1, alpha=0.6)
        if log and _spans_decades([getattr(g, attr) for g in usable]):
            ax.set_xscale("log")
        ax.set_xlabel(label.replace(" (log)", "") if not (log and ax.get_xscale() == "log") else label)
        ax.grid(alpha=0.3)
    _metric_axis(axes[0], metric, groups[0].higher_is_better, [g.test_mean for g in groups])
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour(m), label=m)
               for m in dict.fromkeys(g.method for g in groups)]
    axes[-1].legend(handles=handles, fontsize=8, title="method", loc="best")
    fig.suptitle(fig_spec["title"], fontsize=11)
    _save(fig, path)


def lr_figure(fig_spec: dict[str, Any], path: Path) -> None:
    rows = fig_spec["rows"]
    metric = fig_spec["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    seen: dict[str, int] = defaultdict(int)
    values = [r["val_mean"] for r in rows if r["val_mean"] is not None]
    floor = min(values) if values else 0
    for name, rs in by_group.items():
        method = rs[0]["method"]
        i = seen[method]
        seen[method] += 1
        rs = sorted(rs, key=lambda r: r["lr"])
        pts = [(r["lr"], r["val_mean"]) for r in rs if r["val_mean"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour(method), marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)], label=name)
        bad = [r["lr"] for r in rs if r["n_diverged"]]
        if bad:
            ax.scatter(bad, [floor] * len(bad), marker="x", color=colour(method), s=60, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log)")
    _metric_axis(ax, metric, fig_spec["higher_is_better"], values)
    ax.set_title(fig_spec["title"], fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def across_figure(fig_spec: dict[str, Any], path: Path) -> None:
    by_task: dict[str, list[Group]] = fig_spec["by_task"]
    names: list[str] = fig_spec["names"]
    fig, axes = plt.subplots(1, len(by_task), figsize=(max(4.0 * len(by_task), 6), 4.2), squeeze=False)
    for ax, (task, gs) in zip(axes[0], by_task.items(), strict=True):
        here = [n for n in names if any(g.group == n for g in gs)]  # each panel lists only its own groups
        for y, name in enumerate(here):
            g = next((g for g in gs if g.group == name), None)
            if g is None or g.test_mean is None:
                continue
            ax.errorbar([g.test_mean], [y], xerr=None if g.iv.half is None else [[g.iv.half], [g.iv.half]],
                        fmt="o", color=colour(g.method), capsize=4)
        ax.set_yticks(range(len(here)), here)
        ax.invert_yaxis()
        metric = gs[0].metric
        ax.set_xlabel(f"test {metric_title(metric)}")
        if metric == "perplexity" and _spans_decades([g.test_mean for g in gs if g.test_mean]):
            ax.set_xscale("log")
        ax.set_title(task_title(task), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(fig_spec["title"], fontsize=11)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


DRAW = {"dimension": dimension_figure, "pareto": pareto_figure, "lr": lr_figure, "across": across_figure}


def render(figure_specs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw every figure the guide refers to into ``out_dir`` (the guide's folder); returns the files written."""
    written = []
    for spec in figure_specs:
        path = out_dir / spec["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        DRAW[spec["kind"]](spec, path)
        written.append(path)
    return written

