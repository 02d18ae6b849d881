"""The preflight's "Correct on this device" checks: our logits against ``transformers``, the SDPA backend our
attention runs, a compiled training step's loss against eager, fused AdamW."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model import GPT2
from sweeps.bench.context import Check, Context
from sweeps.bench.step import make_batch
from sweeps.bench.timing import sync


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
    batch = make_batch("instruction", ctx.shapes.batch, ctx.shapes.target_seq, 50257, ctx.device)
    losses, first = [], 0.0
    for _ in range(2):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss, _ = task.loss(model, None, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        sync(ctx.device)
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

