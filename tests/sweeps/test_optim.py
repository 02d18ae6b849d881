"""Every optimizer × schedule builds from plain config values and steps; LR curves follow their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model import GPT2, ConfigError, GPT2Config
from sweeps.optim import (
    OPTIMIZERS,
    SCHEDULES,
    EmbeddingGrads,
    OptimConfig,
    ScheduleConfig,
    build_optimizer,
    build_scheduler,
    param_groups,
)

TOTAL, WARMUP = 110, 10


def _tiny() -> tuple[GPT2, nn.Linear]:
    return GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8)), nn.Linear(8, 2)


def _definition(schedule: str, step: int) -> float:
    """Learning-rate multiplier at ``step`` as each schedule is defined (written here independently)."""
    if step < WARMUP:
        return step / WARMUP
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return {
        "constant": 1.0,
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
        "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1.0))),  # 2 cycles
        "inverse_sqrt": math.sqrt(WARMUP / step),
    }[schedule]


@pytest.mark.parametrize("optimizer", [pytest.param(o, marks=pytest.mark.slow) if o == "adamw8bit" else o
                                       for o in OPTIMIZERS])  # the 8-bit step compiles on first use: seconds
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_combination_builds_and_steps(optimizer: str, schedule: str) -> None:
    model, head = _tiny()
    opt = build_optimizer([model, head], OptimConfig(name=optimizer, lr=1e-2, weight_decay=0.1))
    sched = build_scheduler(opt, ScheduleConfig(name=schedule, warmup_steps=2), total_steps=5)
    before = model.h[0].mlp.c_fc.weight.detach().clone()
    for _ in range(3):
        loss = head(model.hidden_states(torch.randint(0, 20, (2, 6)))[:, -1]).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert not torch.equal(model.h[0].mlp.c_fc.weight, before)
    if optimizer == "adamw8bit":
        from torchao.optim import AdamW8bit

        assert type(opt) is AdamW8bit
        return
    expected_type = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
                     "adafactor": torch.optim.Adafactor}[optimizer]
    assert type(opt) is expected_type


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_curve_matches_the_definition(schedule: str) -> None:
    model, _ = _tiny()
    opt = build_optimizer([model], OptimConfig(lr=2.0))
    sched = build_scheduler(opt, ScheduleConfig(name=schedule, warmup_steps=WARMUP), total_steps=TOTAL)
    checkpoints = {0, 5, 10, 35, 60, 85, 109}
    seen = {}
    for step in range(TOTAL):
        if step in checkpoints:
            seen[step] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
    for step, lr in seen.items():
        assert lr == pytest.approx(2.0 * _definition(schedule, step), abs=1e-9), f"{schedule} at step {step}"


@pytest.mark.parametrize("warmup", [{}, {"warmup_steps": 3}, {"warmup_ratio": 0.25}])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_step_equals_transformers_get_scheduler(schedule: str, warmup: dict) -> None:
    """The reference the formulas come from, step for step, with and without warmup and past the last step."""
    from transformers import get_scheduler

    config, total = ScheduleConfig(name=schedule, num_cycles=3, **warmup), 17
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    extra = {"num_training_steps": total} if schedule not in ("constant", "inverse_sqrt") else {}
    if schedule == "cosine_with_restarts":
        extra["scheduler_specific_kwargs"] = {"num_cycles": 3}
    ours_opt, ref_opt = (build_optimizer([_tiny()[0]], OptimConfig(lr=2.0)) for _ in range(2))
    ours = build_scheduler(ours_opt, config, total_steps=total)
    ref = get_scheduler(name, ref_opt, num_warmup_steps=config.warmup_for(total), **extra)
    for step in range(total + 3):
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), abs=1e-12), f"{schedule} at step {step}"
        ours_opt.step(), ours.step(), ref_opt.step(), ref.step()


def test_warmup_ratio_counts_from_total_steps() -> None:
    assert ScheduleConfig(warmup_ratio=0.1).warmup_for(110) == 11
    assert ScheduleConfig(warmup_steps=7).warmup_for(110) == 7


def test_weight_decay_only_on_matrices() -> None:
    model, head = _tiny()
    decay, no_decay = param_groups([model, head], weight_decay=0.1)
    named = {id(p): n for n, p in [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {named[id(p)] for p in decay["params"]} == {
        "h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight",
        "head.weight",
    }
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.weight", "head.bias"} <= {
        named[id(p)] for p in no_decay["params"]
    }


def test_frozen_parameters_stay_out_of_the_optimizer() -> None:
    model, head = _tiny()
    model.requires_grad_(False)
    opt = build_optimizer([model, head], OptimConfig())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 8 * 2 + 2
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([model], OptimConfig())


def test_invalid_values_are_all_named() -> None:
    with pytest.raises(ConfigError) as err:
        OptimConfig(name="lion", lr=-1e-3, beta2=1.0, nesterov=True, momentum=0.0, weight_decay=-0.1)
    assert set(err.value.keys()) == {"name", "lr", "beta2", "weight_decay"}
    with pytest.raises(ConfigError) as err:
        ScheduleConfig(name="step", warmup_steps=-1, num_cycles=0)
    assert set(err.value.keys()) == {"name", "warmup_steps", "num_cycles"}
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        ScheduleConfig(warmup_steps=5, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="Nesterov"):
        OptimConfig(name="sgd", nesterov=True, momentum=0.0)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_uses_the_fused_kernel_on_cpu_with_the_same_update(name: str) -> None:
    """The fused kernel is chosen on CPU and gives the foreach kernel's parameters after a few steps."""
    torch.manual_seed(0)
    model, _ = _tiny()
    twin, _ = _tiny()
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer([model], OptimConfig(name=name, lr=1e-2, weight_decay=0.1))
    assert fused.defaults["fused"] is True
    reference_cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    reference = reference_cls(param_groups([twin], 0.1), lr=1e-2, foreach=True)
    inputs = [torch.randint(0, 20, (2, 8)) for _ in range(3)]
    for m, opt in ((model, fused), (twin, reference)):
        for x in inputs:
            opt.zero_grad()
            m(x).float().pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kept_embedding_gradient_buffers_give_the_dense_gradient_bit_for_bit() -> None:
    """``EmbeddingGrads`` (a CPU speed-up of classification trials) must not change what training computes:
    two micro-batches with repeated tokens, summed exactly as the dense backward and its accumulation sum them."""
    torch.manual_seed(0)
    table = nn.Embedding(50, 8)
    ids = [torch.randint(0, 12, (4, 9)) for _ in range(4)]  # few distinct tokens: many repeated rows
    upstream = [torch.randn(4, 9, 8) for _ in range(4)]
    dense = []
    for step in range(2):  # two steps of two micro-batches, the second step over rows the first touched
        table.weight.grad = None
        for i in (2 * step, 2 * step + 1):
            (table(ids[i]) * upstream[i]).sum().backward()
        dense.append(table.weight.grad.clone())
    grads = EmbeddingGrads.attach([table])
    assert grads is not None and table.sparse
    for step in range(2):
        table.weight.grad = None
        for first, i in ((True, 2 * step), (False, 2 * step + 1)):
            (table(ids[i]) * upstream[i]).sum().backward()
            grads.collect(first)
        grads.apply()
        assert not table.weight.grad.is_sparse and torch.equal(table.weight.grad, dense[step])
    grads.release()
    assert not table.sparse


def test_lora_plus_puts_b_in_its_own_group_at_ratio_times_the_rate() -> None:
    """LoRA+: B at ``lora.lr_ratio`` × lr, A and the head at lr; one AdamW step equals torch's own over the same
    groups written out here, and the schedule scales every group alike."""
    from model.lora import LoRAConfig, lora_layers, lora_plus_lr_scales
    from model.methods import MethodConfig, apply_method

    model, head = _tiny()
    apply_method(model, MethodConfig(name="lora"), LoRAConfig(rank=2, targets="all"), head)
    assert lora_plus_lr_scales(model, 1.0) == {}  # plain LoRA: the groups it always had
    opt = build_optimizer([model, head], OptimConfig(lr=1e-2), lora_plus_lr_scales(model, 16.0))
    b_ids = {id(layer.lora_B) for _, layer in lora_layers(model)}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_lr) == {1e-2, 0.16} and by_lr[0.16] == b_ids and not by_lr[1e-2] & b_ids

    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B)  # a non-zero B, so A's gradient is not zero
    reference = torch.optim.AdamW(
        [{"params": [p.detach().clone().requires_grad_() for p in g["params"]], "lr": g["lr"],
          "weight_decay": g["weight_decay"]} for g in opt.param_groups], foreach=True)
    head(model.hidden_states(torch.randint(0, 20, (2, 6)))[:, -1]).pow(2).sum().backward()
    for group, ref_group in zip(opt.param_groups, reference.param_groups, strict=True):
        for p, q in zip(group["params"], ref_group["params"], strict=True):
            q.grad = p.grad.clone()
    scheduler = build_scheduler(opt, ScheduleConfig(name="linear", warmup_steps=0), total_steps=4)
    opt.step(), reference.step()
    for group, ref_group in zip(opt.param_groups, reference.param_groups, strict=True):
        for p, q in zip(group["params"], ref_group["params"], strict=True):
            torch.testing.assert_close(p, q)
    scheduler.step()
    assert sorted(g["lr"] for g in opt.param_groups)[-1] == pytest.approx(0.16 * 3 / 4)
    assert sorted(g["lr"] for g in opt.param_groups)[0] == pytest.approx(1e-2 * 3 / 4)


@pytest.mark.slow  # torchao compiles the 8-bit step on first use: seconds
def test_adamw8bit_steps_like_adamw_with_a_quarter_of_the_state(monkeypatch) -> None:
    """torchao's 8-bit AdamW on CPU: a few steps land close to torch's AdamW (the moments lose precision, not
    direction), and its state, measured from the tensors' own storages, is about a quarter of AdamW's; tensors under
    4,096 values keep fp32 moments. The account reads the same bytes."""
    from sweeps.memory import optimizer_state_bytes

    torch.manual_seed(0)
    start = torch.randn(256, 64) * 0.02
    runs = {}
    for name in ("adamw", "adamw8bit"):
        param = torch.nn.Parameter(start.clone())
        small = torch.nn.Parameter(torch.zeros(64))
        optimizer = build_optimizer([torch.nn.ParameterList([param, small])], OptimConfig(name=name, lr=1e-3))
        for step in range(3):
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step))
            small.grad = torch.ones(64)
            optimizer.step()
        runs[name] = param.detach().clone(), optimizer
    (exact, adamw), (approx, adamw8) = runs["adamw"], runs["adamw8bit"]
    moved = (exact - start).abs().mean()
    assert (approx - exact).abs().mean() < 0.05 * moved
    storages = sum(part.untyped_storage().nbytes() for state in adamw8.state.values()
                   for value in state.values() if value.dim() > 0
                   for part in ([getattr(value, n) for n in value.__tensor_flatten__()[0]]
                                if hasattr(value, "__tensor_flatten__") else [value]))
    assert optimizer_state_bytes(adamw8) == storages
    big_8bit = optimizer_state_bytes(adamw8) - 2 * 64 * 4  # the small tensor keeps two fp32 moments
    assert big_8bit <= 0.3 * (2 * 256 * 64 * 4), big_8bit
    assert optimizer_state_bytes(adamw) == 2 * (256 * 64 + 64) * 4
