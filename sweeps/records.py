"""What a trial reports, as typed records: the one home of their fields from the training loop to Ray and DuckDB.

The loop (``sweeps/loop.py``) emits a ``StepRecord`` per logged optimizer step, an ``EvalRecord`` per validation,
a ``CheckpointRecord`` per checkpoint and one ``FinalRecord`` at the end. Each record has one way to become a Ray
report (``to_report``: flat scalars, what Tune's schedulers and searchers read) and one way back
(``record_from_report``, on the driver), and the records that carry measurements have one way to become database
rows (``metric_rows`` for the ``metrics`` table, ``FinalRecord.to_row`` for the measured columns of ``trials``,
``prediction_rows`` and ``generation_rows`` for the per-example tables).
Metric names are the task's own (``accuracy``, ``perplexity``); the ``val_``/``test_`` prefix of flat keys is added
and removed by ``metric_key``/``split_metrics`` alone. Records hold no live objects: ``run_trial`` returns the
trained model beside its final record. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from analysis.db import json_text
from tasks import TASKS

SPLIT_PREFIX = {"validation": "val", "test": "test"}
ROW_METRICS = ("accuracy", "macro_f1", "loss", "perplexity")  # metrics with their own trials columns (schema.sql)
ROW_FIELDS = ("trainable_params", "total_params", "tokens_seen", "tokens_per_s", "padding_share", "peak_memory_mb",
              "memory_source", "weight_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes",
              "memory_account_bytes", "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes", "kept_bytes",
              "setup_seconds", "train_seconds", "eval_seconds", "wall_seconds",
              "baseline_majority")  # FinalRecord fields with a column
TABLE_FIELDS = ("predictions", "generations")  # FinalRecord lists with a table of their own, not in trials.result
FINAL_STATUSES = ("completed", "early_stopped", "diverged", "failed", "stopped")
DB_STATUS = {"early_stopped": "completed"}  # an early-stopped trial completed, with its best weights restored

TRAIN_PREFIX = "train_subset_"  # report keys of the training-subset metrics of an evaluation (train.train_metrics)
EVAL_STEP = "eval_step"  # the step of an evaluation, in eval reports only: schedulers decide at evaluations alone
MetricRow = tuple[int, str, str, float]  # (step, split, name, value): one row of the metrics table
PredictionRow = tuple[str, int, int | None, int | None, bool | None, float | None, int | None]
GenerationRow = tuple[str, int, str, str, str]  # (stage, example, prompt, reference, response): the generations table
GENERATION_STAGES = ("final", "start")


def metric_key(split: str, name: str) -> str:
    """The flat key of a split's metric: ``("validation", "accuracy")`` -> ``val_accuracy``."""
    return f"{SPLIT_PREFIX[split]}_{name}"


def split_metrics(flat: Mapping[str, Any], split: str) -> dict[str, float]:
    """The inverse of ``metric_key`` over a flat mapping: a split's metrics by their own names."""
    prefix = SPLIT_PREFIX[split] + "_"
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix) and _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls`` (Ray adds keys of its own to every report)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _metric_rows(step: int, split: str, values: Mapping[str, Any]) -> list[MetricRow]:
    return [(step, split, name, float(v)) for name, v in values.items() if _is_number(v) and math.isfinite(v)]


@dataclass(frozen=True)
class StepRecord:
    """One logged optimizer step."""

    event: ClassVar[str] = "step"
    step: int
    epoch: int
    loss: float
    lr: float
    tokens_per_s: float
    tokens_seen: int

    def to_report(self) -> dict[str, Any]:
        return {"event": self.event, **asdict(self)}

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> StepRecord:
        return cls(**_known(cls, report))

    def metric_rows(self) -> list[MetricRow]:
        values = {"loss": self.loss, "lr": self.lr, "tokens_per_s": self.tokens_per_s, "tokens_seen": self.tokens_seen}
        return _metric_rows(self.step, "train", values)


@dataclass(frozen=True)
class EvalRecord:
    """The metrics of one evaluation of a split, by the task's own metric names; with ``train.train_metrics`` also
    the same metrics on a fixed subset of the training split at the same step (``train``)."""

    event: ClassVar[str] = "eval"
    step: int
    metrics: dict[str, float]
    split: str = "validation"
    train: dict[str, float] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        return {"event": self.event, "step": self.step, EVAL_STEP: self.step,
                **{metric_key(self.split, k): v for k, v in self.metrics.items()},
                **{TRAIN_PREFIX + k: v for k, v in self.train.items()}}

    @classmethod
    def from_report(cls, report: Mapping[str, Any], split: str = "validation") -> EvalRecord:
        train = {k[len(TRAIN_PREFIX):]: v for k, v in report.items() if k.startswith(TRAIN_PREFIX) and _is_number(v)}
        return cls(int(report.get("step") or 0), split_metrics(report, split), split, train)

    def metric_rows(self) -> list[MetricRow]:
        """Rows of the split, and the training-subset metrics as the ``train`` split (beside the training loss)."""
        return _metric_rows(self.step, self.split, self.metrics) + _metric_rows(self.step, "train", self.train)


@dataclass(frozen=True)
class CheckpointRecord:
    """A resumable checkpoint folder written after ``step``."""

    event: ClassVar[str] = "checkpoint"
    step: int
    path: str

    def to_report(self) -> dict[str, Any]:
        return {"event": self.event, "step": self.step, "checkpoint": self.path}

    def metric_rows(self) -> list[MetricRow]:
        return []


@dataclass(frozen=True)
class Generation:
    """One kept greedy generation: what the guide shows side by side and an LLM judge scores (a row of the
    ``generations`` table)."""

    stage: str
    """``final`` (the trial's trained weights) or ``start`` (the weights it started from; DPO keeps both, since its
    answers are judged against its starting model's)."""
    example: int
    """Index of the prompt in the test split: the same index is the same prompt in every trial of a task with the
    same data settings, so generations pair across trials by it."""
    prompt: str
    """The prompt as the model saw it, decoded."""
    reference: str
    """The dataset's reference answer (preference pairs: the chosen one), decoded."""
    response: str
    """The greedy continuation, decoded, without the end-of-text token."""

    def __post_init__(self) -> None:
        if self.stage not in GENERATION_STAGES:
            raise ValueError(f"unknown generation stage {self.stage!r}; expected one of {GENERATION_STAGES}")


def _generation(data: Mapping[str, Any], index: int) -> Generation:
    """A generation from its dict; one in the form records had before ``Generation`` (``prompt``, ``generation``,
    ``reference``: final weights, its index in the list the example), as the ``trials.result`` of an older database
    holds it (``launch.py resume`` replays those)."""
    if "generation" in data:
        return Generation("final", index, data["prompt"], data["reference"], data["generation"])
    return Generation(**_known(Generation, data))


@dataclass
class FinalRecord:
    """How a trial ended and everything it measured. The task's primary metric and its direction travel with it,
    so nothing downstream guesses which way is better."""

    event: ClassVar[str] = "final"
    status: str
    """``completed``, ``early_stopped`` (best weights restored), ``diverged``, ``failed`` or ``stopped`` (by the
    scheduler, e.g. ASHA)."""
    task: str
    task_kind: str
    primary_metric: str
    higher_is_better: bool
    step: int = 0
    total_steps: int | None = None
    model_init: str | None = None
    method: str | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_fraction: float | None = None
    method_notes: list[str] = field(default_factory=list)
    tokens_seen: int | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    padding_share: float | None = None
    device: str | None = None
    precision: str | None = None
    peak_memory_mb: float | None = None
    """The trial's memory in MiB: the measured CUDA peak allocated on a GPU, else the memory account's total
    (``memory_source`` says which)."""
    memory_source: str | None = None
    """``cuda_peak`` or ``account``."""
    weight_bytes: int | None = None
    """Memory account (``sweeps/memory.py``): every parameter of model and head."""
    gradient_bytes: int | None = None
    """Memory account: one gradient per trainable parameter."""
    optimizer_state_bytes: int | None = None
    """Memory account: the optimizer's state tensors after it stepped."""
    activation_bytes: int | None = None
    """Memory account: what autograd saved for the backward pass of the first training micro-batch (None when not
    measured, e.g. under ``torch.compile``)."""
    memory_account_bytes: int | None = None
    """Sum of the measured parts of the memory account."""
    cuda_peak_allocated_bytes: int | None = None
    cuda_peak_reserved_bytes: int | None = None
    kept_bytes: int | None = None
    """What a user keeps from the trial: the trainable tensors (for LoRA the adapters and the task head)."""
    setup_seconds: float | None = None
    """From the trial's start to its first step: model, data, method, task preparation (and a checkpoint's load)."""
    prepare_seconds: float | None = None
    """Task preparation before training (DPO: the reference log-probs); part of ``setup_seconds``."""
    eval_seconds: float | None = None
    """Every evaluation and the kept generations."""
    wall_seconds: float | None = None
    validation: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    baseline_test: dict[str, float] = field(default_factory=dict)
    """Test metrics, by the task's own names, of the model before any training (step 0: base weights, freshly
    initialised head; LoRA's B = 0 leaves the base model): what training gained is ``test`` minus this. Empty with
    ``train.baseline_eval=false`` and for trials that ended before their own final record."""
    baseline_majority: float | None = None
    """Test primary metric of always predicting the most frequent class of the trial's training split
    (``Task.majority_baseline``); None for tasks without class labels (language modelling, preference pairs)."""
    history: list[EvalRecord] = field(default_factory=list)
    """Validation evaluations during training, in step order."""
    split_sizes: dict[str, int] = field(default_factory=dict)
    resumed_from_step: int = 0
    diverged_at_step: int | None = None
    best_step: int | None = None
    generations: list[Generation] = field(default_factory=list)
    """The kept greedy generations of fixed test prompts (tasks that generate): the final weights' and, for DPO, the
    starting weights'. Rows of the ``generations`` table, not of ``result``."""
    predictions: dict[str, dict[str, list]] = field(default_factory=dict)
    """Per split (validation, test), the final weights' outcome on every example, as columns: ``example`` (index in
    the split), ``label`` and ``prediction`` (classification, preference pairs) or ``loss`` and ``tokens``
    (language modelling); see ``tasks.ExampleResults``. Rows of the ``predictions`` table, not of ``result``."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the task's preparation says about the run (e.g. how DPO's reference was computed)."""
    error: str | None = None
    node_id: str | None = None
    """The Ray node that ran the trial (sweeps only)."""

    def __post_init__(self) -> None:
        if self.status not in FINAL_STATUSES:
            raise ValueError(f"unknown final status {self.status!r}; expected one of {FINAL_STATUSES}")

    @classmethod
    def ended(cls, task: str, status: str, step: int = 0, last_eval: EvalRecord | None = None,
              error: str | None = None) -> FinalRecord:
        """A trial that ended before its own final record (stopped by the scheduler, out of memory): the task's
        metric and direction from the task registry, and the last validation it reported, if any."""
        task_cls = TASKS[task]
        return cls(status=status, task=task, task_kind=task_cls.kind, primary_metric=task_cls.primary_metric,
                   higher_is_better=task_cls.higher_is_better, step=step,
                   validation=dict(last_eval.metrics) if last_eval else {}, error=error)

    @property
    def db_status(self) -> str:
        """The status the ``trials`` table records."""
        return DB_STATUS.get(self.status, self.status)

    def to_dict(self, tables: bool = True) -> dict[str, Any]:
        """The flat form: scalars, ``val_``/``test_`` metrics, and the lists (history as flat eval reports,
        generations as dicts). It is what ``result.json`` and the Ray report hold (the driver needs everything);
        ``tables=False`` leaves out the lists that have a table of their own (``TABLE_FIELDS``): the
        ``trials.result`` column holds the record without them."""
        out: dict[str, Any] = {"event": self.event}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in TABLE_FIELDS and not tables:
                continue
            if f.name in ("validation", "test"):
                out.update({metric_key(f.name, k): v for k, v in value.items()})
            elif f.name == "history":
                out["history"] = [e.to_report() for e in value]
            elif f.name == "generations":
                out["generations"] = [asdict(g) for g in value]
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinalRecord:
        known = _known(cls, data)
        known["validation"] = split_metrics(data, "validation")
        known["test"] = split_metrics(data, "test")
        known["baseline_test"] = {k: v for k, v in (data.get("baseline_test") or {}).items() if _is_number(v)}
        known["history"] = [EvalRecord.from_report(e) for e in data.get("history") or []]
        known["generations"] = [_generation(g, i) for i, g in enumerate(data.get("generations") or [])]
        return cls(**known)

    def to_json(self) -> str:
        """The flat form as JSON; a non-finite number (a diverged loss) is ``null``."""
        return json_text(self.to_dict())

    def to_report(self) -> dict[str, Any]:
        """Scalars for Ray (lists stay out of Tune's result table) and the whole record as JSON for the driver."""
        flat = {k: v for k, v in self.to_dict().items() if v is None or isinstance(v, bool | int | float | str)}
        return {**flat, "final_json": self.to_json()}

    def prediction_rows(self) -> list[PredictionRow]:
        """Rows of the ``predictions`` table: (split, example, label, prediction, correct, loss, tokens)."""
        rows = []
        for split, columns in self.predictions.items():
            n = len(columns.get("example", []))
            label, prediction, loss, tokens = (columns.get(k, [None] * n) for k in ("label", "prediction", "loss",
                                                                                   "tokens"))
            rows += [(split, columns["example"][i], label[i], prediction[i],
                      None if label[i] is None or prediction[i] is None else label[i] == prediction[i],
                      loss[i], tokens[i]) for i in range(n)]
        return rows

    def generation_rows(self) -> list[GenerationRow]:
        """Rows of the ``generations`` table: (stage, example, prompt, reference, response)."""
        return [(g.stage, g.example, g.prompt, g.reference, g.response) for g in self.generations]

    def metric_rows(self) -> list[MetricRow]:
        """The final evaluations at the last step, the validation history, and the step-0 test baseline."""
        rows = _metric_rows(self.step, "validation", self.validation) + _metric_rows(self.step, "test", self.test)
        if self.baseline_test:
            rows += EvalRecord(0, self.baseline_test, split="test").metric_rows()
        for evaluation in self.history:
            rows += evaluation.metric_rows()
        return rows

    def to_row(self) -> dict[str, Any]:
        """The measured columns of the trial's ``trials`` row (analysis/schema.sql), the record itself as JSON."""
        row = {"steps": self.step, "primary_metric": self.primary_metric, "higher_is_better": self.higher_is_better,
               "val_primary": self.validation.get(self.primary_metric),
               "test_primary": self.test.get(self.primary_metric),
               "baseline_step0": self.baseline_test.get(self.primary_metric),
               "result": json_text(self.to_dict(tables=False))}
        for name in ROW_FIELDS:
            row[name] = getattr(self, name)
        for split in ("validation", "test"):
            metrics = getattr(self, split)
            row.update({metric_key(split, name): metrics.get(name) for name in ROW_METRICS})
        return row


Record = StepRecord | EvalRecord | CheckpointRecord | FinalRecord


def record_from_report(report: Mapping[str, Any]) -> Record | None:
    """The record a Ray report carries (None for a report without an event, e.g. Ray's own)."""
    event = report.get("event")
    if event == StepRecord.event:
        return StepRecord.from_report(report)
    if event == EvalRecord.event:
        return EvalRecord.from_report(report)
    if event == CheckpointRecord.event:
        return CheckpointRecord(int(report["step"]), str(report["checkpoint"]))
    if event == FinalRecord.event:
        return FinalRecord.from_dict(json.loads(report["final_json"]))
    return None
