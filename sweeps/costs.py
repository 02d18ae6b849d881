"""The cost model: what a planned trial costs in seconds (training, evaluation, setup), from the rates
completed trials measured, a GPU preflight's, or assumed FLOP/s; per dimension and in all."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import PRESETS, ConfigError, preset_name
from sweeps.config import TrialConfig
from sweeps.study import PlannedTrial, Study
from tasks import TASKS

# Documented training-split sizes and mean tokens per example at each task's default max_length (measured on the
# real data); the cost estimate only needs their order of magnitude.
TASK_SCALE = {"sms_spam": (1045, 25), "imdb": (22500, 203), "nli": (4439, 30), "alpaca": (49973, 112),
              "preference": (929, 250)}
# Validation and test split sizes (examples; preference: pairs) at each task's default source, the README's table.
EVAL_SCALE = {"sms_spam": (149, 300), "imdb": (2500, 25000), "nli": (495, 4906), "alpaca": (1000, 1000),
              "preference": (54, 111)}
# Sustained throughput assumed by the estimate, in FLOP/s: a 2-core CPU in float32 (measured with sweeps/bench/step.py:
# ~200 tokens/s for 124M, full fine-tuning) and a current datacenter GPU in bf16 at ~35% utilisation.
THROUGHPUT = {"cpu": 1.5e11, "gpu": 1.5e14}
# Seconds a trial spends before its first step, assumed: worker start, model load, the cached data, the method
# (a GPU adds CUDA's start). A trial's own setup_seconds, where measured, replace it.
SETUP_SECONDS = {"cpu": 10.0, "gpu": 30.0}
ASSUMED_RATES = (f"FLOP-based: 6·params per training token for full fine-tuning, 4· with frozen weights, +2· for "
                 f"DPO's reference; 2·params per evaluation token; {THROUGHPUT['gpu']:.1e} FLOP/s and "
                 f"{SETUP_SECONDS['gpu']:g} s of setup per trial on a current datacenter GPU, "
                 f"{THROUGHPUT['cpu']:.1e} and {SETUP_SECONDS['cpu']:g} s on a 2-core CPU (train.device=cpu)")

RateKey = tuple[str, Any, Any, str]


def estimate_steps(config: Mapping[str, Any]) -> int:
    """Optimizer steps of a trial: ``train.max_steps``, else epochs over the (capped) training split."""
    size, _ = TASK_SCALE[config["task.name"]]
    n = min(size, config["task.max_train_examples"] or size)
    batch = config["train.batch_size"] * config["train.grad_accum"]
    return config["train.max_steps"] or config["train.epochs"] * math.ceil(n / batch)


def _example_tokens(config: Mapping[str, Any]) -> int:
    mean_len = TASK_SCALE[config["task.name"]][1]
    return min(mean_len, config["task.max_length"] or mean_len)


def estimate_tokens(config: Mapping[str, Any]) -> int:
    """Training tokens of a trial (real tokens, no padding: what ``tokens_per_s`` is measured in)."""
    batch = config["train.batch_size"] * config["train.grad_accum"]
    return int(estimate_steps(config) * batch * _example_tokens(config))


def estimate_eval_tokens(config: Mapping[str, Any]) -> int:
    """Tokens the trial's evaluations read: the step-0 test baseline (``train.baseline_eval``), validation at the start
    (``train.eval_at_start``) and every ``train.eval_every`` steps before the last, the final validation and test, and
    kept generations (twice for a task that also keeps its starting weights', DPO). An evaluation of a big test split
    (IMDB's 25,000 reviews) can cost more than the training."""
    val, test = EVAL_SCALE[config["task.name"]]
    cap = config["task.max_eval_examples"]
    val, test = min(val, cap or val), min(test, cap or test)
    every = config["train.eval_every"]
    vals = 1 + bool(config["train.eval_at_start"]) + ((estimate_steps(config) - 1) // every if every else 0)
    tests = 1 + bool(config["train.baseline_eval"])
    task = TASKS[config["task.name"]]
    stages = (1 + task.keeps_start_generations) if task.generates else 0
    generated = stages * config["task.num_generations"] * config["train.max_new_tokens"]
    return (vals * val + tests * test) * _example_tokens(config) + generated


def shape_params(n_layer: int, n_embd: int) -> int:
    """Parameters the estimate counts for a GPT-2 shape: the blocks' matrices and the (tied) token embedding."""
    return 12 * n_layer * n_embd**2 + 50257 * n_embd


def estimate_params(config: Mapping[str, Any]) -> int:
    key = preset_name(str(config["model.name"])) or "gpt2"
    shape = {**PRESETS[key], **{k: config[f"model.{k}"] for k in ("n_layer", "n_embd") if config[f"model.{k}"]}}
    return shape_params(shape["n_layer"], shape["n_embd"])


def method_flops_factor(method: str) -> int:
    """Training FLOPs per token per parameter: 6 for full fine-tuning, 4 when the weights are frozen (no weight
    gradients): every other method, LoRA included."""
    return 6 if method == "full" else 4


def training_flops_per_token(config: Mapping[str, Any]) -> float:
    """≈ 6·params (full) or 4·params (frozen weights need no weight gradients), + 2·params for DPO's reference
    log-probs (one more forward pass: precomputed once, or the LoRA policy with its adapters off)."""
    factor = method_flops_factor(str(config["method.name"]))
    return (factor + 2 * (config["task.name"] == "preference")) * estimate_params(config)


def rate_key(config: Mapping[str, Any]) -> RateKey:
    """Trials that run at the same speed: same model (name and shape overrides) and method."""
    return (str(config["model.name"]), config["model.n_layer"], config["model.n_embd"], str(config["method.name"]))


def rate_label(key: RateKey) -> str:
    name, n_layer, n_embd, method = key
    shape = "".join(f" {k}={v}" for k, v in (("n_layer", n_layer), ("n_embd", n_embd)) if v)
    return f"{name}{shape}/{method}"


@dataclass(frozen=True)
class Rates:
    """How fast completed trials of one model and method ran (the dry run uses them instead of assumed FLOP/s)."""

    trials: int
    train_tokens_per_s: float
    eval_tokens_per_s: float | None
    setup_seconds: float | None
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrialCost:
    """Estimated seconds of one trial, by part; ``measured``: from the rates of completed trials, not assumed;
    ``preflight``: from a GPU preflight's measured rates (``sweeps/preflight.py``), not assumed; ``device``: what the
    seconds are of (gpu or cpu), so hours on a CPU are never called GPU-hours."""

    train_s: float
    eval_s: float
    setup_s: float
    measured: bool = False
    device: str = "gpu"
    preflight: bool = False

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s + self.setup_s


# Where ``sweeps/preflight.py`` writes its JSON report, and where the dry run looks for it (relative to the working
# directory, like the database).
PREFLIGHT_REPORT = Path("results/preflight/preflight.json")


@dataclass(frozen=True)
class PreflightRates:
    """What a preflight measured on one machine, for the cost estimate: effective training FLOP/s (measured tokens/s
    times ``method_flops_factor``·``shape_params``, so the estimate converts back with the same count) for full
    fine-tuning and for frozen-weight methods (measured on LoRA), setup seconds per trial, and how many more trials
    an hour k trials per GPU ran than one (``packing``). A rate the preflight could not measure is absent."""

    path: str
    device: str
    date: str
    cpu_mode: bool
    train_flops_per_s: dict[str, float]
    setup_seconds: float | None
    packing: dict[int, float]

    def train_flops(self, method: str) -> float | None:
        return self.train_flops_per_s.get("full" if method == "full" else "lora")


def _number(value: Any, where: str, problems: list[tuple[str, str]]) -> float | None:
    """A positive number, or None (not measured); anything else is a problem."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        problems.append((where, f"expected a positive number or null, got {value!r}"))
        return None
    return float(value)


def read_preflight(path: Path) -> PreflightRates:
    """The ``rates`` of a preflight JSON report; a ConfigError naming the file when it is unreadable or malformed."""
    try:
        rates = json.loads(Path(path).read_text())["rates"]
        if not isinstance(rates, dict):
            raise TypeError(f"'rates' is {type(rates).__name__}, not an object")
        flops, packing = rates.get("train_flops_per_s") or {}, rates.get("packing") or {}
        problems: list[tuple[str, str]] = []
        checked = {k: _number(v, f"rates.train_flops_per_s.{k}", problems) for k, v in flops.items()}
        speedups = {int(k): _number(v, f"rates.packing.{k}", problems) for k, v in packing.items()}
        result = PreflightRates(str(path), str(rates["device"]), str(rates["date"]), bool(rates.get("cpu_mode")),
                                {k: v for k, v in checked.items() if v is not None},
                                _number(rates.get("setup_seconds"), "rates.setup_seconds", problems),
                                {k: v for k, v in speedups.items() if v is not None})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise ConfigError([("--preflight", f"{path}: not a readable preflight report ({detail}); run python "
                                           "sweeps/preflight.py again")]) from None
    if problems:
        raise ConfigError([("--preflight", f"{path}: {where}: {message}") for where, message in problems],
                          "malformed preflight report")
    return result


def measured_rates(rows: Sequence[Mapping[str, Any]]) -> dict[RateKey, Rates]:
    """Rates per (model, method) from completed trials (``analysis.queries.measured_trials`` rows): training tokens/s
    over all their training seconds, evaluation tokens/s (tokens as ``estimate_eval_tokens`` counts them, so the
    estimate's own approximations cancel), and their mean setup seconds."""
    defaults = TrialConfig().to_flat()  # a trial recorded before a key existed ran with its default
    grouped: dict[RateKey, list[tuple[dict[str, Any], Mapping[str, Any]]]] = {}
    for row in rows:
        config = {**defaults, **(json.loads(row["config"]) if isinstance(row["config"], str) else row["config"])}
        if config["task.name"] in TASK_SCALE:
            grouped.setdefault(rate_key(config), []).append((config, row))
    rates = {}
    for key, items in grouped.items():
        evals = [(estimate_eval_tokens(c), r["eval_seconds"]) for c, r in items if (r["eval_seconds"] or 0) > 0]
        setups = [r["setup_seconds"] for _, r in items if r["setup_seconds"] is not None]
        train_tps = sum(r["tokens_seen"] for _, r in items) / sum(r["train_seconds"] for _, r in items)
        eval_tps = sum(t for t, _ in evals) / sum(s for _, s in evals) if evals else None
        rates[key] = Rates(len(items), train_tps, eval_tps, sum(setups) / len(setups) if setups else None,
                           tuple(sorted({str(r.get("device")) for _, r in items if r.get("device")})))
    return rates


def assumed_cost(config: Mapping[str, Any], device: str, preflight: PreflightRates | None = None) -> TrialCost:
    """FLOPs at ``THROUGHPUT[device]`` and ``SETUP_SECONDS[device]``; on a GPU, a preflight's measured FLOP/s and setup
    seconds instead where it has them (evaluation at its full fine-tuning rate: the same matrix products, forward)."""
    params, flops, setup = estimate_params(config), THROUGHPUT[device], SETUP_SECONDS[device]
    train_flops = eval_flops = flops
    used = preflight is not None and device == "gpu" and not preflight.cpu_mode
    if used:
        train_flops = preflight.train_flops(str(config["method.name"])) or flops
        eval_flops = preflight.train_flops("full") or flops
        setup = preflight.setup_seconds or setup
    return TrialCost(training_flops_per_token(config) * estimate_tokens(config) / train_flops,
                     2 * params * estimate_eval_tokens(config) / eval_flops, setup, device=device, preflight=used)


def trial_cost(config: Mapping[str, Any], device: str = "gpu", rates: Mapping[RateKey, Rates] | None = None,
               preflight: PreflightRates | None = None) -> TrialCost:
    """Seconds of training, evaluation and setup: at measured rates of the same model and method where ``rates`` has
    them, else as ``assumed_cost`` (a preflight's rates, or FLOPs at ``THROUGHPUT[device]``; a trial pinned to
    ``train.device=cpu`` at the CPU's)."""
    device = "cpu" if config["train.device"] == "cpu" else device
    assumed = assumed_cost(config, device, preflight)
    measured = (rates or {}).get(rate_key(config))
    if measured is None:
        return assumed
    ran_on = ("gpu" if any(d.startswith("cuda") for d in measured.devices) else "cpu") if measured.devices else device
    return TrialCost(estimate_tokens(config) / measured.train_tokens_per_s,
                     estimate_eval_tokens(config) / measured.eval_tokens_per_s if measured.eval_tokens_per_s
                     else assumed.eval_s,
                     assumed.setup_s if measured.setup_seconds is None else measured.setup_seconds, measured=True,
                     device=ran_on)


def estimate_hours(trials: Sequence[PlannedTrial], device: str, rates: Mapping[RateKey, Rates] | None = None) -> float:
    """Hours of training, evaluation and setup for all trials, run one after another (see ``trial_cost``)."""
    return sum(trial_cost(t.config, device, rates).total_s for t in trials) / 3600


def load_rates(db: Path) -> tuple[dict[RateKey, Rates], str | None]:
    """Measured rates per (model, method) from the completed trials in ``db``; none, and why, when the file is
    missing, held by a running sweep, or no study database (a dry run never fails for want of measurements). DuckDB
    is imported here: the preflight uses this module on bare GPU machines, which may not have it."""
    import duckdb

    from analysis import queries
    from analysis.db import DatabaseError, connect

    if not Path(db).is_file():
        return {}, f"no database at {db}"
    try:
        con = connect(db, read_only=True)
    except DatabaseError as err:
        return {}, f"{db} could not be read ({str(err).split('(')[0].strip()})"
    try:
        rows = queries.measured_trials(con)
    except duckdb.Error as err:
        return {}, f"{db} is no study database ({str(err).splitlines()[0]})"
    finally:
        con.close()
    return measured_rates(rows), None


def dimension_costs(study: Study, trials: list[PlannedTrial], costs: list[TrialCost]) -> dict[str, dict[str, float]]:
    """Per dimension (study order): its trials (a shared trial counts in every dimension it serves), how many of them
    another dimension shares, and their estimated hours."""
    table: dict[str, dict[str, float]] = {dim: {"trials": 0, "shared": 0, "hours": 0.0} for dim in study.dimensions}
    for trial, cost in zip(trials, costs, strict=True):
        dims = list(dict.fromkeys(d for d, _ in trial.memberships))
        for dim in dims:
            row = table[dim]
            row["trials"] += 1
            row["shared"] += len(dims) > 1
            row["hours"] += cost.total_s / 3600
    return {dim: row for dim, row in table.items() if row["trials"]}  # --dimensions may leave some out


def load_preflight(path: Path | None) -> tuple[PreflightRates | None, str | None]:
    """A preflight's measured rates (``--preflight``, else the preflight's default report where there is one), and a
    note when there is a report the estimate does not use (one from ``--cpu`` mode: tiny shapes on a CPU). A named
    file that is missing or malformed is a ConfigError naming it."""
    if path is None:
        if not PREFLIGHT_REPORT.is_file():
            return None, None
        path = PREFLIGHT_REPORT
    elif not Path(path).is_file():
        raise ConfigError([("--preflight", f"{path}: no such file (python sweeps/preflight.py writes "
                                           f"{PREFLIGHT_REPORT})")])
    preflight = read_preflight(Path(path))
    if preflight.cpu_mode:
        return None, (f"preflight {path} ran with --cpu (tiny shapes on a CPU, {preflight.date}): its rates are not "
                      "used")
    return preflight, None

