"""A trial's configuration: small section dataclasses, addressed by flat dotted keys (``lora.rank``, ``optim.lr``).

Ray Tune's param space, study files and ``--set key=value`` all speak flat keys; ``TrialConfig.from_flat`` maps them
onto the sections, reads strings by each field's type, and reports every problem of every section in one
``ConfigError`` that names each bad key.
"""

from __future__ import annotations

import functools
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from model.config import PRESETS, ConfigError, GPT2Config, Problems, is_int, is_number, preset_name
from model.lora import LoRAConfig
from model.methods import MethodConfig
from sweeps.optim import OptimConfig, ScheduleConfig
from tasks import TaskConfig
from tasks.dpo import DPOConfig

INITS = ("pretrained", "random")
QUANTIZE = ("none", "nf4")
FROZEN_DTYPES = ("float32", "bfloat16")


@dataclass
class ModelConfig:
    """Which GPT-2 a trial starts from."""

    name: str = "gpt2"
    """A preset (``gpt2`` ... ``gpt2-xl``), a hub id, or a local Hugging Face checkpoint directory."""
    init: str = "pretrained"
    """``pretrained`` (load the checkpoint) or ``random`` (a fresh model of the preset's shape, for offline smoke
    runs; every result is labelled random-init)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual outputs during training."""
    n_layer: int | None = None
    """Random init only: override the preset's number of blocks (tiny test models)."""
    n_head: int | None = None
    """Random init only: override the preset's number of heads."""
    n_embd: int | None = None
    """Random init only: override the preset's width."""
    init_seed: int | None = None
    """Random init only: the seed of the random weights; None draws them from ``train.seed``. A fixed value keeps one
    random model across a study's seeds, as a pretrained checkpoint is one model, so the seeds vary what they vary
    with pretrained weights (head, data order), not the model itself. Ignored when the checkpoint is loaded."""
    frozen_dtype: str = "float32"
    """``bfloat16``: every frozen parameter (what the method does not train) stored in bf16, half the bytes, the
    trained ones kept in float32; needs bf16 autocast (``train.precision`` bf16, or auto on CUDA). ``float32``: all."""
    quantize: str = "none"
    """``nf4``: QLoRA, the frozen base weight of every LoRA-adapted projection stored in 4-bit NormalFloat (torchao),
    dequantized per matmul (``model.adapters.quantize_base_weights``); method.name=lora only. ``none``: as loaded."""

    def __post_init__(self) -> None:
        problems = Problems()
        if self.init_seed is not None and (not is_int(self.init_seed) or self.init_seed < 0):
            problems.add("init_seed", f"must be an integer >= 0 or null, got {self.init_seed!r}")
        if not isinstance(self.name, str) or not self.name:
            problems.add("name", f"must be a preset, hub id or directory, got {self.name!r}")
        if self.init not in INITS:
            problems.add("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            problems.add("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            problems.add("frozen_dtype", f"must be one of {', '.join(FROZEN_DTYPES)}, got {self.frozen_dtype!r}")
        if self.quantize not in QUANTIZE:
            problems.add("quantize", f"must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        for key in ("n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if value is None:
                continue
            if not is_int(value) or value < 1:
                problems.add(key, f"must be a positive integer, got {value!r}")
            elif self.init == "pretrained":
                problems.add(key, "shape overrides apply to random init only (set model.init=random)")
        if self.init == "random" and isinstance(self.name, str) and preset_name(self.name) is None:
            problems.add("name", f"random init needs a preset ({', '.join(PRESETS)}), got {self.name!r}")
        problems.raise_if_any("invalid model configuration")

    @property
    def n_layer_known(self) -> int | None:
        """Block count when it is known before loading (presets and overrides); None for other checkpoints."""
        if self.n_layer is not None:
            return self.n_layer
        key = preset_name(self.name) if isinstance(self.name, str) else None
        return PRESETS[key]["n_layer"] if key is not None else None

    @property
    def n_positions_known(self) -> int | None:
        """The longest sequence the model takes, when known before loading: a preset's (random init keeps it; shape
        overrides change depth and width only), a local checkpoint's ``config.json``; None for a hub id."""
        return known_n_positions(self.name)


def known_n_positions(name: object) -> int | None:
    """``n_positions`` of a preset or a local Hugging Face checkpoint directory; None when it cannot be told."""
    if not isinstance(name, str):
        return None
    if preset_name(name) is not None:
        return GPT2Config.n_positions
    config = Path(name) / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("n_positions") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # loading the checkpoint reports it
    return value if is_int(value) else None


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """How long and how a trial trains, evaluates and checkpoints."""

    epochs: int = 1
    """Passes over the training split (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Optimizer steps to take; overrides ``epochs``."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size × grad_accum)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    eval_every: int | None = None
    """Evaluate on validation every N optimizer steps (always also at the end, with test)."""
    eval_at_start: bool = False
    """Also evaluate on validation before the first step (learning curves start at step 0)."""
    train_metrics: bool = False
    """At every validation also evaluate a fixed subset of the training split (the first examples, as many as the
    validation split has): the task's metrics on training data along training, beside validation, to see when a run
    starts to over-fit (how many epochs are worth it). Costs about one validation pass per evaluation."""
    baseline_eval: bool = True
    """Evaluate the untrained model (base weights, fresh head; LoRA's B = 0 leaves it the base) on the test split once,
    before the first step of a trial that starts at step 0: the guide's "before training" baseline. Costs one test
    evaluation per trial (counted in ``eval_seconds``); a resumed trial keeps the one its checkpoint holds."""
    eval_batch_size: int = 32
    """Examples per evaluation batch."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better validation metric; the best weights are restored."""
    seed: int = 0
    """Seeds initialisation (head, adapters, random-init models), dropout and batch order."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA, float32 on CPU), ``fp32`` or ``bf16``."""
    compile: bool = False
    """Compile each transformer block with ``torch.compile`` (``GPT2.compile_blocks``) for training and evaluation
    passes; generation stays eager. Pays compile time up front (seconds per shape on a GPU); for long CUDA runs."""
    activation_checkpointing: bool = False
    """Keep only each block's input for the backward pass and recompute the block there
    (``GPT2.checkpoint_activations``): the activations of all blocks but one, for about a third more step time."""
    log_every: int = 10
    """Report a ``step`` record every N optimizer steps (and the first)."""
    checkpoint_every: int | None = None
    """Write a resumable checkpoint every N optimizer steps (needs a checkpoint directory)."""
    max_new_tokens: int = 64
    """Language-modelling tasks: length of the kept greedy generations."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    export: bool = False
    """Sweeps: keep the final weights under ``<storage>/exports/<trial id>`` (``sweeps/train.py --out``'s
    layout) so a later trial can start from them, e.g. DPO after instruction tuning (``dpo.init=<trial id>``)."""

    def __post_init__(self) -> None:
        problems = Problems()
        for key in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            value = getattr(self, key)
            if not is_int(value) or value < 1:
                problems.add(key, f"must be an integer >= 1, got {value!r}")
        for key in ("max_steps", "eval_every", "early_stopping_patience", "checkpoint_every"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value < 1):
                problems.add(key, f"must be an integer >= 1 or null, got {value!r}")
        if self.max_grad_norm is not None and (not is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            problems.add("max_grad_norm", f"must be > 0 or null, got {self.max_grad_norm!r}")
        if not is_int(self.seed) or self.seed < 0:
            problems.add("seed", f"must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda") or
                                                    self.device.startswith("cuda:")):
            problems.add("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision not in PRECISIONS:
            problems.add("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.early_stopping_patience is not None and self.eval_every is None:
            problems.add("early_stopping_patience", "needs train.eval_every (evaluations to compare)")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.add("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        for key in ("compile", "activation_checkpointing", "group_by_length", "eval_at_start", "train_metrics",
                    "baseline_eval", "export"):
            if not isinstance(getattr(self, key), bool):
                problems.add(key, f"must be true or false, got {getattr(self, key)!r}")
        problems.raise_if_any("invalid training configuration")


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "lora": LoRAConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "dpo": DPOConfig,
}


@dataclass
class TrialConfig:
    """Everything one trial needs: task, model, method (+ LoRA), optimizer, schedule, training."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrialConfig:
        """Build from ``{"section.field": value}``; string values are read by the field's type."""
        problems = Problems()
        grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                problems.add(key, f"unknown key; sections are {', '.join(SECTIONS)} (e.g. lora.rank)")
                continue
            section_cls = SECTIONS[section]
            hints = _field_types(section_cls)
            if name not in hints or name.startswith("_"):
                known = ", ".join(f"{section}.{f.name}" for f in fields(section_cls))
                problems.add(key, f"unknown key; {section} has {known}")
                continue
            if isinstance(value, str):
                try:
                    value = parse_value(value, hints[name])
                except ValueError as err:
                    problems.add(key, str(err))
                    continue
            grouped[section][name] = value
        built: dict[str, Any] = {}
        for section, section_cls in SECTIONS.items():
            try:
                built[section] = section_cls(**grouped[section])
            except ConfigError as err:
                problems.extend(err, prefix=section)
        problems.items.extend(_cross_checks(built, grouped["model"]))
        problems.raise_if_any("invalid trial configuration")
        return cls(**built)

    def to_flat(self) -> dict[str, Any]:
        """The inverse of ``from_flat``: JSON-friendly values under dotted keys."""
        flat = {}
        for section in SECTIONS:
            options = getattr(self, section)
            for f in fields(options):  # sections are flat: a field is a scalar or a tuple of scalars
                value = getattr(options, f.name)
                flat[f"{section}.{f.name}"] = list(value) if isinstance(value, tuple) else value
        return flat


@functools.cache
def _field_types(section_cls: type) -> dict[str, Any]:
    """A section's resolved field types, once per class: resolving string annotations is most of the cost of
    ``from_flat``, which planning the guide study calls thousands of times."""
    return get_type_hints(section_cls)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"rank": 8}}`` and ``{"lora.rank": 8}`` both become ``{"lora.rank": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: plain YAML lets the last one win silently,
    which drops a whole ``dimensions:`` section written twice, or a setting the author thought was in force."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` merges are meant to be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first}); keep one of them",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: a key given twice is an error, not the last one silently winning."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {key!r}; keep one of them")
        data[key] = value
    return data


def read_text_file(path: Path, key: str) -> str:
    """The UTF-8 text of a settings file; a missing, unreadable, directory or binary file is a ``ConfigError`` under
    ``key`` naming the file (and, for a bad byte, its line) and what to do."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError([(key, f"{path}: no such file")]) from None
    except IsADirectoryError:
        raise ConfigError([(key, f"{path}: is a directory; pass a YAML file")]) from None
    except OSError as err:
        raise ConfigError([(key, f"{path}: cannot be read ({err.strerror or err}); check its permissions")]) from None
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise ConfigError([(key, f"{path}:{line}: a binary file (NUL byte), not YAML text; pass a YAML file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError([(key, f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
                                 "UTF-8")]) from None


def read_yaml(path: Path, key: str) -> Any:
    """The YAML (or, for a ``.json`` file, JSON) content of ``path``; an unreadable file, invalid YAML or a key given
    twice is a ``ConfigError`` under ``key`` naming the file and line."""
    text = read_text_file(path, key)
    if Path(path).suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as err:
            raise ConfigError([(key, f"{path}:{err.lineno}: not valid JSON ({err.msg})")]) from None
        except ValueError as err:
            raise ConfigError([(key, f"{path}: {err}")]) from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass: plain data only
    except yaml.reader.ReaderError as err:  # a control character: binary content, no problem_mark
        line = text[:err.position].count("\n") + 1
        raise ConfigError([(key, f"{path}:{line}: control character #x{err.character:04x}, not YAML text; pass a "
                                 "YAML file")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError([(key, f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})")]) from None


# Names that become path components (sweep ids under Ray's storage, study, dimension, group and task names in trial
# ids and figure files): a letter or digit, then letters, digits, ``.``, ``_`` or ``-``; never ``..``.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a path component (None when it can): checked where names enter, so no name can lead a
    file outside its folder."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} is not a safe name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit, without '..'")
    return None


_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def parse_value(text: str, hint: Any) -> Any:
    """Read ``text`` (from ``--set`` or a YAML string) as the field type ``hint``: bool, int, float, str, None, lists."""
    options = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    low = text.strip().lower()
    if type(None) in options and low in _NONE:
        return None
    if bool in options:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    for kind in (int, float):
        if kind in options:
            try:
                return kind(text)
            except ValueError:
                pass
    if any(get_origin(o) in (Sequence, list, tuple) for o in options) and low.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot read {text!r} as a list ({err.msg})") from None
    if str in options:
        return text
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"cannot read {text!r} as {names}")


LORA_VARIANT_KEYS = {"lr_ratio": "LoRA+", "dora": "DoRA", "init": "the adapters' initialisation"}


def _lora_settings_elsewhere(method: str, lora: LoRAConfig) -> list[tuple[str, str]]:
    """``lora.*`` settings a method other than LoRA cannot honour. LoRA's variants (LoRA+, DoRA, PiSSA or gaussian
    starts) are refused with every other method; with IA3, which has no rank, scale or dropout, so is every ``lora.*``
    key off its default (a study's base ``lora.*`` settings are not passed to IA3 trials: ``sweeps.study``)."""
    default = LoRAConfig()
    keys = [f.name for f in fields(LoRAConfig)] if method == "ia3" else list(LORA_VARIANT_KEYS)
    return [(f"lora.{key}", f"{LORA_VARIANT_KEYS.get(key, 'a LoRA setting')} applies to method.name=lora only "
                            f"(method is {method})")
            for key in keys if getattr(lora, key) != getattr(default, key)]


def _cross_checks(built: Mapping[str, Any], raw_model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems between sections that show before any model is loaded. When the model section itself is invalid,
    its raw values still tell the block count, so a bad ``model.init`` does not hide a bad ``method.k``."""
    found: list[tuple[str, str]] = []
    task, dpo = built.get("task"), built.get("dpo")
    if task is not None and dpo is not None and task.name != "preference" and dpo != DPOConfig():
        found.append(("dpo", f"dpo.* options apply to task.name=preference only (task is {task.name})"))
    if dpo is not None and dpo.init != "base" and not Path(dpo.init).is_dir():
        found.append(("dpo.init", f"must be 'base' or a local checkpoint directory (sweeps/train.py --out); "
                                  f"{dpo.init!r} is not a directory"))
    method, lora = built.get("method"), built.get("lora")
    if method is not None and lora is not None and method.name != "lora":
        found.extend(_lora_settings_elsewhere(method.name, lora))
    model = built.get("model")
    train = built.get("train")
    if model is not None and model.frozen_dtype == "bfloat16" and train is not None and train.precision == "fp32":
        found.append(("model.frozen_dtype", "bf16 frozen weights compute under bf16 autocast: set train.precision to "
                                            "bf16 (or auto, on CUDA)"))
    if model is not None and model.quantize == "nf4":
        if method is not None and method.name != "lora":
            found.append(("model.quantize", f"NF4 stores the frozen base weights of LoRA's adapted projections: "
                                            f"needs method.name=lora (method is {method.name})"))
        if model.n_embd is not None and model.n_embd % 8:
            found.append(("model.quantize", f"NF4 quantizes blocks of 64 values: model.n_embd must be a multiple of "
                                            f"8, got {model.n_embd}"))
    n_positions = known_n_positions(model.name if model is not None else raw_model.get("name", "gpt2"))
    if task is not None and task.max_length is not None and n_positions is not None and task.max_length > n_positions:
        found.append(("task.max_length", f"{task.max_length} exceeds the model's {n_positions} positions "
                                         f"(model.name={getattr(model, 'name', raw_model.get('name'))}); use at most "
                                         f"{n_positions}"))
    if model is not None:
        n_layer = model.n_layer_known
    else:
        n_layer = raw_model.get("n_layer")
        if not is_int(n_layer):
            key = preset_name(str(raw_model.get("name", "gpt2")))
            n_layer = PRESETS[key]["n_layer"] if key is not None else None
    if n_layer is None:
        return found
    if method is not None:
        found.extend((f"method.{k}", m) for k, m in method.check_against(n_layer))
    if lora is not None and (method is None or method.name == "lora"):
        try:
            lora.resolve_layers(n_layer)
        except ConfigError as err:
            found.extend(err.prefixed("lora").problems)
    return found
