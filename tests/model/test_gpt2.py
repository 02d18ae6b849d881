"""The model computes what `transformers` computes: logits, padding, generation; configs validate themselves."""

from __future__ import annotations

import pytest
import torch

from model import GPT2, PRESETS, ConfigError, GPT2Config, KVCache, eval_mode, last_token_hidden
from tests.model.conftest import TINY, hf_gpt2

TOL = 1e-4  # float32 max |Δlogit| the issue allows


def _right_padded(batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 3 * row :] = 0  # rows end 3, 6, ... tokens early
        ids[row, length - 3 * row :] = 0  # pad id: anything, it must not matter
    return ids, mask


# Real 124M shape, then the medium / large / xl widths (and head counts) with fewer layers.
PARITY_SHAPES = {
    "gpt2-124M": dict(n_layer=12, n_head=12, n_embd=768),
    "medium-width": dict(n_layer=2, n_head=16, n_embd=1024),
    "large-width": dict(n_layer=2, n_head=20, n_embd=1280),
    "xl-width": dict(n_layer=1, n_head=25, n_embd=1600),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=list(PARITY_SHAPES))
def test_logit_parity_with_transformers(shape: str, tmp_path) -> None:
    hf = hf_gpt2(**PARITY_SHAPES[shape])
    hf.save_pretrained(tmp_path)
    ours = GPT2.from_pretrained(tmp_path).eval()
    ids, mask = _right_padded(3, 24, 50257)
    with torch.no_grad():
        unpadded = (ours(ids) - hf(ids).logits).abs().max().item()
        ours_padded = ours(ids, attention_mask=mask)
        hf_padded = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    padded = (ours_padded[real] - hf_padded[real]).abs().max().item()
    assert unpadded <= TOL, f"{shape}: max |Δlogit| {unpadded:.2e} without padding"
    assert padded <= TOL, f"{shape}: max |Δlogit| {padded:.2e} on a right-padded batch"


def test_padding_does_not_change_real_positions(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path).eval()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        alone = model(ids)[0]
        right = model(torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1),
                      torch.tensor([[1] * 12 + [0] * 5]))[0, :12]
        left = model(torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1),
                     torch.tensor([[0] * 5 + [1] * 12]))[0, 5:]
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    assert torch.isfinite(model(torch.zeros(1, 6, dtype=torch.long), torch.tensor([[0] * 3 + [1] * 3]))).all()


def test_last_token_hidden_reads_last_real_token() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(last_token_hidden(hidden, right), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.equal(last_token_hidden(hidden, left), hidden[:, 4])
    assert torch.equal(last_token_hidden(hidden, None), hidden[:, 4])


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_last_token_states_equal_full_pass_values_and_gradients(padding: str) -> None:
    """The last block computing only the read position gives what the full pass gives there: outputs and every
    parameter's gradient (dropout off), on unpadded, right- and left-padded batches."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=1000, n_positions=64))
    ids, mask = _right_padded(3, 12, 1000)
    mask = {"none": None, "right": mask, "left": mask.flip(1)}[padding]
    full = last_token_hidden(model.hidden_states(ids, mask), mask)
    full.pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    last = model.last_token_states(ids, mask)
    last.pow(2).sum().backward()
    torch.testing.assert_close(last, full, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():  # float32 summation order differs: relative to the gradient's scale
        error = (param.grad - expected[name]).abs().max() / expected[name].abs().max()
        assert error < 1e-4, f"{name}: gradient differs by {error:.1e} of its largest entry"


@pytest.mark.parametrize("entry", ["hidden_states", "last_token_states"])
def test_activation_checkpointing_keeps_values_and_gradients_and_saves_less(entry: str) -> None:
    """With dropout on, so the recomputation must draw the same masks: the same outputs and gradients, while autograd
    keeps far fewer bytes between forward and backward (each block's input instead of its activations). Without
    gradients the blocks run as they are."""
    model = GPT2(GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=1000, n_positions=64).with_dropout(0.1)).train()
    ids, mask = _right_padded(3, 12, 1000)
    results = {}
    for checkpointed in (False, True):
        model.checkpoint_activations(checkpointed)
        model.zero_grad()
        saved: list[int] = []

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.untyped_storage().nbytes() if not isinstance(tensor, torch.nn.Parameter) else 0)
            return tensor

        torch.manual_seed(7)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = getattr(model, entry)(ids, mask)
        out.pow(2).sum().backward()
        results[checkpointed] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)
    (plain_out, plain_grads, plain_saved), (ck_out, ck_grads, ck_saved) = results[False], results[True]
    torch.testing.assert_close(ck_out, plain_out, atol=1e-6, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ck_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert ck_saved < 0.3 * plain_saved, (ck_saved, plain_saved)
    with torch.no_grad():
        assert model._blocks(None) == list(model.h)  # nothing to keep for a backward that will not come


@pytest.mark.slow
def test_compiled_blocks_serve_every_pass_and_leave_generation_eager() -> None:
    """``compile_blocks`` compiles what training and evaluation call (``hidden_states``, ``last_token_states``; a
    compiled ``forward`` alone would miss both), with unchanged values; cached generation runs the eager blocks."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, n_positions=64)).eval()
    ids, mask = _right_padded(2, 10, 1000)
    expected = model.hidden_states(ids, mask), model.last_token_states(ids, mask), model.generate(ids, 6)
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend="aot_eager")
    torch.testing.assert_close(model.hidden_states(ids, mask), expected[0])
    torch.testing.assert_close(model.last_token_states(ids, mask), expected[1])
    traced = counters["stats"]["unique_graphs"]
    assert traced >= 2  # the whole-sequence block and the last-position block
    assert torch.equal(model.generate(ids, 6), expected[2])
    assert counters["stats"]["unique_graphs"] == traced  # the growing cache compiled nothing
    assert set(model.state_dict()) == set(GPT2(model.config).state_dict())


# --- generation --------------------------------------------------------------------------------------------------------


def test_greedy_generation_matches_transformers(tiny_checkpoint) -> None:
    hf, path = tiny_checkpoint
    ours = GPT2.from_pretrained(path)
    prompt = torch.randint(0, 1000, (3, 7))
    eos = TINY["vocab_size"] - 1
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)
    got = ours.generate(prompt, max_new_tokens=20, eos_token_id=eos)
    assert got.shape == (3, 27)
    assert torch.equal(got, expected)


def test_kv_cache_and_no_cache_agree(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path)
    prompt = torch.randint(0, 1000, (2, 5))
    cached = model.generate(prompt, max_new_tokens=20)
    uncached = model.generate(prompt, max_new_tokens=20, use_cache=False)
    assert torch.equal(cached, uncached)
    sampled = [model.generate(prompt, 20, temperature=0.9, top_k=50, top_p=0.9, seed=7, use_cache=c) for c in (1, 0)]
    assert torch.equal(*sampled)


def test_kv_cache_step_logits_equal_full_forward(tiny_checkpoint) -> None:
    """Token-by-token logits through the cache equal one full forward pass, with and without left padding."""
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path).eval()
    ids = torch.randint(0, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    for attention_mask in (None, mask):
        with torch.no_grad():
            full = model(ids, attention_mask)
            cache = KVCache(model.config, 2, 12, ids.device, torch.float32)
            prefix = None if attention_mask is None else attention_mask[:, :5]
            steps = [model(ids[:, :5], prefix, cache)]
            for t in range(5, 12):
                step_mask = None if attention_mask is None else attention_mask[:, t : t + 1]
                steps.append(model(ids[:, t : t + 1], step_mask, cache))
        real = torch.ones(2, 12, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=1e-5, rtol=0)


def test_left_padded_batch_generates_each_prompt_as_alone(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path)
    short, long = torch.randint(0, 1000, (1, 4)), torch.randint(0, 1000, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    out = model.generate(batch, 12, attention_mask=mask)
    assert torch.equal(out[0, 5:], model.generate(short, 12)[0])
    assert torch.equal(out[1], model.generate(long, 12)[0])


def test_sampling_is_seeded_and_filters_reduce_to_greedy(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path)
    prompt = torch.randint(0, 1000, (2, 5))
    a = model.generate(prompt, 15, temperature=1.0, seed=3)
    assert torch.equal(a, model.generate(prompt, 15, temperature=1.0, seed=3))
    assert not torch.equal(a, model.generate(prompt, 15, temperature=1.0, seed=4))
    greedy = model.generate(prompt, 15)
    assert torch.equal(model.generate(prompt, 15, temperature=1.0, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(prompt, 15, temperature=1.0, top_p=1e-6, seed=1), greedy)


def test_eos_stops_generation_and_fills_finished_rows(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path)
    prompt = torch.randint(0, 1000, (2, 4))
    free = model.generate(prompt, 10, temperature=1.0, seed=5)  # sampled: a greedy tiny model repeats one token
    # row 0 ends at the first new token not seen among its earlier new tokens, from the third on
    stop = next(i for i in range(6, 14) if int(free[0, i]) not in free[0, 4:i].tolist())
    eos = int(free[0, stop])
    out = model.generate(prompt, 10, temperature=1.0, seed=5, eos_token_id=eos)
    assert torch.equal(out[0, : stop + 1], free[0, : stop + 1])
    assert (out[0, stop + 1 :] == eos).all()


def test_generate_rejects_bad_arguments(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    model = GPT2.from_pretrained(path)
    prompt = torch.zeros(1, 4, dtype=torch.long)
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"max_new_tokens": 100}):
        with pytest.raises(ValueError):
            model.generate(prompt, **{"max_new_tokens": 5, **kwargs})


# --- configuration -----------------------------------------------------------------------------------------------------

# Parameter counts of the released checkpoints (tied LM head counted once).
RELEASED_SIZES = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_released_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = GPT2(GPT2Config.from_preset(name))
    assert model.num_parameters() == RELEASED_SIZES[name]
    assert GPT2Config.from_preset(f"openai-community/{name}") == GPT2Config.from_preset(name)


def test_state_dict_uses_gpt2_names() -> None:
    keys = set(GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)).state_dict())
    assert keys == {
        "wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias",
        *(f"h.0.{m}.{p}" for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
          for p in ("weight", "bias")),
    }


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        GPT2Config(n_embd=100, n_head=3, attn_pdrop=1.5, n_layer=0, layer_norm_epsilon=-1)
    message = str(err.value)
    for expected in ("n_layer", "divisible by n_head", "attn_pdrop", "layer_norm_epsilon"):
        assert expected in message
    with pytest.raises(ConfigError, match="unknown GPT-2 preset"):
        GPT2Config.from_preset("gpt3")


def test_dropout_is_active_only_in_training() -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16).with_dropout(0.5)
    model = GPT2(config)
    ids = torch.randint(0, 32, (2, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_eval_mode_restores_the_previous_mode_even_on_error() -> None:
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16))
    model.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training and not model.h[0].training
        raise RuntimeError("boom")
    assert model.training and model.h[0].training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_bfloat16_logits_close_to_float32(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        f32 = GPT2.from_pretrained(path).eval()(ids)
        bf16 = GPT2.from_pretrained(path, dtype=torch.bfloat16).eval()(ids)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - f32).abs().max().item() < 0.05 * f32.abs().max().item()
