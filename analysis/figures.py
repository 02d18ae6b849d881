"""The guide's figures (matplotlib, Agg): one colour per method everywhere, log axes where ranges span decades.

Every figure fits the HTML page's text column (at most ``PAGE_INCHES`` wide at ``DPI``), so it is read at its own
resolution, and every metric axis says which way is better."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from analysis.guide import METHOD_COLOURS, OTHER_COLOUR, Group, fmt_count, metric_title, task_title

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
DPI = 110
PAGE_INCHES = 10.3  # report_templates/guide.html.j2: body max-width 1180px less its padding, at DPI
# What one training-loss value averages over, by what a training example is for the task (see analysis/guide/summary.py section).
LOSS_UNITS = {"token": "nats/token", "example": "nats/example", "pair": "DPO, per pair"}
# A LoRA-rank group's rank, from its study name (r8, lora_r8, rank8): the guide's rows do not carry lora_rank.
RANK_NAME = re.compile(r"(?:^|[^a-z0-9])r(?:ank)?[_=-]?(\d+)$", re.IGNORECASE)


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


def direction(higher_is_better: bool | None) -> str:
    """The words every metric axis carries, so no reader has to know which way perplexity goes."""
    return f"{'higher' if higher_is_better else 'lower'} is better"


def _metric_axis(ax: Any, metric: str, higher_is_better: bool, values: Sequence[float], axis: str = "y",
                 prefix: str = "", sep: str = " ") -> None:
    """Label a metric axis with its direction; log for perplexity spanning decades; shares clipped near [0, 1]."""
    label = f"{prefix}{metric_title(metric)}{sep}({direction(higher_is_better)})"
    set_label, set_scale, get_lim, set_lim = ((ax.set_ylabel, ax.set_yscale, ax.get_ylim, ax.set_ylim) if axis == "y"
                                              else (ax.set_xlabel, ax.set_xscale, ax.get_xlim, ax.set_xlim))
    set_label(label)
    if metric == "perplexity" and _spans_decades(values):
        set_scale("log")
    elif metric != "perplexity":  # shares: an interval wider than [0, 1] is drawn cut at the bounds
        low, high = get_lim()
        set_lim(max(low, -0.02), min(high, 1.02))


def lora_ranks(groups: Sequence[Group]) -> dict[str, int] | None:
    """Each group's LoRA rank parsed from its name, or None (categories are drawn instead) unless every name parses,
    the ranks are distinct, and they order the groups as their trainable parameters do (a check on the parse)."""
    found = {g.group: RANK_NAME.search(g.group) for g in groups}
    if not groups or not all(found.values()):
        return None
    ranks = {name: int(m.group(1)) for name, m in found.items()}
    if len(set(ranks.values())) != len(ranks) or min(ranks.values()) < 1:
        return None
    params = [g.trainable_params for g in sorted(groups, key=lambda g: ranks[g.group])]
    if all(params) and any(a >= b for a, b in pairwise(params)):
        return None
    return ranks


# Groups named <series>_n<examples> (training-set size; "all": the whole split) or <series>_bs<batch size>: the number
# is the x position, the part before it the line the group belongs to.
NAMED_AXES = ((re.compile(r"(?:^|_)n(\d+|all)$", re.IGNORECASE),
               "training examples (log axis; 'all' = the whole training split)"),
              (re.compile(r"(?:^|_)bs(\d+)$", re.IGNORECASE), "batch size, examples per step (log axis)"))
MODEL_SIZE_RATIO = 1.5  # groups whose models differ at least this much in parameters are drawn by model size


@dataclass(frozen=True)
class NumericAxis:
    """Where a dimension's groups sit on a numeric x axis, and which line (series) each belongs to."""

    x: dict[str, float]
    ticks: dict[float, str]
    label: str
    series: dict[str, str]
    base: int = 10


def _named_axis(groups: Sequence[Group]) -> NumericAxis | None:
    """x from the groups' names (``lora_n300``, ``full_bs32``) when every name carries the same kind of number."""
    for pattern, label in NAMED_AXES:
        found = {g.group: pattern.search(g.group) for g in groups}
        if not groups or not all(found.values()):
            continue
        numbers = [int(m.group(1)) for m in found.values() if m.group(1).isdigit()]
        if not numbers:
            return None
        every = 3.0 * max(numbers)  # "all": the whole training split, drawn past the largest subset
        x = {name: float(m.group(1)) if m.group(1).isdigit() else every for name, m in found.items()}
        ticks = {v: ("all" if v == every and any(not m.group(1).isdigit() for m in found.values()) else f"{v:,.0f}")
                 for v in x.values()}
        series = {name: name[:m.start()].rstrip("_") or "all groups" for name, m in found.items()}
        return NumericAxis(x, ticks, label, series)
    return None


def _model_axis(groups: Sequence[Group]) -> NumericAxis | None:
    """x = the model's parameter count when the groups' models differ in size (sizes within 10% are one model:
    LoRA's adapters add a little)."""
    totals = [g.total_params for g in groups]
    if len(groups) < 2 or not all(totals) or max(totals) / min(totals) < MODEL_SIZE_RATIO:
        return None
    sizes: list[float] = []
    for v in sorted(totals):
        if not sizes or v > 1.1 * sizes[-1]:
            sizes.append(float(v))
    x = {g.group: max(size for size in sizes if size <= g.total_params) for g in groups}
    return NumericAxis(x, {v: fmt_count(v) for v in sizes}, "model parameters (log axis)",
                       {g.group: g.method for g in groups})


def numeric_axis(groups: Sequence[Group], dimension: str | None) -> NumericAxis | None:
    """LoRA rank on a log2 axis, training-set size or model size on a log axis; None: the groups are categories."""
    ranks = lora_ranks(groups) if dimension == "lora_rank" else None
    if ranks is not None:
        x = {name: float(r) for name, r in ranks.items()}
        return NumericAxis(x, {v: f"{v:.0f}" for v in x.values()}, "LoRA rank (log2 axis)",
                           {g.group: "rank" for g in groups}, base=2)
    return _named_axis(groups) or _model_axis(groups)


def _group_positions(left: Any, groups: Sequence[Group], fig_spec: dict[str, Any]) -> list[float]:
    """x of each group on the left panel: a numeric axis where the groups have one (rank, data size, model size),
    else its index."""
    axis = numeric_axis(groups, fig_spec.get("dimension"))
    if axis is None:
        left.set_xticks(range(len(groups)), [g.group for g in groups], rotation=30, ha="right")
        return list(range(len(groups)))
    xs = [axis.x[g.group] for g in groups]
    left.set_xscale("log", base=axis.base)
    left.set_xticks(sorted(axis.ticks), [axis.ticks[v] for v in sorted(axis.ticks)])
    left.minorticks_off()
    left.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    left.set_xlabel(axis.label)
    return xs


def _seed_panel(left: Any, fig_spec: dict[str, Any], styles: dict[str, tuple[str, str, str]]) -> None:
    """Left panel: each group's test mean with its 95% interval (seeds and test examples), and the seeds as faint dots;
    on a numeric axis, a line per series (e.g. per method across training-set sizes)."""
    groups: list[Group] = fig_spec["groups"]
    xs = _group_positions(left, groups, fig_spec)
    for x, g in zip(xs, groups, strict=True):
        c, m, _ = styles[g.group]
        if g.test_mean is None:
            continue
        left.errorbar([x], [g.test_mean], yerr=None if g.iv.half is None else [[g.iv.half], [g.iv.half]],
                      fmt=m, color=c, capsize=5, markersize=8, elinewidth=2)
        left.scatter([x] * len(g.test_values), g.test_values, color=c, alpha=0.35, s=14, zorder=3)
    axis = numeric_axis(groups, fig_spec.get("dimension"))
    if axis is not None:
        lines: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for x, g in zip(xs, groups, strict=True):
            if g.test_mean is not None:
                lines[axis.series[g.group]].append((x, g.test_mean, styles[g.group][0]))
        for name, points in lines.items():
            points.sort()
            left.plot([p[0] for p in points], [p[1] for p in points], color=points[0][2], alpha=0.5, lw=1.2,
                      label=name if len(lines) > 1 else None)
        if len(lines) > 1:
            left.legend(fontsize=8, loc="best")
    metric = groups[0].metric
    _metric_axis(left, metric, groups[0].higher_is_better, [g.test_mean for g in groups if g.test_mean])
    left.set_title(f"test {metric_title(metric)}: mean ± 95% CI (dots: seeds)", fontsize=10)
    left.grid(axis="y", alpha=0.3)


def _curve_panel(right: Any, fig_spec: dict[str, Any], styles: dict[str, tuple[str, str, str]]) -> None:
    """Right panel: validation metric by step (left axis) and training loss in the task's own unit (right axis)."""
    groups: list[Group] = fig_spec["groups"]
    curves = fig_spec["curves"]
    loss_ax = None
    plotted = False
    for g in groups:
        c, m, ls = styles[g.group]
        val = sorted((r["step"], r["value"]) for r in curves if r["group"] == g.group and r["split"] == "validation")
        if val:
            right.plot([s for s, _ in val], [v for _, v in val], color=c, marker=m, linestyle=ls, markersize=4,
                       label=g.group)
            peak = (max if g.higher_is_better else min)(val, key=lambda sv: sv[1])  # where validation stopped improving
            right.scatter([peak[0]], [peak[1]], s=110, facecolors="none", edgecolors=c, linewidths=1.5, zorder=4)
            plotted = True
        on_train = sorted((r["step"], r["value"]) for r in curves
                          if r["group"] == g.group and r["split"] == "train" and r["name"] == g.metric)
        if on_train:  # train.train_metrics: the same metric on training data; the gap to validation is over-fitting
            right.plot([s for s, _ in on_train], [v for _, v in on_train], color=c, linestyle=":", linewidth=1.2)
        loss = sorted((r["step"], r["value"]) for r in curves
                      if r["group"] == g.group and r["split"] == "train" and r["name"] == "loss")
        if loss:
            loss_ax = loss_ax or right.twinx()
            loss_ax.plot([s for s, _ in loss], [v for _, v in loss], color=c, linestyle="--", alpha=0.45,
                         linewidth=1)
    if not plotted:
        right.text(0.5, 0.5, "no learning curves recorded", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
        return
    metric = groups[0].metric
    right.set_xlabel("optimizer step")
    _metric_axis(right, metric, groups[0].higher_is_better, [r["value"] for r in curves if r["split"] == "validation"])
    right.set_title(f"validation {metric_title(metric)} (ring: its best; dotted: on training data), training loss "
                    "(dashed)", fontsize=9)
    right.legend(fontsize=8, loc="best")
    right.grid(alpha=0.3)
    if loss_ax is not None:
        loss_ax.set_ylabel(f"training loss ({LOSS_UNITS[fig_spec.get('loss_per', 'example')]})")


def dimension_figure(fig_spec: dict[str, Any], path: Path) -> None:
    styles = _styles(fig_spec["groups"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE_INCHES, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    _seed_panel(left, fig_spec, styles)
    _curve_panel(right, fig_spec, styles)
    fig.suptitle(fig_spec["title"], fontsize=11)
    _save(fig, path)


def pareto_figure(fig_spec: dict[str, Any], path: Path) -> None:
    """Metric against three costs; each group's 95% interval as a vertical bar, the front as a staircase."""
    groups: list[Group] = fig_spec["groups"]
    metric = groups[0].metric
    axes_spec = (("trainable_params", "trainable parameters (log)", True),
                 ("train_seconds", "training time per trial, s (log)", True),
                 ("peak_memory_mb", "memory per trial, MB", False))
    fig, axes = plt.subplots(1, 3, figsize=(PAGE_INCHES, 4.0), sharey=True)
    for ax, (attr, label, log) in zip(axes, axes_spec, strict=True):
        usable = [g for g in groups if getattr(g, attr)]
        if not usable:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(label)
            continue
        for g in usable:
            x = getattr(g, attr)
            if g.iv.half is not None:
                ax.errorbar([x], [g.test_mean], yerr=[[g.iv.half], [g.iv.half]], fmt="none", ecolor=colour(g.method),
                            elinewidth=1.2, capsize=3, alpha=0.7, zorder=2)
            ax.scatter([x], [g.test_mean], color=colour(g.method), s=40, zorder=3,
                       edgecolor="black" if g.group in fig_spec["fronts"][attr] else "none")
            ax.annotate(g.group, (x, g.test_mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
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
    fig.suptitle(fig_spec["title"] + " (bars: 95% interval over seeds and test examples)", fontsize=11)
    _save(fig, path)


def _lr_by_group(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_group[r["group"]].append(r)
    return {name: sorted(rs, key=lambda r: r["lr"]) for name, rs in by_group.items()}


def _lr_style(rows_by_group: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[str, str, str]]:
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for name, rs in rows_by_group.items():
        i = seen[rs[0]["method"]]
        seen[rs[0]["method"]] += 1
        out[name] = (colour(rs[0]["method"]), MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
    return out


def _lr_metric_panel(ax: Any, by_group: dict[str, list[dict[str, Any]]], styles: dict[str, tuple[str, str, str]],
                     key: str) -> None:
    """One split's mean per learning rate. A learning rate where a seed diverged or failed is drawn hollow (the mean
    of its completed seeds; never eligible as best); one with no completed seed has no point here at all. On the
    test panel, bars are ±1 SD over the completed seeds (from test_sd; none with one seed)."""
    for name, rs in by_group.items():
        c, m, ls = styles[name]
        pts = [r for r in rs if r[key] is not None]
        ax.plot([r["lr"] for r in pts], [r[key] for r in pts], color=c, linestyle=ls, alpha=0.8)
        for r in pts:
            clean = not r["n_diverged"] and not r["n_other"]
            sd = r.get("test_sd") if key == "test_mean" and (r.get("n_completed") or 0) > 1 else None
            ax.errorbar([r["lr"]], [r[key]], yerr=None if sd is None else [[sd], [sd]], fmt=m, color=c, capsize=3,
                        markerfacecolor=c if clean else "white", markeredgecolor=c, markersize=6)


def _lr_band(band: Any, by_group: dict[str, list[dict[str, Any]]], styles: dict[str, tuple[str, str, str]]) -> None:
    """A band under the curves: where seeds diverged (x) or failed (hollow square), with how many of how many (the
    count is written towards the middle of the grid so it is never cut at the figure's edge)."""
    bad = [name for name, rs in by_group.items() if any(r["n_diverged"] or r["n_other"] for r in rs)]
    lrs = sorted(r["lr"] for rs in by_group.values() for r in rs)
    middle = math.sqrt(lrs[0] * lrs[-1]) if lrs and lrs[0] > 0 else 0
    for y, name in enumerate(bad):
        c = styles[name][0]
        for r in (r for r in by_group[name] if r["n_diverged"] or r["n_other"]):
            words = []
            if r["n_diverged"]:
                band.scatter([r["lr"]], [y], marker="x", s=50, color=c, zorder=3)
                words.append(f"{r['n_diverged']}/{r['n_trials']} diverged")
            if r["n_other"]:
                band.scatter([r["lr"]], [y], marker="s", s=60, facecolor="none", edgecolor=c, zorder=3)
                words.append(f"{r['n_other']}/{r['n_trials']} failed")
            right = r["lr"] <= middle
            band.annotate(", ".join(words), (r["lr"], y), fontsize=7, xytext=(7 if right else -7, 0),
                          textcoords="offset points", ha="left" if right else "right", va="center")
    if not bad:
        band.text(0.5, 0.5, "every seed completed at every learning rate", ha="center", va="center", fontsize=8,
                  transform=band.transAxes)
    band.set_yticks(range(len(bad)), bad, fontsize=7)
    band.set_ylim(-0.6, max(len(bad), 1) - 0.4)
    band.set_ylabel("not\ncompleted", fontsize=8)
    band.grid(axis="x", alpha=0.3)


def lr_figure(fig_spec: dict[str, Any], path: Path) -> None:
    """Validation (which chooses) and test (± SD over seeds) per learning rate, and a band for failed seeds."""
    rows = fig_spec["rows"]
    metric, hib = fig_spec["metric"], fig_spec["higher_is_better"]
    by_group = _lr_by_group(rows)
    styles = _lr_style(by_group)
    n_bad = sum(any(r["n_diverged"] or r["n_other"] for r in rs) for rs in by_group.values())
    fig, (val_ax, test_ax, band) = plt.subplots(3, 1, figsize=(7.5, 6.4 + 0.2 * n_bad), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 3, 0.6 + 0.25 * n_bad]})
    for ax, key, prefix in ((val_ax, "val_mean", "validation "), (test_ax, "test_mean", "test ")):
        _lr_metric_panel(ax, by_group, styles, key)
        _metric_axis(ax, metric, hib, [r[key] for r in rows if r[key] is not None], prefix=prefix, sep="\n")
        ax.grid(alpha=0.3)
    val_ax.set_title("validation: mean over completed seeds (chooses the best LR); hollow: some seeds did not "
                     "complete", fontsize=9)
    test_ax.set_title("test: mean ± 1 SD over completed seeds", fontsize=9)
    val_ax.legend(handles=[plt.Line2D([], [], color=c, marker=m, linestyle=ls, label=name)
                           for name, (c, m, ls) in styles.items()], fontsize=8)
    _lr_band(band, by_group, styles)
    band.set_xscale("log")
    band.set_xlabel("peak learning rate (log)")
    fig.suptitle(fig_spec["title"], fontsize=11)
    _save(fig, path)


def across_figure(fig_spec: dict[str, Any], path: Path) -> None:
    """One panel per task, two per row, so the figure keeps the page's width however many tasks there are."""
    by_task: dict[str, list[Group]] = fig_spec["by_task"]
    names: list[str] = fig_spec["names"]
    ncols = 1 if len(by_task) == 1 else 2
    nrows = math.ceil(len(by_task) / ncols)
    tallest = max(sum(any(g.group == n for g in gs) for n in names) for gs in by_task.values())
    row_inches = 1.3 + 0.32 * tallest
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_INCHES if ncols == 2 else 6.0, 0.5 + row_inches * nrows),
                             squeeze=False)
    flat = list(axes.flat)
    for ax, (task, gs) in zip(flat, by_task.items(), strict=False):
        _across_panel(ax, task, gs, names)
    for ax in flat[len(by_task):]:
        ax.set_axis_off()
    fig.suptitle(fig_spec["title"] + ": test metric, mean ± 95% interval over seeds and test examples", fontsize=11)
    _save(fig, path)


def _across_panel(ax: Any, task: str, gs: Sequence[Group], names: Sequence[str]) -> None:
    here = [n for n in names if any(g.group == n for g in gs)]  # each panel lists only its own groups
    for y, name in enumerate(here):
        g = next(g for g in gs if g.group == name)
        if g.test_mean is None:
            continue
        ax.errorbar([g.test_mean], [y], xerr=None if g.iv.half is None else [[g.iv.half], [g.iv.half]],
                    fmt="o", color=colour(g.method), capsize=4)
    ax.set_yticks(range(len(here)), here, fontsize=8)
    ax.set_ylim(len(here) - 0.5, -0.5)
    metric = gs[0].metric
    ax.set_xlabel(f"test {metric_title(metric)} ({direction(gs[0].higher_is_better)})", fontsize=9)
    if metric == "perplexity" and _spans_decades([g.test_mean for g in gs if g.test_mean]):
        ax.set_xscale("log")
    ax.set_title(task_title(task), fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


DRAW = {"dimension": dimension_figure, "pareto": pareto_figure, "lr": lr_figure, "across": across_figure}


def render(figure_specs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw every figure the guide refers to into ``out_dir`` (the guide's folder); returns the files written."""
    written = []
    root = Path(out_dir).resolve()
    for spec in figure_specs:
        path = out_dir / spec["file"]
        if not path.resolve().is_relative_to(root):  # analysis.guide.records.figure_file never makes one; a hand-made spec might
            raise ValueError(f"figure file {spec['file']!r} lies outside {out_dir}; not drawn")
        path.parent.mkdir(parents=True, exist_ok=True)
        DRAW[spec["kind"]](spec, path)
        written.append(path)
    return written
