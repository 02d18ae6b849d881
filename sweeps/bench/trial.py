"""A whole trial, ours against Hugging Face ``Trainer`` (+ ``peft`` for LoRA), each run as its users run it.

    python sweeps/bench/trial.py                       # 4-block gpt2-width random checkpoint, 600 SMS-spam examples
    python sweeps/bench/trial.py --methods full --rounds 5
    python sweeps/bench/trial.py --smoke               # tiny shape, seconds: checks the script runs

What users compare is a whole trial, not a step (``sweeps/bench/step.py`` times steps). Same work on both sides:
- the same saved random checkpoint (gpt2 width 768, 12 heads, ``--n-layer`` blocks), loaded by each side;
- the same SMS-spam training examples, loaded through our task, so the very same token ids. No Hugging Face
  tokenizer files exist offline, so Trainer gets those ids (tiktoken's GPT-2 encoding, the ids GPT-2's tokenizer
  gives) through a small torch ``Dataset`` and a collator that right-pads to the longest in the batch, as
  ``DataCollatorWithPadding`` does;
- batch 8, one epoch, the same learning rate, linear schedule, no warmup, no weight decay, gradient norm clipped to
  1.0 (Trainer's default); LoRA rank 8, alpha 16, on the attention projections, no dropout.

Ours runs through ``sweeps.loop.run_trial`` exactly as ``sweeps/train.py`` would (no baseline evaluation, no
train metrics, no evaluation during training; the final one is unavoidable and runs on a few examples, outside
what is timed). Trainer runs with its defaults otherwise (fused AdamW, unsorted batches; no reports, no saves, no
evaluation). Each side keeps its own batching: ours groups lengths (little padding), Trainer's random batches pad
more; both see the same examples and real tokens, which the printout shows beside the padding share.

Throughput is training examples / seconds of the training phase: ours ``FinalRecord.train_seconds`` (each optimizer
step from zeroing the gradients to the scheduler step: batch collation, forward, backward, clipping, update; building
the optimizer is setup), Trainer's ``train_runtime`` (its whole ``train()`` call, dataloader and optimizer creation
included). Wall time is data, model load and training: ours the record's ``wall_seconds`` less its evaluation,
Trainer from loading the data to the end of ``train()``. Each round runs both sides, alternating which goes first,
and the medians over rounds are compared. The one difference in what is trained: our classification head has a
bias, Trainer's ``score`` has none (2 parameters). On CUDA both sides use bf16 autocast (ours
``train.precision=bf16``, Trainer ``bf16=True``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from model import GPT2, GPT2Config, get_tokenizer
from model.tokenizer import EOT_TOKEN_ID
from sweeps.bench.timing import sync
from sweeps.config import TrialConfig
from sweeps.loop import SUBSET_SEED, run_trial
from tasks import EncodedSplit, TaskConfig, get_task
from tasks.base import pad_right

SIDES = ("ours", "trainer")


@dataclass(frozen=True)
class TrialSpec:
    """The work both sides do: model shape, data, batch and optimisation settings."""

    n_layer: int = 4
    n_embd: int = 768
    n_head: int = 12
    train_examples: int = 600
    max_length: int = 128
    batch_size: int = 8
    epochs: int = 1
    lr: float = 5e-5
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj")
    eval_examples: int = 8
    """Our final evaluation (which a trial always runs, outside the timed phases) on this many examples."""

    def task_config(self) -> TaskConfig:
        return TaskConfig(name="sms_spam", max_train_examples=self.train_examples, max_length=self.max_length,
                          max_eval_examples=self.eval_examples)


SMOKE = TrialSpec(n_layer=1, n_embd=64, n_head=2, train_examples=32, max_length=32, eval_examples=8)


@dataclass(frozen=True)
class TrialTiming:
    """One side's trial: how long training and the whole run took, and the work it did."""

    side: str
    method: str
    train_seconds: float
    examples: int
    real_tokens: int
    padded_tokens: int
    wall_seconds: float

    @property
    def examples_per_s(self) -> float:
        return self.examples / max(self.train_seconds, 1e-9)

    @property
    def padding_share(self) -> float:
        return 1 - self.real_tokens / max(self.padded_tokens, 1)


@dataclass(frozen=True)
class TrialComparison:
    """Medians over rounds of both sides for one method; ratios are ours over Trainer (> 1: ours faster)."""

    method: str
    device: str
    rounds: int
    ours: TrialTiming
    trainer: TrialTiming

    @property
    def throughput_ratio(self) -> float:
        return self.ours.examples_per_s / self.trainer.examples_per_s

    @property
    def wall_ratio(self) -> float:
        return self.trainer.wall_seconds / self.ours.wall_seconds

    def to_dict(self) -> dict:
        """Plain values for a JSON report (the preflight's): both sides' timings and work, and the ratios."""
        return {**asdict(self), "throughput_ratio": self.throughput_ratio, "wall_ratio": self.wall_ratio}


def save_random_checkpoint(spec: TrialSpec, path: Path) -> Path:
    """A seeded random GPT-2 of the spec's shape in Hugging Face form: the one checkpoint both sides load."""
    torch.manual_seed(0)
    return GPT2(GPT2Config.from_preset("gpt2", n_layer=spec.n_layer, n_embd=spec.n_embd,
                                       n_head=spec.n_head)).save_pretrained(path)


def load_train_split(spec: TrialSpec) -> EncodedSplit:
    """The training examples exactly as our trial loads them (same subset seed), token ids included."""
    return get_task(spec.task_config()).load(get_tokenizer(), seed=SUBSET_SEED)["train"]


# --------------------------------------------------------------------------------------------------------------------
# Ours: a trial through sweeps.loop.run_trial
# --------------------------------------------------------------------------------------------------------------------


def our_config(checkpoint: Path, spec: TrialSpec, method: str, device: torch.device) -> TrialConfig:
    """The trial a user would run (``sweeps/train.py --set ...``) for this spec."""
    return TrialConfig.from_flat({
        "task.name": "sms_spam", "task.max_train_examples": spec.train_examples, "task.max_length": spec.max_length,
        "task.max_eval_examples": spec.eval_examples,
        "model.name": str(checkpoint), "model.init": "pretrained",
        "method.name": method, "lora.rank": spec.lora_rank, "lora.alpha": spec.lora_alpha,
        "lora.targets": list(spec.lora_targets),
        "optim.name": "adamw", "optim.lr": spec.lr, "optim.weight_decay": 0.0,
        "schedule.name": "linear", "schedule.warmup_steps": 0,
        "train.epochs": spec.epochs, "train.batch_size": spec.batch_size, "train.max_grad_norm": spec.max_grad_norm,
        "train.baseline_eval": False, "train.train_metrics": False, "train.eval_every": None,
        "train.device": str(device), "train.precision": "bf16" if device.type == "cuda" else "fp32",
    })


def run_ours(checkpoint: Path, spec: TrialSpec, method: str, device: torch.device) -> TrialTiming:
    """One trial through ``run_trial``, timed by its own final record."""
    config = our_config(checkpoint, spec, method, device)
    record = run_trial(config).record
    if record.status != "completed" or record.step != record.total_steps:
        raise RuntimeError(f"our {method} trial ended {record.status} at step {record.step}/{record.total_steps}")
    padded = round(record.tokens_seen / (1 - record.padding_share))
    return TrialTiming("ours", method, record.train_seconds, record.split_sizes["train"] * spec.epochs,
                       record.tokens_seen, padded, record.wall_seconds - record.eval_seconds)


# --------------------------------------------------------------------------------------------------------------------
# Trainer: Hugging Face's loop with its defaults
# --------------------------------------------------------------------------------------------------------------------


class TokenDataset(torch.utils.data.Dataset):
    """Our encoded examples as the dicts Trainer expects (``input_ids``, ``labels``)."""

    def __init__(self, split: EncodedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.split.ids(i).tolist(), "labels": int(self.split.labels[i])}


class PaddingCollator:
    """Right-pads to the longest in the batch (``DataCollatorWithPadding``'s default) and counts the work done."""

    def __init__(self) -> None:
        self.examples = self.real_tokens = self.padded_tokens = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_right([torch.tensor(f["input_ids"]) for f in features], EOT_TOKEN_ID)
        self.examples += len(features)
        self.real_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}


def _trainer_model(checkpoint: Path, spec: TrialSpec, method: str) -> torch.nn.Module:
    import transformers

    model = transformers.GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=2,
                                                                       pad_token_id=EOT_TOKEN_ID)
    if method == "full":
        return model
    if method != "lora":
        raise ValueError(f"Trainer side knows full and lora, not {method!r}")
    import peft

    config = peft.LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                             target_modules=list(spec.lora_targets), fan_in_fan_out=True,
                             task_type="SEQ_CLS")  # SEQ_CLS also trains the classification head, as ours does
    return peft.get_peft_model(model, config)


def run_trainer(checkpoint: Path, spec: TrialSpec, method: str, device: torch.device) -> TrialTiming:
    """One trial through ``transformers.Trainer``: data, model load, ``train()``; timed by its own metrics."""
    import transformers

    started = time.perf_counter()
    dataset, collator = TokenDataset(load_train_split(spec)), PaddingCollator()
    torch.manual_seed(0)  # the new classification head (and adapters) start the same whichever side ran before
    model = _trainer_model(checkpoint, spec, method)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec.batch_size, num_train_epochs=spec.epochs,
            learning_rate=spec.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=spec.max_grad_norm, report_to="none", save_strategy="no", eval_strategy="no",
            use_cpu=device.type == "cpu", bf16=device.type == "cuda")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        metrics = trainer.train().metrics
        sync(device)
    wall = time.perf_counter() - started
    return TrialTiming("trainer", method, metrics["train_runtime"], collator.examples, collator.real_tokens,
                       collator.padded_tokens, wall)


# --------------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------------


def _median(timings: list[TrialTiming]) -> TrialTiming:
    """Median times over rounds; the work must be the same in every round (else the rounds are not comparable)."""
    work = {(t.examples, t.real_tokens, t.padded_tokens) for t in timings}
    if len(work) != 1:
        raise RuntimeError(f"{timings[0].side} {timings[0].method}: the work differed between rounds: {work}")
    return replace(timings[0], train_seconds=statistics.median(t.train_seconds for t in timings),
                   wall_seconds=statistics.median(t.wall_seconds for t in timings))


def compare_trials(spec: TrialSpec = TrialSpec(), methods: tuple[str, ...] = ("full", "lora"), rounds: int = 3,
                   device: str | torch.device = "cpu", checkpoint: Path | None = None,
                   warmup: bool = True) -> list[TrialComparison]:
    """Both sides' trials for each method, ``rounds`` times, alternating which side goes first; medians compared.
    Without ``checkpoint`` a random one of the spec's shape is saved to a temporary folder for the run. ``warmup``
    first runs an untimed tiny trial of each side, so the process's one-off costs land on neither."""
    device = torch.device(device)
    if checkpoint is None:
        with tempfile.TemporaryDirectory() as tmp:
            return compare_trials(spec, methods, rounds, device, save_random_checkpoint(spec, Path(tmp)), warmup)
    runners = {"ours": run_ours, "trainer": run_trainer}
    if warmup:  # one-off costs of a process (lazy imports, first kernels) hit neither side's timed trials
        with tempfile.TemporaryDirectory() as tmp:
            tiny = save_random_checkpoint(SMOKE, Path(tmp))
            for method in methods:
                for side in SIDES:
                    runners[side](tiny, SMOKE, method, device)
    timings: dict[tuple[str, str], list[TrialTiming]] = {(m, s): [] for m in methods for s in SIDES}
    for r in range(rounds):
        for method in methods:
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                gc.collect()
                timings[method, side].append(runners[side](checkpoint, spec, method, device))
    return [TrialComparison(m, device.type, rounds, _median(timings[m, "ours"]), _median(timings[m, "trainer"]))
            for m in methods]


def format_comparisons(comparisons: list[TrialComparison]) -> list[str]:
    """One header and one line per method: each side's throughput, times and padding, and the ratios."""
    lines = [f"{'method':<6} {'ours ex/s':>9} {'HF ex/s':>8} {'ratio':>6}  {'ours train s':>12} {'HF train s':>10}  "
             f"{'ours wall s':>11} {'HF wall s':>9} {'wall ratio':>10}  {'examples':>8} {'real tokens':>11}  "
             f"{'ours pad':>8} {'HF pad':>6}"]
    for c in comparisons:
        o, t = c.ours, c.trainer
        lines.append(f"{c.method:<6} {o.examples_per_s:>9.1f} {t.examples_per_s:>8.1f} {c.throughput_ratio:>5.2f}x  "
                     f"{o.train_seconds:>12.2f} {t.train_seconds:>10.2f}  {o.wall_seconds:>11.2f} "
                     f"{t.wall_seconds:>9.2f} {c.wall_ratio:>9.2f}x  {o.examples:>8} {o.real_tokens:>11}  "
                     f"{o.padding_share:>8.1%} {t.padding_share:>6.1%}")
        if (o.examples, o.real_tokens) != (t.examples, t.real_tokens):
            lines.append(f"  WORK DIFFERS: Trainer saw {t.examples} examples, {t.real_tokens} real tokens")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--rounds", type=int, default=3, help="trials per side and method (median compared)")
    parser.add_argument("--n-layer", type=int, default=TrialSpec.n_layer, help="blocks of the gpt2-width model")
    parser.add_argument("--train-examples", type=int, default=TrialSpec.train_examples)
    parser.add_argument("--batch", type=int, default=TrialSpec.batch_size)
    parser.add_argument("--max-length", type=int, default=TrialSpec.max_length)
    parser.add_argument("--lr", type=float, default=TrialSpec.lr)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides bf16 autocast on cuda)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        spec, args.rounds = SMOKE, 1
    else:
        spec = TrialSpec(n_layer=args.n_layer, train_examples=args.train_examples, batch_size=args.batch,
                         max_length=args.max_length, lr=args.lr)
    import transformers

    transformers.logging.set_verbosity_error()  # no "newly initialized score weights" notes between the rows
    transformers.logging.disable_progress_bar()  # nor "Loading weights" bars
    print(f"whole trials, ours vs transformers {transformers.__version__} Trainer: sms_spam, {spec.train_examples} "
          f"examples, batch {spec.batch_size}, {spec.epochs} epoch, max length {spec.max_length}; gpt2 width "
          f"{spec.n_embd}, {spec.n_layer} blocks, random weights; {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds, sides alternating", flush=True)
    comparisons = compare_trials(spec, tuple(args.methods.split(",")), args.rounds, args.device,
                                 warmup=not args.smoke)  # a smoke run is as tiny as the warm-up
    print("\n".join(format_comparisons(comparisons)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
