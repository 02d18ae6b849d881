"""LoRA's variants and the memory savers side by side in one run: step time and the memory account of each.

    python sweeps/bench/variants.py                   # gpt2 shape (12 blocks, random weights), batch 8 x 128, CPU fp32
    python sweeps/bench/variants.py --sides lora,qlora --steps 3
    python sweeps/bench/variants.py --smoke           # tiny, seconds: checks the script runs

Every side is one training step of the instruction workload (as Alpaca: loss on the second half of each row) on the
same weights and batch, LoRA r8 alpha 16 on every projection unless the side changes it. The sides alternate within
each round, so machine load hits them alike; the median step after warm-up is reported, with each side's ratio to
plain LoRA. The memory account is ``sweeps/memory.py``'s, as a trial records it: the weights at their stored size (the
adapted projections' base weights on their own too, where NF4 acts), gradients, optimizer state after a step, and the
activations autograd saves for one step (saved-tensor hooks).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from model import GPT2, GPT2Config
from model.adapters import adapter_layers, quantize_base_weights
from model.lora import LoRAConfig
from model.methods import MethodConfig, apply_method
from sweeps import memory
from sweeps.bench.context import Check, Context
from sweeps.bench.step import make_batch
from sweeps.bench.timing import measure
from sweeps.optim import OptimConfig, build_optimizer
from tasks import Batch, TaskConfig, get_task


@dataclass(frozen=True)
class Variant:
    """What one side changes from plain LoRA (r8, alpha 16, every projection, fp32 weights, AdamW)."""

    method: str = "lora"
    lora: tuple[tuple[str, object], ...] = ()  # LoRAConfig settings beyond the base ones
    nf4: bool = False
    checkpointing: bool = False
    optimizer: str = "adamw"

    @property
    def needs_torchao(self) -> bool:
        return self.nf4 or self.optimizer == "adamw8bit"


SIDES: dict[str, Variant] = {
    "lora": Variant(),
    "dora": Variant(lora=(("dora", True),)),
    "pissa": Variant(lora=(("init", "pissa"),)),
    "ia3": Variant(method="ia3"),
    "qlora": Variant(nf4=True),
    "lora_ckpt": Variant(checkpointing=True),
    "qlora_ckpt": Variant(nf4=True, checkpointing=True),
    "lora_adamw8bit": Variant(optimizer="adamw8bit"),
}
DEFAULT_SIDES = "lora,dora,qlora,lora_ckpt,ia3,lora_adamw8bit"
CPU = torch.device("cpu")


@dataclass
class Account:
    """One side's first loss and its memory account, in bytes."""

    loss: float
    weights: int
    adapted_base: int  # the base weights of the adapted projections (what NF4 stores)
    gradients: int
    optimizer: int
    activations: int


def _side(path: Path, name: str, batch: Batch, device: torch.device = CPU,
          autocast: Callable[[], AbstractContextManager] = nullcontext,
          lr: float = 1e-5) -> tuple[Callable[[], float], Account]:
    """The side's training step (it returns the loss), and its memory account measured over one first step."""
    side = SIDES[name]
    torch.manual_seed(0)
    model = GPT2.from_pretrained(path).to(device).train()
    task = get_task(TaskConfig(name="alpaca"))
    apply_method(model, MethodConfig(name=side.method), LoRAConfig(rank=8, alpha=16, targets="all", **dict(side.lora)))
    if side.nf4:
        quantize_base_weights(model)
    model.checkpoint_activations(side.checkpointing)
    optimizer = build_optimizer([model], OptimConfig(name=side.optimizer, lr=lr))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = task.loss(model, None, batch)[0]
        loss.backward()
        optimizer.step()
        return loss.item()

    optimizer.zero_grad(set_to_none=True)
    with memory.measure_saved([model]) as saved, autocast():
        loss = task.loss(model, None, batch)[0]
    loss.backward()
    optimizer.step()
    account = Account(loss.item(), memory.weight_bytes([model]),
                      sum(memory.stored_bytes(layer.weight) for _, layer in adapter_layers(model)),
                      memory.weight_bytes([model], trainable_only=True), memory.optimizer_state_bytes(optimizer),
                      saved.nbytes)
    return step, account


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="preset whose shape to use (random weights)")
    parser.add_argument("--n-layer", type=int, help="fewer blocks than the preset, for a quicker run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (8-bit AdamW compiles its step)")
    parser.add_argument("--sides", default=DEFAULT_SIDES, help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round: checks the script runs")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown or "lora" not in sides:
        parser.error(f"--sides: unknown {', '.join(unknown)}" if unknown else "--sides must include lora (the ratios' base)")
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 1, 1
        overrides.update(n_layer=2, n_embd=64, n_head=2)
    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.model, **overrides)
    device = CPU
    batch = make_batch("instruction", args.batch, args.seq, config.vocab_size, device)
    print(f"CPU fp32, torch {torch.__version__}, threads {torch.get_num_threads()}; model {args.model} "
          f"n_layer={config.n_layer} n_embd={config.n_embd}; batch {args.batch} x {args.seq}; LoRA r8 alpha 16 on "
          f"every projection; median of {args.steps} rounds after {args.warmup} warm-up", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2(config).save_pretrained(tmp)  # every side loads the very same weights
        built = {name: _side(Path(tmp), name, batch) for name in sides}
        seconds = measure({name: step for name, (step, _) in built.items()}, args.steps, args.warmup, device,
                          nullcontext())
    base_s, base = seconds["lora"], built["lora"][1]
    print(f"{'side':<15} {'step s':>7} {'x lora':>7} {'weights MB':>11} {'x lora':>7} {'adapted MB':>11} {'x lora':>7} "
          f"{'grads MB':>9} {'optim MB':>9} {'x lora':>7} {'activ MB':>9} {'x lora':>7}")
    for name in sides:
        a = built[name][1]
        print(f"{name:<15} {seconds[name]:>7.3f} {seconds[name] / base_s:>6.2f}x {_mb(a.weights):>11} "
              f"{a.weights / base.weights:>6.2f}x {_mb(a.adapted_base):>11} {a.adapted_base / base.adapted_base:>6.2f}x "
              f"{_mb(a.gradients):>9} {_mb(a.optimizer):>9} {a.optimizer / base.optimizer:>6.2f}x "
              f"{_mb(a.activations):>9} {a.activations / base.activations:>6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def check_variants(ctx: Context) -> list[Check]:
    """The preflight's check of LoRA's variants on this device: each side's first two training steps on the same
    weights and batch (the trials' precision, learning rate 1e-2 so the first update shows). The loss change of that
    update must be plain LoRA's with checkpointing (its gradients recompute the same thing); every loss is finite.
    The figures are each side's loss and its memory account against plain LoRA's. Without torchao, QLoRA and 8-bit
    AdamW are reported skipped."""
    import importlib.util

    batch = make_batch("instruction", ctx.shapes.memory_batch, ctx.shapes.memory_seq, 50257, ctx.device)
    has_torchao = importlib.util.find_spec("torchao") is not None
    names = [n for n, side in SIDES.items() if has_torchao or not side.needs_torchao]
    accounts, second = {}, {}
    for name in names:
        step, accounts[name] = _side(ctx.checkpoint(), name, batch, ctx.device, ctx.autocast, lr=1e-2)
        second[name] = step()  # after one update: checkpointing's gradients must have been plain LoRA's
    base = accounts["lora"]
    moved = {name: second[name] - a.loss for name, a in accounts.items()}  # what the first update changed
    tolerance = 5e-2 if ctx.device.type == "cuda" else 1e-3  # bf16 autocast rounds the recomputation too
    checks = []
    for name, a in accounts.items():
        ok = math.isfinite(a.loss) and math.isfinite(second[name]) and (
            abs(moved[name] - moved["lora"]) <= tolerance * abs(moved["lora"]) if name == "lora_ckpt" else True)
        checks.append(Check("correct", f"variant step: {name}", "pass" if ok else "fail",
                            f"loss {a.loss:.4f} then {second[name]:.4f}",
                            detail=f"plain LoRA {base.loss:.4f} then {second['lora']:.4f}; weights "
                                   f"{a.weights / base.weights:.2f}x, adapted "
                                   f"base {a.adapted_base / base.adapted_base:.2f}x, optimizer state "
                                   f"{a.optimizer / base.optimizer:.2f}x, activations "
                                   f"{a.activations / base.activations:.2f}x plain LoRA's ({ctx.precision})"))
    checks += [Check("correct", f"variant step: {name}", "skipped", "not run", detail="torchao is not installed")
               for name in SIDES if name not in accounts]
    return checks
