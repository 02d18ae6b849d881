"""The rates a preflight report stores for the dry run, from what its checks measured."""

from __future__ import annotations

from typing import Any

from sweeps.bench.context import Context
from sweeps.costs import method_flops_factor, shape_params


def rates(ctx: Context, env: dict[str, Any]) -> dict[str, Any]:
    """What the dry run takes: training FLOP/s counted as ``sweeps/costs.py`` counts them (``method_flops_factor``
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
            "flops_per_token": f"sweeps.costs: {method_flops_factor('full')} (full) or "
                               f"{method_flops_factor('lora')} (frozen weights) x {params:,} parameters",
            "setup_seconds": ctx.rates.get("setup_seconds"), "packing": packing,
            "best_packing": {"trials_per_gpu": int(best), "speedup": packing[best]} if best else None}

