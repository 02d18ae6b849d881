"""Studies: a YAML file turns into the list of planned trials.

A study has a base trial config (flat dotted keys), the tasks it covers (each with its own overrides), named
dimensions and seeds. Each dimension varies a few keys around the base: one factor at a time, not a cartesian
product. Every variant runs at each learning rate of its method's grid (a variant that sets ``optim.lr`` itself runs
at that one), with every seed::

    name: demo
    base: {model.name: gpt2, train.epochs: 1}
    tasks: {sms_spam: {task.max_train_examples: 400}}
    seeds: [0, 1, 2]
    learning_rates: {full: [5e-5, 1e-4], lora: [5e-4, 1e-3], default: [1e-4]}
    dimensions:
      method:
        full: {method.name: full}
        lora_r8: {method.name: lora, lora.rank: 8}

A trial belongs to a dimension and a group (the variant); the guide compares groups within a dimension and task,
each at its best learning rate, with seeds as replicates. One configuration often serves several groups (``method:
lora`` is also ``lora_targets: all`` when the base adapts every projection): it is planned, trained and stored once,
with every (dimension, group) it serves as a membership, so no compute goes to training it twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from model.config import ConfigError
from model.gpt2 import PRESETS, preset_name
from sweeps.config import TrialConfig, flatten, name_problem, read_yaml
from tasks import TASKS

STUDIES_DIR = Path(__file__).with_name("studies")
TOP_LEVEL = {"name", "description", "base", "tasks", "seeds", "learning_rates", "dimensions", "dimension_tasks",
             "task_dimensions"}


@dataclass
class PlannedTrial:
    """One trial of a sweep: where it belongs and its full flat configuration.

    ``dimension``/``group`` are its first membership in study order (the trials row keeps them, and the trial id's
    readable prefix); ``memberships`` lists every (dimension, group) the one configuration serves, first included.
    """

    trial_id: str
    sweep_id: str
    study: str
    dimension: str
    group: str
    config: dict[str, Any]
    memberships: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """A trial rebuilt from a spec or row that names no memberships has its own (dimension, group) as the one."""
        self.memberships = [tuple(m) for m in self.memberships] or [(self.dimension, self.group)]

    def as_spec(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "sweep_id": self.sweep_id, "study": self.study,
                "dimension": self.dimension, "group": self.group, "config": self.config,
                "memberships": [list(m) for m in self.memberships]}


@dataclass
class Study:
    name: str
    path: Path
    base: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    seeds: list[int]
    learning_rates: dict[str, list[float]]
    dimensions: dict[str, dict[str, dict[str, Any]]]
    description: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list, repr=False)
    dimension_tasks: dict[str, list[str]] = field(default_factory=dict)
    """Dimensions that run on some tasks only (``dpo: [preference]``); unlisted ones run on every task."""
    task_dimensions: dict[str, list[str]] = field(default_factory=dict)
    """Tasks that run some dimensions only (``preference: [dpo]``); unlisted ones run every dimension."""

    def runs(self, task: str, dimension: str) -> bool:
        return (task in self.dimension_tasks.get(dimension, [task])
                and dimension in self.task_dimensions.get(task, [dimension]))

    def lr_grid(self, method: str) -> list[float]:
        return self.learning_rates.get(method) or self.learning_rates.get("default") or []


def shipped_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def resolve_study_path(name_or_path: str) -> Path:
    """A shipped study's name (``guide``) or a path that looks like one (has a separator or a .yaml/.yml suffix).

    A bare name never means a file or folder of the working directory: ``--study guide`` run next to a rendered
    guide folder named ``guide`` still gets the shipped study. Neither kind found: a ConfigError naming both.
    """
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if any(sep in name_or_path for sep in separators) or Path(name_or_path).suffix in (".yaml", ".yml"):
        path = Path(name_or_path)
        if path.is_file():
            return path
        raise ConfigError([("--study", f"{path}: no such study file (shipped studies: "
                                       f"{', '.join(shipped_studies())})")])
    shipped = STUDIES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError([("--study", f"{name_or_path!r}: no such study file (shipped studies: "
                                   f"{', '.join(shipped_studies())}; a path to a study needs a / or a .yaml suffix)")])


def _flat(data: Any, where: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    """A mapping of flat keys (nested sections are flattened); anything else is a problem."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append((where, f"expected a mapping of keys to values, got {type(data).__name__}"))
        return {}
    return flatten(data)


def _mapping(raw: Any, where: str, shape: str, problems: list[tuple[str, str]]) -> dict[Any, Any]:
    """A study section that must be a mapping (``shape`` says of what); absent is empty, anything else a problem."""
    if isinstance(raw, dict):
        return raw
    if raw:
        problems.append((where, f"expected a mapping of {shape}"))
    return {}


def _tasks(raw: Any, path: Path, problems: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    raw = _mapping(raw, f"{path}: tasks", "task -> overrides", problems)
    return {str(task): _flat(overrides, f"{path}: tasks.{task}", problems) for task, overrides in raw.items()}


def _dimensions(raw: Any, path: Path, problems: list[tuple[str, str]]) -> dict[str, dict[str, dict[str, Any]]]:
    dimensions = {}
    for dim, variants in _mapping(raw, f"{path}: dimensions", "dimension -> variants", problems).items():
        if not isinstance(variants, dict) or not variants:
            problems.append((f"{path}: dimensions.{dim}", "expected a non-empty mapping of variant -> settings"))
            continue
        dimensions[str(dim)] = {str(v): _flat(s, f"{path}: dimensions.{dim}.{v}", problems)
                                for v, s in variants.items()}
    return dimensions


def _seeds(seeds: Any, path: Path, problems: list[tuple[str, str]]) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        problems.append((f"{path}: seeds", f"expected a list of integers >= 0, got {seeds!r}"))
        return [0]
    return seeds


def _learning_rates(raw: Any, path: Path, problems: list[tuple[str, str]]) -> dict[str, list[float]]:
    learning_rates = {}
    for method, grid in _mapping(raw, f"{path}: learning_rates", "method -> list of learning rates", problems).items():
        if not isinstance(grid, list) or not grid or not all(isinstance(x, int | float) and x > 0 for x in grid):
            problems.append((f"{path}: learning_rates.{method}", f"expected a list of positive numbers, got {grid!r}"))
        else:
            learning_rates[str(method)] = [float(x) for x in grid]
    return learning_rates


def _restriction(raw: Any, key: str, outer: Mapping[str, Any], inner: Mapping[str, Any], path: Path,
                 problems: list[tuple[str, str]]) -> dict[str, list[str]]:
    """``dimension_tasks`` or ``task_dimensions``: names of ``outer`` -> lists drawn from ``inner``."""
    restriction = {}
    for name, listed in _mapping(raw, f"{path}: {key}", "name -> list of names", problems).items():
        if name not in outer:
            problems.append((f"{path}: {key}.{name}", f"unknown; known: {', '.join(outer)}"))
        elif not isinstance(listed, list) or not all(x in inner for x in listed):
            problems.append((f"{path}: {key}.{name}", f"expected a list drawn from {', '.join(inner)}, "
                                                      f"got {listed!r}"))
        else:
            restriction[str(name)] = [str(x) for x in listed]
    return restriction


def _check_names(path: Path, name: Any, tasks: Mapping[str, Any], dimensions: Mapping[str, Mapping[str, Any]],
                 problems: list[tuple[str, str]]) -> None:
    """Study, task, dimension and group names become parts of sweep ids, trial ids, Ray's folders and figure files:
    each must be a safe name (``name_problem``), so none can lead a file outside its folder."""
    named = [("name", name), *((f"tasks.{t}", t) for t in tasks), *((f"dimensions.{d}", d) for d in dimensions),
             *((f"dimensions.{d}.{g}", g) for d, groups in dimensions.items() for g in groups)]
    problems.extend((f"{path}: {where}", message) for where, value in named
                    if (message := name_problem(value)) is not None)


def load_study(name_or_path: str) -> Study:
    """Read and check a study file; every problem (YAML line, unknown section, bad value) is reported at once."""
    path = resolve_study_path(name_or_path)
    data = read_yaml(path, "--study")
    if not isinstance(data, dict):
        raise ConfigError([(str(path), f"expected a mapping with {', '.join(sorted(TOP_LEVEL))}")])
    problems: list[tuple[str, str]] = []
    for key in sorted(set(data) - TOP_LEVEL):
        problems.append((f"{path}: {key}", f"unknown section; a study has {', '.join(sorted(TOP_LEVEL))}"))
    for key in ("tasks", "dimensions"):
        if not data.get(key):
            problems.append((f"{path}: {key}", "missing or empty"))
    tasks = _tasks(data.get("tasks"), path, problems)
    dimensions = _dimensions(data.get("dimensions"), path, problems)
    seeds = _seeds(data.get("seeds", [0]), path, problems)
    learning_rates = _learning_rates(data.get("learning_rates"), path, problems)
    restrictions = {key: _restriction(data.get(key), key, outer, inner, path, problems)
                    for key, outer, inner in (("dimension_tasks", dimensions, tasks),
                                              ("task_dimensions", tasks, dimensions))}
    name = data.get("name") or path.stem
    _check_names(path, name, tasks, dimensions, problems)
    study = Study(name=str(name), path=path, base=_flat(data.get("base"), f"{path}: base",
                  problems), tasks=tasks, seeds=seeds, learning_rates=learning_rates, dimensions=dimensions,
                  description=str(data.get("description") or ""), **restrictions)
    if problems:
        raise ConfigError(problems, f"invalid study {path}")
    return study


def trial_id(sweep_id: str, config: Mapping[str, Any], prefix: str) -> str:
    """``<prefix>-<hash of sweep and configuration>``: the same configuration is one trial of a sweep whichever groups
    it serves (the prefix, its first membership, is only there to be read)."""
    material = json.dumps([sweep_id, config], sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha1(material.encode()).hexdigest()[:10]}"


def config_key(config: Mapping[str, Any]) -> str:
    """What makes two planned trials the same trial: the whole flat configuration (task, seed and lr included)."""
    return json.dumps(config, sort_keys=True, default=str)


def _check_selection(study: Study, tasks: Sequence[str] | None, dimensions: Sequence[str] | None) -> None:
    problems = [(name, f"{item!r} is not in study {study.name} ({', '.join(known)})")
                for name, chosen, known in (("--tasks", tasks, study.tasks), ("--dimensions", dimensions,
                                                                              study.dimensions))
                for item in chosen or () if item not in known]
    if problems:
        raise ConfigError(problems, "invalid sweep selection")


def _lr_grid(study: Study, dim: str, group: str, variant: Mapping[str, Any]) -> list[float]:
    """The learning rates a variant runs at: its own ``optim.lr`` (a value or a list), else its method's grid."""
    given = variant.get("optim.lr")
    if given is not None:
        return given if isinstance(given, list) else [given]
    return study.lr_grid(str({**study.base, **variant}.get("method.name", "full")))


def _memberships(study: Study, tasks: Sequence[str], dimensions: Sequence[str], seeds: Sequence[int],
                 overrides: Mapping[str, Any], problems: list[tuple[str, str]]) -> list[tuple[str, str, dict]]:
    """Every (dimension, group, validated flat config) the study asks for, in study order, duplicates included."""
    planned = []
    for task in tasks:
        for dim in dimensions:
            if not study.runs(task, dim):
                continue
            for group, variant in study.dimensions[dim].items():
                grid = _lr_grid(study, dim, group, variant)
                if not grid:
                    method = {**study.base, **variant}.get("method.name", "full")
                    problems.append((f"dimensions.{dim}.{group}", f"no learning rate grid for method {method!r} "
                                                                  "(add learning_rates.<method> or .default)"))
                settings = {k: v for k, v in variant.items() if k != "optim.lr"}
                for lr in grid:
                    for seed in seeds:
                        flat = {**study.base, **study.tasks[task], "optim.lr": lr, **settings, **overrides,
                                "task.name": task, "train.seed": seed}
                        try:
                            planned.append((dim, group, TrialConfig.from_flat(flat).to_flat()))
                        except ConfigError as err:
                            problems.extend((f"{task} / {dim}.{group}: {k}", m) for k, m in err.problems)
    return planned


def plan(study: Study, sweep_id: str, tasks: Sequence[str] | None = None, dimensions: Sequence[str] | None = None,
         seeds: Sequence[int] | None = None, overrides: Mapping[str, Any] | None = None) -> list[PlannedTrial]:
    """Every distinct trial of the study (optionally a subset), each validated; all problems are reported together.

    A configuration asked for by several groups is planned once, at its first place in study order, with all of them
    as memberships (``planned_memberships`` counts the pairs before this). Two groups of *one* dimension that come out
    identical (``--set`` can do that) could never be told apart, so they are refused.
    """
    _check_selection(study, tasks, dimensions)
    problems: list[tuple[str, str]] = []
    asked = _memberships(study, list(tasks or study.tasks), list(dimensions or study.dimensions),
                         list(seeds or study.seeds), overrides or {}, problems)
    trials: dict[str, PlannedTrial] = {}
    for dim, group, config in asked:
        trial = trials.get(key := config_key(config))
        if trial is None:
            trials[key] = PlannedTrial(trial_id(sweep_id, config, f"{dim}-{group}"), sweep_id, study.name, dim, group,
                                       config, [(dim, group)])
        elif (clash := dict(trial.memberships).get(dim)) is not None:
            problems.append((f"dimensions.{dim}", f"groups {clash!r} and {group!r} give the same configuration "
                                                  f"({config['task.name']}, lr {config['optim.lr']:g}, seed "
                                                  f"{config['train.seed']}); a dimension's groups must differ"))
        else:
            trial.memberships.append((dim, group))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), f"invalid study {study.path}")
    if not trials:
        raise ConfigError([_nothing_planned(study, tasks, dimensions)], "invalid sweep selection")
    return list(trials.values())


def _nothing_planned(study: Study, tasks: Sequence[str] | None, dimensions: Sequence[str] | None) -> tuple[str, str]:
    """The problem of a selection that plans no trial (every chosen dimension skips every chosen task): a sweep of
    nothing would start Ray and write a sweep for no purpose."""
    chosen_tasks, chosen_dims = list(tasks or study.tasks), list(dimensions or study.dimensions)
    pairs = [f"{t}/{d}" for t in study.tasks for d in study.dimensions if study.runs(t, d)]
    return ("--tasks/--dimensions", f"tasks {', '.join(chosen_tasks)} with dimensions {', '.join(chosen_dims)} plan "
                                    f"no trial in study {study.name} (dimension_tasks/task_dimensions); choose a "
                                    f"task/dimension pair it runs, e.g. {', '.join(pairs[:3]) or 'none'}")


def planned_memberships(trials: Sequence[PlannedTrial]) -> int:
    """(trial, membership) pairs: how many trials planning would have run without sharing configurations."""
    return sum(len(t.memberships) for t in trials)


def duplicates_removed(trials: Sequence[PlannedTrial]) -> int:
    """Configurations planning did not run twice: memberships beyond each trial's first."""
    return planned_memberships(trials) - len(trials)


# Documented training-split sizes and mean tokens per example at each task's default max_length (measured on the
# real data); the cost estimate only needs their order of magnitude.
TASK_SCALE = {"sms_spam": (1045, 25), "imdb": (22500, 203), "nli": (4439, 30), "alpaca": (49973, 112),
              "preference": (929, 250)}
# Validation and test split sizes (examples; preference: pairs) at each task's default source, the README's table.
EVAL_SCALE = {"sms_spam": (149, 300), "imdb": (2500, 25000), "nli": (495, 4906), "alpaca": (1000, 1000),
              "preference": (54, 111)}
# Sustained throughput assumed by the estimate, in FLOP/s: a 2-core CPU in float32 (measured with sweeps/bench.py:
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


def resolve_init(flat: dict[str, Any], db: Path) -> None:
    """``dpo.init=<trial id>`` -> that trial's exported weights, looked up in the study database (in place)."""
    value = flat.get("dpo.init")
    if not isinstance(value, str) or value == "base" or Path(value).is_dir():
        return
    if not Path(db).is_file():
        raise ConfigError([("dpo.init", f"{value!r} is neither 'base', a directory, nor a trial id ({db} does not "
                                        "exist to look it up)")])
    from analysis.db import connect
    from analysis.queries import exported_trial

    con = connect(db, read_only=True)
    try:
        row = exported_trial(con, value)
    finally:
        con.close()
    if row is None:
        raise ConfigError([("dpo.init", f"{value!r} is neither 'base', a directory, nor a trial id in {db}")])
    status, exported, storage = row
    path = Path(storage or "") / "exports" / value
    if status != "completed" or not exported or not (path / "model" / "config.json").is_file():
        raise ConfigError([("dpo.init", f"trial {value} has status {status}, train.export={exported}, and no "
                                        f"weights at {path}; run it with --set train.export=true first")])
    flat["dpo.init"] = str(path)


# --------------------------------------------------------------------------------------------------------------------
# A plan as CSV: one row per planned trial, every flat key its own column; ``read_plan_csv`` gives the trials back.
# --------------------------------------------------------------------------------------------------------------------

PLAN_COLUMNS = ("trial_id", "sweep_id", "study", "task", "memberships", "method", "lr", "seed", "estimated_seconds")


def plan_record(trial: PlannedTrial, seconds: float) -> dict[str, Any]:
    """One planned trial as the dry run's CSV and JSON give it (the JSON keeps ``config`` as one object)."""
    config = trial.config
    return {"trial_id": trial.trial_id, "sweep_id": trial.sweep_id, "study": trial.study, "task": config["task.name"],
            "memberships": [list(m) for m in trial.memberships], "method": config["method.name"],
            "lr": config["optim.lr"], "seed": config["train.seed"], "estimated_seconds": round(seconds, 1),
            "config": config}


def _cell(value: Any) -> str:
    """A CSV cell that reads back as the same value: text as itself unless it would read as JSON, the rest as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def _uncell(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def write_plan_csv(trials: Sequence[PlannedTrial], seconds: Sequence[float], out: TextIO) -> None:
    """The plan for a spreadsheet or a script: fixed columns, then every flat configuration key (study order)."""
    keys = list(dict.fromkeys(k for t in trials for k in t.config))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*PLAN_COLUMNS, *keys])
    for trial, secs in zip(trials, seconds, strict=True):
        record = plan_record(trial, secs)
        writer.writerow([_cell(record[c]) for c in PLAN_COLUMNS] + [_cell(trial.config.get(k)) for k in keys])


def read_plan_csv(source: TextIO) -> list[PlannedTrial]:
    """The trials of a plan written by ``write_plan_csv``, with their configurations exactly as planned."""
    trials = []
    for row in csv.DictReader(source):
        values = {name: _uncell(text) for name, text in row.items()}
        memberships = [tuple(m) for m in values["memberships"]]
        config = {k: v for k, v in values.items() if k not in PLAN_COLUMNS}
        trials.append(PlannedTrial(str(values["trial_id"]), str(values["sweep_id"]), str(values["study"]),
                                   *memberships[0], config, memberships))
    return trials
