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

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ConfigError
from sweeps.config import TrialConfig, flatten, name_problem, read_yaml

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


NO_LORA_BASE = ("ia3",)  # methods whose trials do not inherit the study's lora.* settings


def _inherited(study: Study, task: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What a group's trials take from the study's base and the task's overrides. The base's ``lora.*`` settings
    shape LoRA's adapters; an IA3 trial has none, so it does not inherit them (set in its own group, or with
    ``--set``, they are refused: ``sweeps.config``)."""
    inherited = {**study.base, **study.tasks[task]}
    if {**inherited, **settings}.get("method.name") in NO_LORA_BASE:
        inherited = {k: v for k, v in inherited.items() if not k.startswith("lora.")}
    return inherited


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
                inherited = _inherited(study, task, settings)
                for lr in grid:
                    for seed in seeds:
                        flat = {**inherited, "optim.lr": lr, **settings, **overrides,
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
