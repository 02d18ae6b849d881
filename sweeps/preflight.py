"""GPU preflight: is this machine's CUDA path correct, how fast is it, and what will a study cost on it?

    python sweeps/preflight.py                    # one GPU (sized for < 8 minutes); report in results/preflight/
    python sweeps/preflight.py --only correct     # a section (correct, fast, cost) or checks (logits, speed, ...)
    python sweeps/preflight.py --cpu              # tiny shapes on the CPU, seconds: the test suite runs this
    python sweeps/launch.py preflight ...         # the same
    CUDA_VISIBLE_DEVICES=1 python sweeps/preflight.py   # another GPU of the machine

From the repository root after ``make install`` (on a machine with the packages but not the project installed:
``PYTHONPATH=. python sweeps/preflight.py``).

Three sections, each a list of checks with a status (pass, fail, info, skipped), the measured figure, the target
where the project has one, and how it was measured:

- correct: our logits (bf16 autocast) against ``transformers`` in fp32 and bf16 on the same weights; which SDPA
  backend our attention runs for unpadded, right-padded and (for contrast) left-padded batches, and why flash was
  refused where it was; a training step's loss under ``torch.compile`` against eager; fused AdamW in use.
- fast: training-step tokens/s of ours against ``transformers`` (+ ``peft`` for LoRA) as users run them and against
  ``transformers`` compiled, full and LoRA, at three lengths (``sweeps/bench.py``'s code, so the same ratios); model
  FLOPs utilisation of full fine-tuning (PaLM's FLOPs per token over the peak a large matmul reaches here); peak
  memory of LoRA against full fine-tuning on gpt2-medium.
- cost: the overhead of a small LoRA trial (start to first optimizer step; last step to its row in the database) as
  a share of its wall time, and trials per hour with 1, 2, 4 and 8 trials at once on the GPU.

Every check runs on its own: one that raises is a ``fail`` carrying the error, and the report (``preflight.json``,
``preflight.md``) is always written. The JSON's ``rates`` (effective training FLOP/s, setup seconds per trial,
packing gains) are what ``launch.py grid --dry-run`` then costs a study with. Neither Ray nor DuckDB is needed:
packing runs plain processes at once on the GPU (what Ray's fractional GPUs do), and the database write is timed
only where DuckDB is installed. Exit status 0 when no check failed, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers

from model import GPT2, GPT2Config
from sweeps import bench
from sweeps.study import PREFLIGHT_REPORT, method_flops_factor, shape_params

DEFAULT_OUT = PREFLIGHT_REPORT.parent
SECTIONS = {"correct": "Correct on this device", "fast": "Fast on this device", "cost": "A study's cost on this machine"}
STATUSES = ("pass", "fail", "info", "skipped")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    """One line of the report: what was checked, how it came out, against which target, and how it was measured."""

    section: str
    name: str
    status: str
    figure: str
    target: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES or self.section not in SECTIONS:
            raise ValueError(f"check {self.name!r}: status {self.status!r} / section {self.section!r} unknown")


class Skipped(Exception):
    """A check that cannot run here (a package or the data is missing): reported as ``skipped`` with the reason."""


@dataclass(frozen=True)
class Shapes:
    """What the checks run on. The GPU shapes are the real ones; ``--cpu`` runs the very same code on tiny shapes, in
    seconds, so the script cannot rot unnoticed. ``target_seq`` is the length the speed targets are judged at."""

    cpu: bool
    model: str
    model_overrides: dict[str, int]
    medium: str
    medium_overrides: dict[str, int]
    seqs: tuple[int, ...]
    batch: int
    memory_batch: int
    memory_seq: int
    rounds: int
    warmup: int
    matmul_n: int
    compile_backend: str
    trial: dict[str, Any]
    packing: tuple[int, ...]
    trials_per_worker: int

    @property
    def target_seq(self) -> int:
        return self.seqs[len(self.seqs) // 2]

    @classmethod
    def gpu(cls) -> Shapes:
        trial = {"model.name": "gpt2", "task.max_train_examples": 256, "task.max_eval_examples": 128,
                 "train.batch_size": 16, "train.max_steps": 32, "train.device": "cuda"}
        return cls(False, "gpt2", {}, "gpt2-medium", {}, (128, 512, 1024), batch=8, memory_batch=8, memory_seq=512,
                   rounds=10, warmup=3, matmul_n=8192, compile_backend="inductor", trial={**SMALL_TRIAL, **trial},
                   packing=(1, 2, 4, 8), trials_per_worker=2)

    @classmethod
    def tiny(cls) -> Shapes:
        """Inductor compiles the tiny model's first step in ~20 s cold on 2 CPU cores (measured while writing this),
        so ``--cpu`` compiles with ``aot_eager``: the same graph capture and autograd, no generated kernels."""
        tiny = {"n_layer": 2, "n_embd": 64, "n_head": 2}
        trial = {"model.name": "gpt2", **{f"model.{k}": v for k, v in tiny.items()}, "task.max_train_examples": 32,
                 "task.max_eval_examples": 16, "train.batch_size": 4, "train.max_steps": 4, "train.device": "cpu"}
        return cls(True, "gpt2", tiny, "gpt2-medium", {"n_layer": 4, "n_embd": 128, "n_head": 4}, (16, 32, 64),
                   batch=2, memory_batch=2, memory_seq=64, rounds=2, warmup=1, matmul_n=512,
                   compile_backend="aot_eager", trial={**SMALL_TRIAL, **trial}, packing=(1, 2), trials_per_worker=2)

    def config(self, medium: bool = False) -> GPT2Config:
        return (GPT2Config.from_preset(self.medium, **self.medium_overrides) if medium
                else GPT2Config.from_preset(self.model, **self.model_overrides))

    def label(self, medium: bool = False) -> str:
        name, overrides = (self.medium, self.medium_overrides) if medium else (self.model, self.model_overrides)
        return name + "".join(f" {k}={v}" for k, v in overrides.items())


# A small LoRA trial as a study runs it (random init: the preflight needs no download), every step reported so the
# last step's time is known. Shapes add the model, sizes and device.
SMALL_TRIAL: dict[str, Any] = {"task.name": "sms_spam", "model.init": "random", "method.name": "lora",
                               "lora.rank": 8, "train.log_every": 1}


@dataclass
class Context:
    """What the checks share: shapes, device, a scratch folder with the random checkpoints every side loads, and
    what earlier checks measured (speeds feed the MFU check and the rates; overhead and packing feed the rates)."""

    shapes: Shapes
    device: torch.device
    workdir: Path
    speeds: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)
    _checkpoints: dict[bool, Path] = field(default_factory=dict)

    def checkpoint(self, medium: bool = False) -> Path:
        """A random-weights checkpoint of the model (or the medium model), written once: ours and transformers load it."""
        if medium not in self._checkpoints:
            torch.manual_seed(0)
            path = self.workdir / ("medium" if medium else "model")
            GPT2(self.shapes.config(medium)).save_pretrained(path)
            self._checkpoints[medium] = path
        return self._checkpoints[medium]

    def autocast(self) -> AbstractContextManager:
        return bench.autocast_for(self.device)

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.device.type == "cuda" else "fp32"

    def judged(self, ok: bool) -> str:
        """A target's status: pass or fail on a GPU; on ``--cpu`` shapes the targets are shown, not judged."""
        return "info" if self.shapes.cpu else ("pass" if ok else "fail")


def _free(device: torch.device) -> None:
    """Between checks: drop what the last one left, so each memory figure is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# Correct on this device
# --------------------------------------------------------------------------------------------------------------------


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def _logits(ctx: Context) -> dict[str, torch.Tensor]:
    """Logits of ours and of ``transformers``' GPT2LMHeadModel on the same weights and tokens, fp32 and bf16 autocast."""
    import transformers

    path, seq = ctx.checkpoint(), ctx.shapes.seqs[-1]
    torch.manual_seed(0)
    ids = torch.randint(0, 50256, (2, seq), device=ctx.device)
    mask = torch.ones_like(ids)
    ours = GPT2.from_pretrained(path).to(ctx.device).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).to(ctx.device).eval()
    bf16 = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    out = {"ours_fp32": ours(ids, attention_mask=mask).float(),
           "hf_fp32": hf(input_ids=ids, attention_mask=mask).logits.float()}
    with bf16:
        out["ours_bf16"] = ours(ids, attention_mask=mask).float()
        out["hf_bf16"] = hf(input_ids=ids, attention_mask=mask).logits.float()
    return out


def check_logits(ctx: Context) -> list[Check]:
    """Our model against ``transformers`` on the same weights. fp32 must agree to float rounding; in bf16 (how trials
    run on a GPU) ours may be off fp32 by no more than about what transformers' own bf16 is (2x it, plus 1e-3 of the
    logits' scale): a bf16 error beyond that is ours, not bf16's. Two bf16 results may then differ by both errors
    (3x transformers', plus the same slack)."""
    out = _logits(ctx)
    scale = float(out["hf_fp32"].abs().max())
    fp32 = _max_diff(out["ours_fp32"], out["hf_fp32"])
    hf_own = _max_diff(out["hf_bf16"], out["hf_fp32"])
    ours_vs_fp32 = _max_diff(out["ours_bf16"], out["hf_fp32"])
    ours_vs_bf16 = _max_diff(out["ours_bf16"], out["hf_bf16"])
    fp32_tol, bf16_tol, both_tol = 1e-4 * max(1.0, scale), 2 * hf_own + 1e-3 * scale, 3 * hf_own + 1e-3 * scale
    where = (f"{ctx.shapes.label()}, 2 x {ctx.shapes.seqs[-1]} random tokens, random weights (max |logit| "
             f"{scale:.2f})")
    del out
    return [
        Check("correct", "logits fp32 vs transformers fp32", "pass" if fp32 <= fp32_tol else "fail",
              f"max |diff| {fp32:.2e}", f"<= {fp32_tol:.1e}", where),
        Check("correct", "logits bf16 vs transformers fp32", "pass" if ours_vs_fp32 <= bf16_tol else "fail",
              f"max |diff| {ours_vs_fp32:.2e}", f"<= {bf16_tol:.2e}",
              f"ours under bf16 autocast; transformers' own bf16 is off its fp32 by {hf_own:.2e}; {where}"),
        Check("correct", "logits bf16 vs transformers bf16", "pass" if ours_vs_bf16 <= both_tol else "fail",
              f"max |diff| {ours_vs_bf16:.2e}", f"<= {both_tol:.2e}", f"both under bf16 autocast; {where}"),
    ]


# aten operator -> SDPA backend: the operator the dispatcher ran says which kernel our attention used
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
            "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
            "aten::_scaled_dot_product_fused_attention_overrideable": "fused (backend-specific)",
            "aten::_scaled_dot_product_attention_math": "math"}


def _sdpa_used(step: Callable[[], None]) -> list[str]:
    """The SDPA backends a forward (and backward) pass dispatched to, from the profiler's operator names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sorted({SDPA_OPS[e.name] for e in prof.events() if e.name in SDPA_OPS})


def _flash_refusal(step: Callable[[], None]) -> str:
    """Why the flash kernel does not take this call: run with flash alone allowed and keep what torch says."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        warnings.simplefilter("always")
        try:
            step()
        except RuntimeError as err:
            said = [str(w.message).strip() for w in caught if "flash" in str(w.message).lower()]
            return " ".join(said) or str(err).splitlines()[0]
    return "flash alone runs this call: the dispatcher preferred another backend"


def _sdpa_case(ctx: Context, model: GPT2, mask: torch.Tensor) -> tuple[list[str], str | None]:
    ids = torch.randint(0, 50256, mask.shape, device=ctx.device)

    def step() -> None:
        with ctx.autocast():
            model(ids, attention_mask=mask).float().mean().backward()

    used = _sdpa_used(step)
    return used, None if any(u.startswith("flash") for u in used) else _flash_refusal(step)


def check_sdpa(ctx: Context) -> list[Check]:
    """The backend our attention actually runs (training pass, trial precision). ``GPT2.hidden_states`` drops a
    right-padded mask (``_is_right_padded``) and runs ``is_causal``, so right padding should keep flash; left padding
    needs an explicit mask, which flash does not take (shown for contrast)."""
    model = GPT2.from_pretrained(ctx.checkpoint()).to(ctx.device).train()
    batch, seq = ctx.shapes.batch, ctx.shapes.target_seq
    pad = seq // 4
    masks = {"unpadded": torch.ones(batch, seq, dtype=torch.long, device=ctx.device)}
    masks["right-padded"] = masks["unpadded"].clone()
    masks["right-padded"][1:, seq - pad:] = 0
    masks["left-padded"] = masks["unpadded"].clone()
    masks["left-padded"][1:, :pad] = 0
    checks = []
    for case, mask in masks.items():
        used, refusal = _sdpa_case(ctx, model, mask)
        flash = refusal is None
        status = "info" if ctx.device.type != "cuda" or case == "left-padded" else ("pass" if flash else "fail")
        detail = f"{ctx.precision}, batch {batch} x {seq}" + (f"; flash refused: {refusal}" if refusal else "")
        if case == "right-padded":
            detail += "; the mask is dropped for is_causal (model/gpt2.py _is_right_padded)"
        checks.append(Check("correct", f"sdpa {case}", status, " + ".join(used) or "no SDPA call seen",
                            "flash" if status != "info" else None, detail))
    return checks


def _two_steps(ctx: Context, compiled: bool) -> tuple[list[float], float]:
    """Losses of two full fine-tuning steps as a trial takes them (the task's loss, AdamW), eager or with the blocks
    compiled as ``train.compile`` does (``GPT2.compile_blocks``); and the first step's seconds (compile included)."""
    from model.lora import LoRAConfig
    from model.methods import MethodConfig, apply_method
    from sweeps.optim import OptimConfig, build_optimizer
    from tasks import TaskConfig, get_task

    torch.manual_seed(0)
    model = GPT2.from_pretrained(ctx.checkpoint()).to(ctx.device).train()
    apply_method(model, MethodConfig(name="full"), LoRAConfig(), None)
    if compiled:
        torch._dynamo.reset()
        model.compile_blocks(backend=ctx.shapes.compile_backend)
    task = get_task(TaskConfig(name="alpaca"))
    optimizer = build_optimizer([model], OptimConfig(lr=1e-4))
    batch = bench.make_batch("instruction", ctx.shapes.batch, ctx.shapes.target_seq, 50257, ctx.device)
    losses, first = [], 0.0
    for _ in range(2):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss, _ = task.loss(model, None, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bench.sync(ctx.device)
        first = first or time.perf_counter() - started
    return losses, first


def check_compile(ctx: Context) -> list[Check]:
    """The same two training steps eager and compiled, from the same weights and batch: the losses must agree to the
    precision's rounding (relative 1e-2 in bf16, 1e-4 in fp32). The second loss comes after a compiled backward and
    optimizer step, so it checks those too."""
    torch.manual_seed(1)
    eager, eager_s = _two_steps(ctx, compiled=False)
    torch.manual_seed(1)
    compiled, compiled_s = _two_steps(ctx, compiled=True)
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, compiled, strict=True))
    tol = 1e-2 if ctx.device.type == "cuda" else 1e-4
    backend = ctx.shapes.compile_backend + (" (--cpu: inductor's ~20 s compile is too slow for the test suite)"
                                            if ctx.shapes.cpu else "")
    return [Check("correct", "compile loss vs eager", "pass" if rel <= tol else "fail", f"relative |diff| {rel:.1e}",
                  f"<= {tol:.0e}", f"losses eager {eager[0]:.5f}, {eager[1]:.5f}; compiled {compiled[0]:.5f}, "
                  f"{compiled[1]:.5f} ({ctx.precision}, batch {ctx.shapes.batch} x {ctx.shapes.target_seq}); backend "
                  f"{backend}; first step {compiled_s:.1f} s compiled (compile included), {eager_s:.2f} s eager")]


def check_fused_adamw(ctx: Context) -> list[Check]:
    """The optimizer trials build (``sweeps.optim.build_optimizer``) on this device: torch's fused AdamW kernel."""
    from model.lora import LoRAConfig
    from model.methods import MethodConfig, apply_method
    from sweeps.optim import OptimConfig, build_optimizer

    fused = {}
    for method in ("full", "lora"):
        model = GPT2(ctx.shapes.config()).to(ctx.device)
        apply_method(model, MethodConfig(name=method), LoRAConfig(), None)
        fused[method] = build_optimizer([model], OptimConfig(name="adamw")).defaults.get("fused")
    ok = all(v is True for v in fused.values())
    return [Check("correct", "fused adamw", "pass" if ok else "fail",
                  ", ".join(f"{m}: fused={v}" for m, v in fused.items()), "fused=True",
                  f"torch.optim.AdamW as sweeps.optim.build_optimizer builds it on {ctx.device.type}")]


# --------------------------------------------------------------------------------------------------------------------
# Fast on this device
# --------------------------------------------------------------------------------------------------------------------

SPEED_TARGET, MFU_TARGET, MEMORY_TARGET, PACKING_TARGET, OVERHEAD_TARGET = 1.5, 0.40, 0.5, 3.0, 0.05
LORA = dict(rank=8, alpha=16, targets="attention")  # sweeps/bench.py's adapters


def _measure_speed(ctx: Context, sides: dict[str, bench.Side], seq: int, broken: list[str]) -> dict[str, float]:
    """Tokens/s of every side at one length. A compiled side that fails (no compiler, an unsupported graph) is
    dropped, its error kept in ``broken``, and the eager sides are measured without it."""
    batch = bench.make_batch("instruction", ctx.shapes.batch, seq, 50257, ctx.device)
    try:
        return bench.compare(sides, batch, ctx.shapes.rounds, ctx.shapes.warmup, ctx.device, ctx.autocast())
    except Exception as err:
        if bench.HF_COMPILED not in sides:
            raise
        del sides[bench.HF_COMPILED]
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        broken.append(f"{type(err).__name__}: {said[:400]}")
        return bench.compare(sides, batch, ctx.shapes.rounds, ctx.shapes.warmup, ctx.device, ctx.autocast())


def _speed_rows(ctx: Context, method: str) -> list[Check]:
    """One method at every length: ours, transformers (+ peft) and transformers compiled, sides alternating."""
    from model.lora import LoRAConfig

    shapes, broken = ctx.shapes, []
    try:
        sides = bench.build_sides(ctx.checkpoint(), "instruction", method, LoRAConfig(**LORA), ctx.device,
                                  shapes.compile_backend)
    except ImportError as err:
        raise Skipped(f"{err.name or err} is not installed") from None
    checks = []
    for seq in shapes.seqs:
        speed = ctx.speeds[(method, seq)] = _measure_speed(ctx, sides, seq, broken)
        compiled = speed.get(bench.HF_COMPILED)
        checks.append(Check("fast", f"speed {method} seq {seq}", "info" if compiled else "fail",
                            f"{speed['ours']:,.0f} tok/s: {speed['ours'] / speed[bench.HF]:.2f}x transformers, "
                            + (f"{speed['ours'] / compiled:.2f}x transformers compiled" if compiled
                               else "transformers compiled failed"),
                            detail=f"transformers {speed[bench.HF]:,.0f} tok/s, compiled ({shapes.compile_backend}) "
                                   + (f"{compiled:,.0f} tok/s" if compiled else f"failed: {broken[0]}")
                                   + f"; {shapes.label()}, batch {shapes.batch}, {ctx.precision}, median of "
                                     f"{shapes.rounds} rounds after {shapes.warmup} warm-up"))
    return checks


def check_speed(ctx: Context) -> list[Check]:
    """Training-step tokens/s (``sweeps/bench.py``'s instruction workload: language modelling, loss on the second
    half) for full fine-tuning and LoRA (r8 on attention) at every length; the target is judged at the middle one."""
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
        ratio = speed["ours"] / speed[bench.HF]
        reference = "transformers" + (" + peft" if method == "lora" else "")
        checks.append(Check("fast", f"target: {method} speed vs {reference}, seq {seq}", ctx.judged(
            ratio >= SPEED_TARGET), f"{ratio:.2f}x", f">= {SPEED_TARGET}x", f"{ctx.precision}, batch "
            f"{ctx.shapes.batch}; ours {speed['ours']:,.0f} tok/s, {reference} {speed[bench.HF]:,.0f} tok/s"))
    return checks


def check_trial(ctx: Context) -> list[Check]:
    """A whole trial against Hugging Face ``Trainer`` (+ ``peft``) as users run it (``sweeps/bench_trial.py``: the
    same SMS-spam examples, batch, epoch and optimisation; each side its own batching), full and LoRA: what users
    compare is a trial, not a step."""
    from sweeps import bench_trial

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
            bench.sync(device)
            started = time.perf_counter()
        torch.matmul(a, b, out=out)
    bench.sync(device)
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
        ours = bench.build_sides(ctx.checkpoint(), "instruction", "full", LoRAConfig(**LORA), ctx.device,
                                 reference=False)
        batch = bench.make_batch("instruction", shapes.batch, seq, 50257, ctx.device)
        tokens_per_s = bench.compare(ours, batch, shapes.rounds, shapes.warmup, ctx.device, ctx.autocast())["ours"]
        del ours
        _free(ctx.device)
    peak, how = matmul_peak(ctx.device, shapes.matmul_n)
    per_token, n = palm_flops_per_token(shapes.config(), seq)
    mfu = tokens_per_s * per_token / peak
    return [Check("fast", f"target: MFU full fine-tuning, seq {seq}", ctx.judged(mfu >= MFU_TARGET), f"{mfu:.1%}",
                  f">= {MFU_TARGET:.0%}", f"{shapes.label()}, batch {shapes.batch}, {ctx.precision}: "
                  f"{tokens_per_s:,.0f} tok/s x {per_token:.3g} FLOPs/token (6N + 12·L·H·Q·T, N = {n:,}) = "
                  f"{tokens_per_s * per_token:.3g} FLOP/s over the measured peak {peak:.3g} FLOP/s ({how})")]


def _training_setup(ctx: Context, method: str, medium: bool) -> tuple[GPT2, Callable[[], torch.Tensor], Any]:
    """A model of the method with the trials' optimizer, and a function computing the task loss of one batch."""
    from model.lora import LoRAConfig
    from model.methods import MethodConfig, apply_method
    from sweeps.optim import OptimConfig, build_optimizer
    from tasks import TaskConfig, get_task

    model = GPT2.from_pretrained(ctx.checkpoint(medium)).to(ctx.device).train()
    apply_method(model, MethodConfig(name=method), LoRAConfig(**LORA), None)
    task = get_task(TaskConfig(name="alpaca"))
    batch = bench.make_batch("instruction", ctx.shapes.memory_batch, ctx.shapes.memory_seq, 50257, ctx.device)

    def loss() -> torch.Tensor:
        with ctx.autocast():
            return task.loss(model, None, batch)[0]

    return model, loss, build_optimizer([model], OptimConfig(lr=1e-5))


def peak_training_bytes(ctx: Context, method: str, medium: bool = True) -> tuple[int, str]:
    """Memory of training with a method: on CUDA the allocator's peak over three steps (the model's weights
    included, what was allocated before left out); elsewhere ``sweeps/memory.py``'s account of one step."""
    from sweeps import memory

    _free(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0
    memory.reset_cuda_peak(ctx.device)
    model, loss, optimizer = _training_setup(ctx, method, medium)
    saved = memory.SavedTensors()
    for step in range(3 if ctx.device.type == "cuda" else 1):
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            with memory.measure_saved([model]) as saved:
                value = loss()
        else:
            value = loss()
        value.backward()
        optimizer.step()
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) - before, "torch.cuda.max_memory_allocated over 3 steps"
    account = (memory.weight_bytes([model]) + memory.weight_bytes([model], trainable_only=True)
               + memory.optimizer_state_bytes(optimizer) + saved.nbytes)
    return account, "memory account (sweeps/memory.py: weights + gradients + optimizer state + saved activations)"


def check_memory(ctx: Context) -> list[Check]:
    """Peak memory of LoRA (r8 on attention) against full fine-tuning of the medium model, same batch and length."""
    full, source = peak_training_bytes(ctx, "full")
    lora, _ = peak_training_bytes(ctx, "lora")
    _free(ctx.device)
    ratio = lora / full
    return [Check("fast", f"target: LoRA peak memory vs full, {ctx.shapes.medium}", ctx.judged(ratio <= MEMORY_TARGET),
                  f"{ratio:.2f}x", f"<= {MEMORY_TARGET}x", f"LoRA {lora / 2**20:,.0f} MiB, full {full / 2**20:,.0f} "
                  f"MiB; {ctx.shapes.label(medium=True)}, batch {ctx.shapes.memory_batch} x {ctx.shapes.memory_seq}, "
                  f"{ctx.precision}, AdamW; {source}")]


# --------------------------------------------------------------------------------------------------------------------
# A study's cost on this machine
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrialPhases:
    """Where one trial's wall time went, from ``run_trial``'s call to its final record (seconds)."""

    wall_s: float
    setup_s: float  # FinalRecord.setup_seconds: model, data, method, optimizer
    before_first_step_s: float  # call -> first optimizer step starts (setup, the step-0 test baseline)
    training_s: float  # first step starts -> last step ends
    after_last_step_s: float  # last step ends -> final record (final validation and test, memory account)
    steps: int


def trial_config(ctx: Context, seed: int = 0) -> Any:
    from sweeps.config import TrialConfig

    return TrialConfig.from_flat({**ctx.shapes.trial, "train.seed": seed})


def timed_trial(config: Any) -> tuple[TrialPhases, Any]:
    """Run a trial through ``sweeps.loop.run_trial`` and time its parts from the records it emits (every step is
    reported: ``train.log_every=1``); the timing and the final record."""
    from sweeps.loop import run_trial
    from sweeps.records import FinalRecord, StepRecord

    seen: dict[str, float] = {}
    first: list[StepRecord] = []

    def callback(record: Any) -> None:
        now = time.perf_counter()
        if isinstance(record, StepRecord):
            if not first:
                first.append(record)
                seen["first"] = now
            seen["last"] = now
        elif isinstance(record, FinalRecord):
            seen["final"] = now

    started = time.perf_counter()
    record = run_trial(config, callback).record
    first_step = first[0].tokens_seen / first[0].tokens_per_s  # the first step's own seconds
    before = seen["first"] - first_step - started
    return TrialPhases(seen["final"] - started, record.setup_seconds, before, seen["last"] - started - before,
                       seen["final"] - seen["last"], record.step), record


def data_ready(ctx: Context) -> None:
    """Load (and cache) the small trial's data once, as the sweep driver does; Skipped when it cannot be had."""
    from model import TokenizerError, get_tokenizer
    from sweeps.loop import SUBSET_SEED
    from tasks import DataError, get_task

    try:
        get_task(trial_config(ctx).task).load(get_tokenizer(), seed=SUBSET_SEED)
    except (DataError, TokenizerError) as err:
        raise Skipped(f"no data for the small trials ({str(err).splitlines()[0]}); set FINETUNE_DATA_DIR") from None


def db_write_seconds(record: Any, config: Any, workdir: Path) -> float | None:
    """Seconds from a final record to its rows in the study database, as the sweep driver takes them: Ray's report
    (``to_report``), read back (``record_from_report``), then ``ResultsWriter.write_final`` as
    ``sweeps/ray_trial.py``'s DuckDBCallback calls it; None without DuckDB."""
    try:
        import duckdb  # noqa: F401 - only whether it is installed
    except ImportError:
        return None
    from analysis.db import ResultsWriter
    from sweeps.records import record_from_report

    writer = ResultsWriter(workdir / "preflight.duckdb")
    writer.con  # noqa: B018 - the driver holds the file open for the whole sweep: opening is not a trial's cost
    spec = {"trial_id": "preflight-0", "sweep_id": "preflight", "study": "preflight", "dimension": "method",
            "group": "lora", "config": config.to_flat()}
    started = time.perf_counter()
    final = record_from_report(record.to_report())
    writer.write_final(spec, final)
    seconds = time.perf_counter() - started
    writer.close()
    return seconds


def guide_trial_seconds(ctx: Context) -> tuple[float, str]:
    """Median estimated training + evaluation seconds of the guide study's trials at this machine's measured speed
    (``sweeps/study.py``'s estimate with the rates of the speed check; assumed rates when it did not run)."""
    from sweeps.study import PreflightRates, assumed_cost, load_study, plan

    flops = rates(ctx, {"device": "", "date": ""})["train_flops_per_s"]
    measured = PreflightRates("this run", "", "", False, flops, None, {})
    seconds = sorted(c.train_s + c.eval_s for c in
                     (assumed_cost(t.config, "gpu", measured) for t in plan(load_study("guide"), "preflight")))
    source = f"training FLOP/s measured here ({ctx.shapes.label()})" if flops else "assumed rates"
    return seconds[len(seconds) // 2], source


def check_overhead(ctx: Context) -> list[Check]:
    """A trial's overhead: what it spends doing no study work (setup before the first step, and the write of its
    row into the database), as a share of a guide-study trial's wall time. Evaluations are study work (they make the
    numbers the guide reports), so they are shown but not counted. Measured on the second small LoRA trial of this
    process, as a reused Ray worker runs them; the first, cold one is in the detail."""
    data_ready(ctx)
    cold, _ = timed_trial(trial_config(ctx, 0))
    warm, record = timed_trial(trial_config(ctx, 1))
    db = db_write_seconds(record, trial_config(ctx, 1), ctx.workdir)
    ctx.rates["setup_seconds"] = warm.setup_s
    fixed = warm.setup_s + (db or 0.0)
    typical, source = guide_trial_seconds(ctx)
    wall = warm.wall_s + (db or 0.0)
    parts = {"setup": warm.setup_s, "step-0 test baseline": warm.before_first_step_s - warm.setup_s,
             "training": warm.training_s, "final evaluation": warm.after_last_step_s, "DB write": db}
    shown = "; ".join(f"{name} {s:.2f} s ({s / wall:.1%})" if s is not None else
                      f"{name} not measured (duckdb not installed)" for name, s in parts.items())
    trial, share = ctx.shapes.trial, fixed / (fixed + typical)
    return [Check("cost", "target: trial overhead share of a guide-study trial", ctx.judged(share <= OVERHEAD_TARGET),
                  f"{share:.1%} ({fixed:.2f} s of setup and DB write per trial; median guide trial "
                  f"{typical:,.0f} s of training and evaluation)", f"<= {OVERHEAD_TARGET:.0%}",
                  f"guide trials estimated from {source}. The small LoRA trial measured ({trial['task.name']}, "
                  f"{warm.steps} steps of {trial['train.batch_size']}, {trial['task.max_eval_examples']} evaluation "
                  f"examples per split, {ctx.shapes.label()}, random init): {shown}; outside its steps "
                  f"{(wall - warm.training_s) / wall:.1%} of its wall time (evaluation included), the first, cold "
                  f"trial of the process {(cold.before_first_step_s + cold.after_last_step_s) / cold.wall_s:.1%} "
                  "(before the DB write)")]


WORKER_TAG = "PREFLIGHT-WORKER "


def worker(cpu: bool) -> None:
    """A packing worker (a subprocess): says it is ready, then runs the small trials it is sent back to back through
    ``sweeps.loop.run_trial`` and replies with their wall seconds; one JSON line each way."""
    from sweeps.config import TrialConfig

    if not cpu and torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context, as a Ray worker holding its GPU share has it
    print(WORKER_TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            return
        torch.set_num_threads(command["threads"])
        walls = []
        for seed in range(command["trials"]):
            started = time.perf_counter()
            timed_trial(TrialConfig.from_flat({**command["config"], "train.seed": seed}))
            walls.append(time.perf_counter() - started)
        print(WORKER_TAG + json.dumps({"walls": walls}), flush=True)


class PackingWorker:
    """One ``worker`` subprocess, its stdout read by a thread (so a dead or hung worker cannot block the report)."""

    def __init__(self, cpu: bool, log: Path) -> None:
        import queue
        import subprocess
        import threading

        self.log_path = log
        self._log = log.open("w")
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-c", f"from sweeps.preflight import worker; worker({cpu})"],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env={**os.environ, "PYTHONPATH": path})
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(WORKER_TAG):
                self.lines.put(line[len(WORKER_TAG):])
        self.lines.put(None)

    def send(self, command: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 600) -> dict[str, Any]:
        import queue

        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"packing worker {self.proc.pid} gave no answer in {timeout:.0f} s") from None
        if line is None:
            tail = self.log_path.read_text()[-1500:]
            raise RuntimeError(f"packing worker {self.proc.pid} exited ({self.proc.wait()}): {tail}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.send({"quit": True})
            self.proc.wait(timeout=30)
        except Exception:  # a dead or hung worker: end it (it is ours, started above)
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextmanager
def worker_pool(n: int, ctx: Context) -> Iterator[list[PackingWorker]]:
    """``n`` ready workers, ended however the block ends."""
    workers: list[PackingWorker] = []
    try:
        for i in range(n):
            workers.append(PackingWorker(ctx.shapes.cpu, ctx.workdir / f"worker-{i}.log"))
        for w in workers:
            w.receive()
        yield workers
    finally:
        for w in workers:
            w.close()


def _round(workers: list[PackingWorker], config: dict[str, Any], trials: int, threads: int | None = None) -> float:
    """Seconds for every worker to run ``trials`` small trials back to back, all at once (CPU threads shared, or
    ``threads`` each)."""
    started = time.perf_counter()
    for w in workers:
        w.send({"config": config, "trials": trials,
                "threads": threads or max(1, (os.cpu_count() or 1) // len(workers))})
    for w in workers:
        w.receive()
    return time.perf_counter() - started


def check_packing(ctx: Context) -> list[Check]:
    """Trials per hour with k small LoRA trials at once on the device against one at a time. k plain processes
    share the GPU exactly as Ray's fractional GPUs (``--gpus-per-trial 1/k``) have k workers share it; each runs its
    trials back to back through ``sweeps.loop.run_trial``, after one warm-up trial all together (as reused Ray
    workers are warm)."""
    data_ready(ctx)
    shapes, n = ctx.shapes, ctx.shapes.trials_per_worker
    per_hour = {}
    with worker_pool(max(shapes.packing), ctx) as workers:
        threads = 1 if shapes.cpu else None  # as the preflight itself runs in --cpu mode
        _round(workers, shapes.trial, 1, threads)
        for k in shapes.packing:
            per_hour[k] = k * n * 3600 / _round(workers[:k], shapes.trial, n, threads)
    gains = {k: rate / per_hour[shapes.packing[0]] for k, rate in per_hour.items()}
    best = max(gains, key=gains.__getitem__)
    ctx.rates["packing"] = {str(k): round(g, 3) for k, g in gains.items()}
    try:
        ray = f"Ray {metadata.version('ray')} is installed; measured without it"
    except metadata.PackageNotFoundError:
        ray = "Ray is not installed here"
    return [Check("cost", "target: packing small LoRA trials", ctx.judged(gains[best] >= PACKING_TARGET),
                  f"{gains[best]:.2f}x trials/hour at {best} per {'GPU' if not shapes.cpu else 'CPU'}",
                  f">= {PACKING_TARGET}x", "; ".join(f"{k} at once: {per_hour[k]:,.0f} trials/hour ({gains[k]:.2f}x)"
                                                      for k in shapes.packing)
                  + f". {n} trials per process back to back, {shapes.label()}; plain concurrent processes ({ray}), "
                    "as Ray's fractional GPUs run k workers at once on one GPU")]


# --------------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------------

# check name -> (section, function), in the order they run
CHECKS: dict[str, tuple[str, Callable[[Context], list[Check]]]] = {
    "logits": ("correct", check_logits), "sdpa": ("correct", check_sdpa), "compile": ("correct", check_compile),
    "fused_adamw": ("correct", check_fused_adamw), "speed": ("fast", check_speed), "trial": ("fast", check_trial),
    "mfu": ("fast", check_mfu),
    "memory": ("fast", check_memory), "overhead": ("cost", check_overhead), "packing": ("cost", check_packing),
}


@dataclass
class Report:
    """The environment, every check, what each check took, and the rates the dry run costs studies with."""

    environment: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> str:
        return json.dumps({"environment": self.environment, "checks": [asdict(c) for c in self.checks],
                           "seconds": self.seconds, "rates": self.rates}, indent=1)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, shapes: Shapes) -> dict[str, Any]:
    """What ran where: the device, package versions (those missing named so), bf16 support, cores, the shapes."""
    cuda = device.type == "cuda"
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "mode": "cpu" if shapes.cpu else "gpu",
            "device": torch.cuda.get_device_name(device) if cuda else f"CPU: {_cpu_name()}",
            "device_type": device.type, "cuda": torch.version.cuda if cuda else None,
            "bf16": (torch.cuda.is_bf16_supported() if cuda else
                     f"autocast on CPU (capability {torch.backends.cpu.get_cpu_capability()})"),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "peft", "tiktoken", "ray", "duckdb")},
            "shapes": asdict(shapes)}


def _error_check(section: str, name: str, err: BaseException) -> Check:
    where = traceback.extract_tb(err.__traceback__)[-1]
    return Check(section, name, "fail", "error", detail=f"{type(err).__name__}: {str(err).strip()[:1500]} "
                                                         f"({Path(where.filename).name}:{where.lineno})")


def run_checks(ctx: Context, names: list[str], report: Report, echo: Callable[[Check], None]) -> None:
    """Each named check in turn; one that raises becomes a ``fail`` with its error, one that cannot run here a
    ``skipped`` with the reason, and the next runs regardless."""
    for name in names:
        section, check = CHECKS[name]
        started = time.perf_counter()
        try:
            checks = check(ctx)
        except Skipped as why:
            checks = [Check(section, name, "skipped", "not run", detail=str(why))]
        except Exception as err:
            checks = [_error_check(section, name, err)]
        finally:
            _free(ctx.device)
        report.seconds[name] = round(time.perf_counter() - started, 2)
        for c in checks:
            report.checks.append(c)
            echo(c)


def rates(ctx: Context, env: dict[str, Any]) -> dict[str, Any]:
    """What the dry run takes: training FLOP/s counted as ``sweeps/study.py`` counts them (``method_flops_factor``
    x ``shape_params``, so a trial's seconds come back as its tokens over the measured tokens/s), at the shortest
    length (the tasks' examples are 25-250 tokens); setup seconds; packing gains. Unmeasured ones are null."""
    shapes, seq = ctx.shapes, ctx.shapes.seqs[0]
    config = shapes.config()
    params = shape_params(config.n_layer, config.n_embd)
    tokens = {m: ctx.speeds[(m, seq)]["ours"] for m in ("full", "lora") if (m, seq) in ctx.speeds}
    packing = ctx.rates.get("packing") or {}
    best = max(packing, key=packing.__getitem__) if packing else None
    return {"device": env["device"], "date": env["date"], "cpu_mode": shapes.cpu, "model": shapes.label(),
            "seq": seq, "batch": shapes.batch, "precision": ctx.precision, "train_tokens_per_s": tokens,
            "train_flops_per_s": {m: t * method_flops_factor(m) * params for m, t in tokens.items()},
            "flops_per_token": f"sweeps.study: {method_flops_factor('full')} (full) or "
                               f"{method_flops_factor('lora')} (frozen weights) x {params:,} parameters",
            "setup_seconds": ctx.rates.get("setup_seconds"), "packing": packing,
            "best_packing": {"trials_per_gpu": int(best), "speedup": packing[best]} if best else None}


MARK = {"pass": "PASS", "fail": "FAIL", "info": "info", "skipped": "skip"}


def check_line(check: Check) -> str:
    """A check as the printed report shows it."""
    target = f" (target {check.target})" if check.target else ""
    return f"  {MARK[check.status]:<5} {check.name}: {check.figure}{target}" + (
        f"\n        {check.detail}" if check.detail else "")


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    """The report as Markdown: where and when it ran, one table per section, the stored rates, the time taken."""
    env = report.environment
    lines = [f"# GPU preflight ({env['mode']} mode)", "",
             f"{env['date']} on {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env['transformers']}, peft {env['peft']}, Ray {env['ray']}, DuckDB {env['duckdb']}; bf16: {env['bf16']}; "
             f"{env['cpu_cores']} CPU cores.", ""]
    if env["mode"] == "cpu":
        lines += ["`--cpu` mode: tiny shapes on a CPU check that every part runs; targets are shown, not judged.", ""]
    for section, title in SECTIONS.items():
        checks = [c for c in report.checks if c.section == section]
        if not checks:
            continue
        lines += [f"## {title}", "", "| check | status | figure | target | how |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(c.name)} | {c.status} | {_cell(c.figure)} | {_cell(c.target)} | {_cell(c.detail)} |"
                  for c in checks]
        lines.append("")
    lines += ["## Rates stored for the dry run", "", "```json", json.dumps(report.rates, indent=1), "```", "",
              "Seconds per check: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def select(only: str | None) -> list[str]:
    """Check names from ``--only``: sections and check names, comma-separated, in run order."""
    if not only:
        return list(CHECKS)
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = wanted - set(CHECKS) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--only: unknown {', '.join(sorted(unknown))}; sections are {', '.join(SECTIONS)}, "
                         f"checks {', '.join(CHECKS)}")
    return [name for name, (section, _) in CHECKS.items() if name in wanted or section in wanted]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """``--cpu`` runs on one thread: tiny shapes gain nothing from more, and on a CPU shared with other work a
    multi-threaded kernel stalls at every barrier a descheduled thread holds (steps 50x slower, measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preflight.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", help=f"comma-separated sections ({', '.join(SECTIONS)}) or checks "
                                       f"({', '.join(CHECKS)})")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (seconds): checks the script runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        names = select(args.only)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device here; the preflight checks a GPU (--cpu runs it on tiny shapes, a check that the "
              "script works)", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()  # the report, not transformers' load notes and bars
    transformers.logging.disable_progress_bar()
    shapes = Shapes.tiny() if args.cpu else Shapes.gpu()
    device = torch.device("cpu" if args.cpu else "cuda")  # another GPU: CUDA_VISIBLE_DEVICES
    report = Report(environment(device, shapes))
    print(f"preflight on {report.environment['device']} ({report.environment['mode']} mode), "
          f"{report.environment['date']}: {', '.join(names)}", flush=True)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="preflight-") as tmp, _threads(1 if args.cpu else threads):
        ctx = Context(shapes, device, Path(tmp))
        current = [""]

        def echo(check: Check) -> None:
            if check.section != current[0]:
                current[0] = check.section
                print(SECTIONS[check.section], flush=True)
            print(check_line(check), flush=True)

        run_checks(ctx, names, report, echo)
        report.rates = rates(ctx, report.environment)
    write_atomic(args.out / "preflight.json", report.to_json())
    write_atomic(args.out / "preflight.md", to_markdown(report))
    print(f"{len(report.checks)} checks, {len(report.failed)} failed, in {sum(report.seconds.values()):.0f} s; report "
          f"{args.out / 'preflight.json'} and {args.out / 'preflight.md'}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
