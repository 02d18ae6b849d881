"""The preflight's speed checks ("Fast on this device"): training-step tokens/s against ``transformers`` (the step
benchmark's code), whole trials against ``Trainer`` (the trial benchmark's), model FLOPs utilisation."""

from __future__ import annotations

import time

import torch

from model import GPT2, GPT2Config
from sweeps.bench.context import LORA, MFU_TARGET, SPEED_TARGET, Check, Context, Skipped, _free
from sweeps.bench.overhead import data_ready
from sweeps.bench.step import HF, HF_COMPILED, Side, build_sides, compare, make_batch
from sweeps.bench.timing import sync


def _measure_speed(ctx: Context, sides: dict[str, Side], seq: int, broken: list[str]) -> dict[str, float]:
    """Tokens/s of every side at one length. A compiled side that fails (no compiler, an unsupported graph) is
    dropped, its error kept in ``broken``, and the eager sides are measured without it."""
    batch = make_batch("instruction", ctx.shapes.batch, seq, 50257, ctx.device)
    try:
        return compare(sides, batch, ctx.shapes.rounds, ctx.shapes.warmup, ctx.device, ctx.autocast())
    except Exception as err:
        if HF_COMPILED not in sides:
            raise
        del sides[HF_COMPILED]
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        broken.append(f"{type(err).__name__}: {said[:400]}")
        return compare(sides, batch, ctx.shapes.rounds, ctx.shapes.warmup, ctx.device, ctx.autocast())


def _speed_rows(ctx: Context, method: str) -> list[Check]:
    """One method at every length: ours, transformers (+ peft) and transformers compiled, sides alternating."""
    from model.lora import LoRAConfig

    shapes, broken = ctx.shapes, []
    try:
        sides = build_sides(ctx.checkpoint(), "instruction", method, LoRAConfig(**LORA), ctx.device,
                                  shapes.compile_backend)
    except ImportError as err:
        raise Skipped(f"{err.name or err} is not installed") from None
    checks = []
    for seq in shapes.seqs:
        speed = ctx.speeds[(method, seq)] = _measure_speed(ctx, sides, seq, broken)
        compiled = speed.get(HF_COMPILED)
        checks.append(Check("fast", f"speed {method} seq {seq}", "info" if compiled else "fail",
                            f"{speed['ours']:,.0f} tok/s: {speed['ours'] / speed[HF]:.2f}x transformers, "
                            + (f"{speed['ours'] / compiled:.2f}x transformers compiled" if compiled
                               else "transformers compiled failed"),
                            detail=f"transformers {speed[HF]:,.0f} tok/s, compiled ({shapes.compile_backend}) "
                                   + (f"{compiled:,.0f} tok/s" if compiled else f"failed: {broken[0]}")
                                   + f"; {shapes.label()}, batch {shapes.batch}, {ctx.precision}, median of "
                                     f"{shapes.rounds} rounds after {shapes.warmup} warm-up"))
    return checks


def check_speed(ctx: Context) -> list[Check]:
    """Training-step tokens/s (``sweeps/bench/step.py``'s instruction workload: language modelling, loss on the
    second half) for full fine-tuning and LoRA (r8 on attention) at every length; the target is judged at the middle
    one."""
    checks, seq = [], ctx.shapes.target_seq
    for method in ("full", "lora"):
        try:
            checks += _speed_rows(ctx, method)
        except Skipped as why:
            checks.append(Check("fast", f"speed {method}", "skipped", "not measured", detail=str(why)))
            continue
        finally:
            _free(ctx.device)
        speed = ctx.speeds[(method, seq)]
        ratio = speed["ours"] / speed[HF]
        reference = "transformers" + (" + peft" if method == "lora" else "")
        checks.append(Check("fast", f"target: {method} speed vs {reference}, seq {seq}", ctx.judged(
            ratio >= SPEED_TARGET), f"{ratio:.2f}x", f">= {SPEED_TARGET}x", f"{ctx.precision}, batch "
            f"{ctx.shapes.batch}; ours {speed['ours']:,.0f} tok/s, {reference} {speed[HF]:,.0f} tok/s"))
    return checks


def check_trial(ctx: Context) -> list[Check]:
    """A whole trial against Hugging Face ``Trainer`` (+ ``peft``) as users run it (``sweeps/bench/trial.py``: the
    same SMS-spam examples, batch, epoch and optimisation; each side its own batching), full and LoRA: what users
    compare is a trial, not a step."""
    from sweeps.bench import trial as bench_trial

    data_ready(ctx)
    spec = bench_trial.SMOKE if ctx.shapes.cpu else bench_trial.TrialSpec()
    comparisons = bench_trial.compare_trials(spec, ("full", "lora"), 1 if ctx.shapes.cpu else 2, ctx.device,
                                             warmup=not ctx.shapes.cpu)
    return [Check("fast", f"target: {c.method} trial vs Trainer", ctx.judged(c.throughput_ratio >= SPEED_TARGET),
                  f"{c.throughput_ratio:.2f}x training examples/s", f">= {SPEED_TARGET}x",
                  f"ours {c.ours.examples_per_s:,.1f} ex/s ({c.ours.padding_share:.1%} padding), Trainer "
                  f"{c.trainer.examples_per_s:,.1f} ex/s ({c.trainer.padding_share:.1%} padding); wall (load + "
                  f"training) {c.wall_ratio:.2f}x; sms_spam, {spec.train_examples} examples, batch {spec.batch_size}, "
                  f"gpt2 width {spec.n_embd}, {spec.n_layer} blocks, median of {c.rounds} rounds")
            for c in comparisons]


def matmul_peak(device: torch.device, n: int) -> tuple[float, str]:
    """Dense matmul FLOP/s this device sustains on an n x n product (bf16 on CUDA, fp32 on a CPU), and its label."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b, out = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    reps = 50 if device.type == "cuda" else 20
    for r in range(2 + reps):
        if r == 2:
            sync(device)
            started = time.perf_counter()
        torch.matmul(a, b, out=out)
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - started), f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


def palm_flops_per_token(config: GPT2Config, seq: int) -> tuple[float, int]:
    """Training FLOPs per token as in PaLM's appendix B: 6N + 12·L·H·Q·T, with N the parameters that are matrix
    weights of a matmul per token: all but the position embedding, the tied token embedding once (as the LM head)."""
    with torch.device("meta"):
        model = GPT2(config)
    n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * seq, n


def check_mfu(ctx: Context) -> list[Check]:
    """Model FLOPs utilisation of our full fine-tuning at the longest length: tokens/s (the speed check's, else
    measured here) times PaLM's FLOPs per token, over the peak a large matmul reaches on this device."""
    from model.lora import LoRAConfig

    shapes, seq = ctx.shapes, ctx.shapes.seqs[-1]
    tokens_per_s = ctx.speeds.get(("full", seq), {}).get("ours")
    if tokens_per_s is None:
        ours = build_sides(ctx.checkpoint(), "instruction", "full", LoRAConfig(**LORA), ctx.device,
                                 reference=False)
        batch = make_batch("instruction", shapes.batch, seq, 50257, ctx.device)
        tokens_per_s = compare(ours, batch, shapes.rounds, shapes.warmup, ctx.device, ctx.autocast())["ours"]
        del ours
        _free(ctx.device)
    peak, how = matmul_peak(ctx.device, shapes.matmul_n)
    per_token, n = palm_flops_per_token(shapes.config(), seq)
    mfu = tokens_per_s * per_token / peak
    return [Check("fast", f"target: MFU full fine-tuning, seq {seq}", ctx.judged(mfu >= MFU_TARGET), f"{mfu:.1%}",
                  f">= {MFU_TARGET:.0%}", f"{shapes.label()}, batch {shapes.batch}, {ctx.precision}: "
                  f"{tokens_per_s:,.0f} tok/s x {per_token:.3g} FLOPs/token (6N + 12·L·H·Q·T, N = {n:,}) = "
                  f"{tokens_per_s * per_token:.3g} FLOP/s over the measured peak {peak:.3g} FLOP/s ({how})")]

