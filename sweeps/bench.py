"""Our training step against `transformers` (+ `peft` for LoRA): same weights, shape, batch, length, precision.

    python sweeps/bench.py                         # gpt2 (124M shape, random weights), CPU fp32 or CUDA bf16
    python sweeps/bench.py --n-layer 4 --steps 3   # quicker
    python sweeps/bench.py --smoke                 # tiny, seconds: checks the script runs

One step = forward, loss, backward, AdamW step, exactly as a trial runs it (our side goes through the tasks' own loss
functions). The two sides alternate within each round so drift in machine load hits both; the median step time after
warm-up gives tokens/s. Workloads:
- ``instruction``: language modelling where the first half of each sequence is prompt (loss on the rest), as Alpaca;
- ``classification``: last-token classification into 2 classes, as SMS spam / IMDB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from model import GPT2, GPT2Config
from model.lora import LoRAConfig
from model.methods import MethodConfig, apply_method
from sweeps.optim import OptimConfig, build_optimizer
from tasks import Batch, TaskConfig, get_task


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(path: Path, workload: str, method: str, lora: LoRAConfig, batch: Batch, device: torch.device):
    model = GPT2.from_pretrained(path).to(device)
    task = get_task(TaskConfig(name="alpaca" if workload == "instruction" else "sms_spam"))
    head = task.make_head(model.config.n_embd)
    if head is not None:
        head.to(device)
    apply_method(model, MethodConfig(name=method), lora, head)
    optimizer = build_optimizer([m for m in (model, head) if m is not None], OptimConfig(lr=1e-5))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, head, batch)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for m in (model, head) if m is not None for p in m.parameters() if p.requires_grad)


def _reference(path: Path, workload: str, method: str, lora: LoRAConfig, batch: Batch, device: torch.device):
    if workload == "instruction":
        model = transformers.GPT2LMHeadModel.from_pretrained(path)
        labels = batch.input_ids.masked_fill(torch.arange(batch.input_ids.size(1), device=device)[None, :]
                                             < batch.prompt_lengths[:, None], -100)
    else:
        model = transformers.GPT2ForSequenceClassification.from_pretrained(path, num_labels=2, pad_token_id=50256)
        labels = batch.labels
    if method == "lora":
        import peft

        names = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj"}
        config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=[names[t] for t in lora.targets],
                                 fan_in_fan_out=True, task_type="SEQ_CLS" if workload != "instruction" else "CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    model.to(device).train()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" or None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def measure(steps: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device,
            autocast) -> dict[str, float]:
    """Median seconds per step of each side, alternating which goes first every round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else reversed(names):
            _sync(device)
            start = time.perf_counter()
            with autocast:
                steps[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="preset whose shape to use (random weights)")
    parser.add_argument("--n-layer", type=int, help="fewer blocks than the preset, for a quicker run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workloads", default="instruction,classification")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_layer, args.batch, args.seq, args.steps, args.warmup = 1, 2, 16, 1, 0
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    if args.smoke:
        overrides.update(n_embd=64, n_head=2)
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.model, **overrides)
    lora = LoRAConfig(rank=8, alpha=16, targets="attention")
    ids = torch.randint(0, config.vocab_size - 1, (args.batch, args.seq), device=device)
    batches = {  # instruction: the prompt is half the sequence
        "instruction": Batch(ids, torch.ones_like(ids),
                             prompt_lengths=torch.full((args.batch,), args.seq // 2, device=device)),
        "classification": Batch(ids, torch.ones_like(ids), labels=torch.randint(0, 2, (args.batch,), device=device)),
    }
    print(f"device {device} ({'bf16 autocast' if use_bf16 else 'fp32'}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}; model {args.model} "
          f"n_layer={config.n_layer} n_embd={config.n_embd}; batch {args.batch} x {args.seq} tokens; "
          f"median of {args.steps} rounds after {args.warmup} warm-up", flush=True)
    print(f"{'workload':<15} {'method':<6} {'trainable':>12} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        GPT2(config).save_pretrained(tmp)  # both sides load the very same weights
        for workload in args.workloads.split(","):
            for method in args.methods.split(","):
                batch = batches[workload]
                ours, n_ours = _ours(Path(tmp), workload, method, lora, batch, device)
                ref, n_ref = _reference(Path(tmp), workload, method, lora, batch, device)
                seconds = measure({"ours": ours, "hf": ref}, args.steps, args.warmup, device, autocast)
                tokens = args.batch * args.seq
                ratio = seconds["hf"] / seconds["ours"]
                print(f"{workload:<15} {method:<6} {n_ours:>12,} {tokens / seconds['ours']:>11,.0f} "
                      f"{tokens / seconds['hf']:>10,.0f} {ratio:>5.2f}x" +
                      ("" if n_ours == n_ref else f"  (HF trains {n_ref:,})"), flush=True)
                del ours, ref
    return 0


if __name__ == "__main__":
    sys.exit(main())
