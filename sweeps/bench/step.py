"""Our training step against `transformers` (+ `peft` for LoRA): same weights, shape, batch, length, precision.

    python sweeps/bench/step.py                         # gpt2 (124M shape, random weights), CPU fp32 or CUDA bf16
    python sweeps/bench/step.py --n-layer 4 --steps 3   # quicker
    python sweeps/bench/step.py --seq 128,512,1024 --compile-reference   # also against transformers under torch.compile
    python sweeps/bench/step.py --smoke                 # tiny, seconds: checks the script runs
    python sweeps/bench/step.py --level trial [...]     # whole trials vs Hugging Face Trainer: sweeps/bench/trial.py

One step = forward, loss, backward, AdamW step, exactly as a trial runs it (our side goes through the tasks' own loss
functions). The sides alternate within each round so drift in machine load hits all of them; the median step time
after warm-up gives tokens/s. Workloads:
- ``instruction``: language modelling where the first half of each sequence is prompt (loss on the rest), as Alpaca;
- ``classification``: last-token classification into 2 classes, as SMS spam / IMDB.

The preflight (``sweeps/bench/speed.py``) measures its speed figures with ``build_sides`` and ``compare`` from here,
so this script and the preflight report the same ratios from the same code.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from model import GPT2, GPT2Config
from model.lora import LoRAConfig
from model.methods import MethodConfig, apply_method
from sweeps.bench.timing import autocast_for, measure
from sweeps.optim import OptimConfig, build_optimizer
from tasks import Batch, TaskConfig, get_task

Step = Callable[[Batch], None]
WORKLOADS = ("instruction", "classification")
HF, HF_COMPILED = "hf", "hf_compiled"


@dataclass
class Side:
    """One way of running a training step: the step itself (on a given batch) and how many parameters it trains."""

    step: Step
    trainable: int


def make_batch(workload: str, batch: int, seq: int, vocab_size: int, device: torch.device) -> Batch:
    """Random full-length rows; instruction rows are half prompt (no loss there), classification rows have 2 labels."""
    ids = torch.randint(0, vocab_size - 1, (batch, seq), device=device)
    if workload == "instruction":
        return Batch(ids, torch.ones_like(ids), prompt_lengths=torch.full((batch,), seq // 2, device=device))
    return Batch(ids, torch.ones_like(ids), labels=torch.randint(0, 2, (batch,), device=device))


def _ours(path: Path, workload: str, method: str, lora: LoRAConfig, device: torch.device) -> Side:
    model = GPT2.from_pretrained(path).to(device)
    task = get_task(TaskConfig(name="alpaca" if workload == "instruction" else "sms_spam"))
    head = task.make_head(model.config.n_embd)
    if head is not None:
        head.to(device)
    apply_method(model, MethodConfig(name=method), lora, head)
    optimizer = build_optimizer([m for m in (model, head) if m is not None], OptimConfig(lr=1e-5))

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, head, batch)
        loss.backward()
        optimizer.step()

    return Side(step, sum(p.numel() for m in (model, head) if m is not None for p in m.parameters()
                          if p.requires_grad))


def _reference_model(path: Path, workload: str, method: str, lora: LoRAConfig) -> torch.nn.Module:
    """``transformers``' GPT-2 for the workload, wrapped by ``peft`` for LoRA, as a user of those libraries builds it."""
    if workload == "instruction":
        model = transformers.GPT2LMHeadModel.from_pretrained(path)
    else:
        model = transformers.GPT2ForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=50256)
    if method == "lora":
        import peft

        # PEFT matches a target by name suffix, so our names (attn.c_attn, mlp.c_proj...) pick the same modules
        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets),
                                 fan_in_fan_out=True, task_type="SEQ_CLS" if workload != "instruction" else "CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    model.config.use_cache = False
    return model


def _reference(path: Path, workload: str, method: str, lora: LoRAConfig, device: torch.device,
               compile_backend: str | None = None) -> Side:
    """The ``transformers`` (+ ``peft``) step; with ``compile_backend``, the model under plain ``torch.compile``: what a
    user who compiles gets, static shapes at the first length, recompiled once with dynamic shapes at the second
    (``dynamic=True`` from the start compiled slower and ran slower, measured on the CPU)."""
    model = _reference_model(path, workload, method, lora).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" or None)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model

    def step(batch: Batch) -> None:
        if workload == "instruction":
            positions = torch.arange(batch.input_ids.size(1), device=batch.input_ids.device)[None, :]
            labels = batch.input_ids.masked_fill(positions < batch.prompt_lengths[:, None], -100)
        else:
            labels = batch.labels
        optimizer.zero_grad(set_to_none=True)
        forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        optimizer.step()

    return Side(step, sum(p.numel() for p in params))


def build_sides(path: Path, workload: str, method: str, lora: LoRAConfig, device: torch.device,
                compile_backend: str | None = None, reference: bool = True) -> dict[str, Side]:
    """Ours, transformers (+ peft) and, with ``compile_backend``, transformers compiled (ours alone without
    ``reference``): each built once, so a side measured at several lengths keeps its model, optimizer and graphs."""
    sides = {"ours": _ours(path, workload, method, lora, device)}
    if not reference:
        return sides
    sides[HF] = _reference(path, workload, method, lora, device)
    if compile_backend:
        torch._dynamo.reset()  # a fresh compile cache: earlier models' graphs neither help nor use up its size limit
        sides[HF_COMPILED] = _reference(path, workload, method, lora, device, compile_backend)
    return sides


def compare(sides: dict[str, Side], batch: Batch, rounds: int, warmup: int, device: torch.device,
            autocast: AbstractContextManager) -> dict[str, float]:
    """Training tokens/s of every side on the same batch (all its tokens count: the rows are unpadded)."""
    seconds = measure({name: functools.partial(side.step, batch) for name, side in sides.items()}, rounds, warmup,
                      device, autocast)
    return {name: batch.input_ids.numel() / s for name, s in seconds.items()}


def _row(workload: str, method: str, seq: int, sides: dict[str, Side], speed: dict[str, float]) -> str:
    ours, ref = sides["ours"].trainable, sides[HF].trainable
    row = (f"{workload:<15} {method:<6} {seq:>5} {ours:>12,} {speed['ours']:>11,.0f} {speed[HF]:>10,.0f} "
           f"{speed['ours'] / speed[HF]:>5.2f}x")
    if HF_COMPILED in speed:
        row += f" {speed[HF_COMPILED]:>13,.0f} {speed['ours'] / speed[HF_COMPILED]:>5.2f}x"
    return row + ("" if ours == ref else f"  (HF trains {ref:,})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="preset whose shape to use (random weights)")
    parser.add_argument("--n-layer", type=int, help="fewer blocks than the preset, for a quicker run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", default="128", help="sequence length(s), comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile-reference", action="store_true",
                        help="also time transformers under torch.compile (compiles during warm-up)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of that side")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round: checks the script runs")
    return _add_level(parser)


def _add_level(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--level``: parsed first on its own, since the trial level's options are ``sweeps/bench/trial.py``'s."""
    parser.add_argument("--level", choices=("step", "trial"), default="step",
                        help="step: one training step (this script); trial: whole trials vs Hugging Face Trainer "
                             "(sweeps/bench/trial.py, whose options then apply)")
    return parser


def main(argv: list[str] | None = None) -> int:
    chosen, rest = _add_level(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    if chosen.level == "trial":
        from sweeps.bench import trial

        return trial.main(rest)
    args = _parser().parse_args(rest)
    transformers.logging.set_verbosity_error()  # no "newly initialized score weights" notes between the rows
    transformers.logging.disable_progress_bar()  # nor "Loading weights" bars
    if args.smoke:
        args.n_layer, args.batch, args.seq, args.steps, args.warmup = 1, 2, "16", 1, 0
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    if args.smoke:
        overrides.update(n_embd=64, n_head=2)
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.model, **overrides)
    lora = LoRAConfig(rank=8, alpha=16, targets="attention")
    seqs = [int(s) for s in args.seq.split(",")]
    backend = args.compile_backend if args.compile_reference else None
    print(f"device {device} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}; model {args.model} "
          f"n_layer={config.n_layer} n_embd={config.n_embd}; batch {args.batch}; median of {args.steps} rounds after "
          f"{args.warmup} warm-up", flush=True)
    print(f"{'workload':<15} {'method':<6} {'seq':>5} {'trainable':>12} {'ours tok/s':>11} {'HF tok/s':>10} "
          f"{'ratio':>6}" + (f" {'HF comp tok/s':>13} {'ratio':>6}" if backend else ""))
    with tempfile.TemporaryDirectory() as tmp:
        GPT2(config).save_pretrained(tmp)  # every side loads the very same weights
        for workload in args.workloads.split(","):
            for method in args.methods.split(","):
                sides = build_sides(Path(tmp), workload, method, lora, device, backend)
                for seq in seqs:
                    batch = make_batch(workload, args.batch, seq, config.vocab_size, device)
                    speed = compare(sides, batch, args.steps, args.warmup, device, autocast_for(device))
                    print(_row(workload, method, seq, sides, speed), flush=True)
                del sides
    return 0


if __name__ == "__main__":
    sys.exit(main())
