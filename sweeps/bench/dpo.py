"""DPO reference model for full / last-k fine-tuning: a frozen copy run at every step, or log-probs precomputed once.

    python sweeps/bench/dpo.py                  # gpt2 (124M shape, random weights), 1 and 2 epochs over 16 batches
    python sweeps/bench/dpo.py --smoke          # tiny, seconds: checks the script runs

Both strategies train the same model on the same pairs with the same optimizer; they differ only in where the
reference log-probs come from. Each round runs one then the other (alternating which goes first), and the medians of
the whole-run times are compared. The frozen copy also holds a second set of weights in memory (printed).
The training loop uses the faster one (``Preference.prepare``); LoRA needs neither (adapters disabled).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch

from model import GPT2, GPT2Config
from model.lora import LoRAConfig
from model.methods import MethodConfig, apply_method
from model.tokenizer import EOT_TOKEN_ID
from sweeps.optim import OptimConfig, build_optimizer
from tasks import TaskConfig, get_task
from tasks.base import EncodedSplit
from tasks.dpo import DPOConfig


def _pairs(n: int, seq: int, vocab: int, seed: int) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    prompt_len, response_len = seq // 2, seq // 2 - 1
    entries = []
    for _ in range(n):
        prompt = torch.randint(0, vocab - 1, (prompt_len,), generator=g).tolist()
        chosen, rejected = (torch.randint(0, vocab - 1, (response_len,), generator=g).tolist() for _ in range(2))
        entries.append(prompt + chosen + [EOT_TOKEN_ID] + prompt + rejected + [EOT_TOKEN_ID])
    return EncodedSplit.from_lists(entries, prompt_lengths=[prompt_len] * n)


def _run(strategy: str, base: GPT2, split: EncodedSplit, batch: int, epochs: int, method: MethodConfig,
         device: torch.device) -> float:
    model = copy.deepcopy(base).to(device)
    apply_method(model, method, LoRAConfig(), None)
    task = get_task(TaskConfig(name="preference"), dpo=DPOConfig())
    split = EncodedSplit(split.tokens, split.offsets, prompt_lengths=split.prompt_lengths)  # no earlier ref_logps
    optimizer = build_optimizer([model], OptimConfig(lr=1e-5))
    batches = [list(range(s, min(s + batch, len(split)))) for s in range(0, len(split), batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    if strategy == "precomputed":
        task.prepare(model, {"train": split}, device, torch.autocast(device.type, enabled=False), batch)
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    for _ in range(epochs):
        for idx in batches:
            b = task.collate(split, idx).to(device)
            if strategy == "frozen_copy":
                with torch.no_grad():
                    b.ref_logps = task.sequence_logps(reference, b).view(2, -1).T
            loss, _ = task.loss(model, None, b)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - started


def measure(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(runs[name]())
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--epochs", default="1,2", help="comma-separated epoch counts to compare at")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round: checks the script runs")
    args = parser.parse_args(argv)
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    if args.smoke:
        overrides, args.pairs, args.batch, args.seq, args.rounds = ({"n_layer": 2, "n_head": 2, "n_embd": 32}, 8, 4,
                                                                    32, 1)
    torch.manual_seed(0)
    base = GPT2(GPT2Config.from_preset(args.model, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, **overrides))
    split = _pairs(args.pairs, args.seq, base.config.vocab_size, seed=0)
    device = torch.device(args.device)
    params = sum(p.numel() for p in base.parameters())
    print(f"DPO reference strategies: {args.model} shape ({params / 1e6:.1f}M params), {args.pairs} pairs, batch "
          f"{args.batch}, {args.seq} tokens per sequence, {device.type}, median of {args.rounds} rounds")
    print(f"{'method':<8} {'epochs':>6} {'frozen copy s':>14} {'precomputed s':>14} {'speed-up':>9}")
    for method in (MethodConfig(name="full"), MethodConfig(name="last_k", k=min(2, base.config.n_layer))):
        for epochs in (int(e) for e in args.epochs.split(",")):
            result = measure({s: (lambda s=s, e=epochs, m=method: _run(s, base, split, args.batch, e, m, device))
                              for s in ("frozen_copy", "precomputed")}, args.rounds)
            print(f"{method.name:<8} {epochs:>6} {result['frozen_copy']:>14.2f} {result['precomputed']:>14.2f} "
                  f"{result['frozen_copy'] / result['precomputed']:>8.2f}x")
    print(f"frozen copy memory: +{params * 4 / 2**20:,.0f} MB of fp32 weights; precomputed: +{args.pairs * 2 * 4} "
          f"bytes per {args.pairs} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
