"""GPT-2 from scratch, read top to bottom: attention, MLP, block, model, generation (its config: ``model/config.py``).

Parameter names are GPT-2's own (``wte wpe h.{i}.ln_1 attn.c_attn attn.c_proj ln_2 mlp.c_fc mlp.c_proj ln_f``),
so ``GPT2().state_dict()`` has exactly the keys of OpenAI's checkpoints on the Hugging Face hub. The only layout
difference is that projections are ``nn.Linear`` (``(out, in)`` weights) where Hugging Face uses ``Conv1D``
(``(in, out)``); ``model/checkpoint.py`` transposes them once, at load and at save.

The LM head is the token embedding itself (``F.linear(x, wte.weight)``): one tensor, so freezing or training it is
one decision, never two that can disagree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.checkpoint import hf_to_state_dict, read_pretrained, write_pretrained
from model.config import GPT2Config

# --------------------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values for every layer, filled left to right during generation.

    ``key_mask`` remembers which cached positions are real tokens (False = padding) so that left-padded batches
    generate exactly what each prompt would alone.
    """

    def __init__(
        self, config: GPT2Config, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        if max_len > config.n_positions:
            raise ValueError(f"KV cache of {max_len} positions exceeds n_positions={config.n_positions}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.has_padding = False
        self.pos = 0  # tokens already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ``(B, H, T, D)`` for ``layer``; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# --------------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of every position, or, with ``query_index`` (B,), of one query per row over all keys: the
        output is then (B, 1, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        if query_index is not None:
            q = q[torch.arange(B, device=x.device), query_index][:, None]  # (B, 1, C)
        # (B, T, C) -> (B, T, n_head, head_dim) -> (B, n_head, T, head_dim)
        q = q.view(B, q.size(1), self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_head, past + T, head_dim)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_pdrop if self.training else 0.0,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, q.size(2), C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``query_index`` (B,), only that position of each row: (B, 1, C). Keys and
        values still come from every position, so the one output equals the full block's at that position."""
        if query_index is None:
            x = x + self.attn(self.ln_1(x), attn_mask, is_causal, kv_cache)
        else:
            rows = torch.arange(x.size(0), device=x.device)
            x = x[rows, query_index][:, None] + self.attn(self.ln_1(x), attn_mask, is_causal, kv_cache, query_index)
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros (or all ones): causal attention alone then keeps pads out of real
    positions, so the fast ``is_causal`` kernel (flash attention on GPU) gives exact results."""
    m = attention_mask.to(torch.int8)
    return bool((m[:, 0] == 1).all() and (m[:, :-1] >= m[:, 1:]).all())


def _build_attn_mask(key_mask: torch.Tensor, past: int, q_len: int) -> torch.Tensor:
    """Boolean mask (B, 1, q_len, past + q_len): causal, no attention to padded keys, and every query may see itself
    (a padded query would otherwise attend to nothing, which makes softmax NaN)."""
    k_len = past + q_len
    q_pos = torch.arange(past, k_len, device=key_mask.device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(k_len, device=key_mask.device)[None, :]  # (1, k_len)
    allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :k_len]  # (B, q_len, k_len)
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]  # (B, 1, q_len, k_len), broadcast over heads


class GPT2(nn.Module):
    """GPT-2 language model. ``model(input_ids, attention_mask)`` returns logits ``(batch, time, vocab)``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the stream's variance does not grow.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # forward ----------------------------------------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states after ``ln_f``, ``(batch, time, n_embd)``: what the LM head and task heads read.

        ``attention_mask`` (1 = token, 0 = padding) may pad on either side. Positions count real tokens only, so a
        padded row computes what the same tokens compute unpadded.
        """
        x, attn_mask, is_causal = self._embed(input_ids, attention_mask, kv_cache)
        for block in self._blocks(kv_cache):
            x = block(x, attn_mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += input_ids.size(1)
        return self.ln_f(x)

    def last_token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``last_token_hidden(hidden_states(...))``, ``(batch, n_embd)``, computed without the work nobody reads: the
        last block runs its query, output projection and MLP at each row's last real token only (its keys and values
        still cover every position). A classification head reads nothing else; the saving is most of one block."""
        B, T = input_ids.shape
        index = last_token_index(attention_mask, B, T, input_ids.device)  # (B,)
        x, attn_mask, is_causal = self._embed(input_ids, attention_mask, None)
        blocks = self._blocks(None)
        for block in blocks[:-1]:
            x = block(x, attn_mask, is_causal, None)
        keys = torch.arange(T, device=input_ids.device)[None, :] <= index[:, None]  # (B, T) causal for that query
        if attention_mask is not None:
            keys = keys & attention_mask.bool()
        x = blocks[-1](x, keys[:, None, None, :], False, None, query_index=index)  # (B, 1, C)
        return self.ln_f(x[:, 0])

    def _embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Token + position embeddings ``(B, T, n_embd)`` and how attention must mask: (mask or None, is_causal)."""
        B, T = input_ids.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds n_positions={self.config.n_positions}")

        mask = attention_mask.bool() if attention_mask is not None else None
        if mask is not None and kv_cache is None and _is_right_padded(mask):
            mask = None  # trailing pads cannot influence real positions under causal attention
        if kv_cache is not None:
            if mask is not None:
                kv_cache.key_mask[:, past : past + T] = mask
                kv_cache.has_padding = kv_cache.has_padding or not bool(mask.all())
            mask = kv_cache.key_mask[:, : past + T] if kv_cache.has_padding else None

        if mask is None:
            pos = torch.arange(past, past + T, device=input_ids.device).expand(B, T)  # (B, T)
            attn_mask = None
            is_causal = past == 0 and T > 1  # a single new query may see every cached key
        else:
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, past : past + T]  # (B, T), real tokens counted
            attn_mask = _build_attn_mask(mask, past, T)
            is_causal = False
        return self.drop(self.wte(input_ids) + self.wpe(pos)), attn_mask, is_causal

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` each block (regional compilation: one block's graph, compiled once, serves all) for the
        passes over whole sequences: training and evaluation, through every entry point (``hidden_states``,
        ``last_token_states``, ``forward``). Cached generation keeps the eager blocks: its cache grows a token a step
        and would recompile at every one. Compiling the whole module would not do: ``torch.compile(model)`` compiles
        ``forward`` only, and the task heads call ``hidden_states``."""
        self._compiled = [torch.compile(block, **options) for block in self.h]

    def checkpoint_activations(self, enabled: bool = True) -> None:
        """Activation (gradient) checkpointing per block: while gradients are recorded, each block keeps only its
        input for the backward pass and runs its forward again there, trading about one more forward of compute for
        the activations of all but one block. Dropout draws the same masks the second time (the RNG state is kept).
        Inference and cached generation are unaffected."""
        self.__dict__["_checkpointing"] = enabled  # a plain attribute: not a setting of the weights

    def _blocks(self, kv_cache: KVCache | None) -> list[Callable[..., torch.Tensor]]:
        compiled = self.__dict__.get("_compiled")  # a plain list, so the compiled wrappers add no state_dict keys
        blocks = compiled if compiled is not None and kv_cache is None else list(self.h)
        if self.__dict__.get("_checkpointing") and kv_cache is None and torch.is_grad_enabled():
            return [functools.partial(checkpoint, block, use_reentrant=False) for block in blocks]
        return blocks

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from hidden states through the tied token embedding."""
        return F.linear(hidden, self.wte.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, kv_cache))

    # checkpoints (reading and writing the files: model/checkpoint.py) ------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **config_overrides: Any,
    ) -> GPT2:
        """Load a Hugging Face GPT-2 checkpoint: a local directory or a hub id (``gpt2`` ... ``gpt2-xl``).

        ``config_overrides`` replace fields of the checkpoint's config (e.g. ``embd_pdrop=0.1``); a field that changes
        a tensor's shape makes the strict load fail with the list of mismatches. The model is created on the meta
        device, so no memory or time is spent on a random initialisation that the checkpoint would overwrite.
        """
        config, tensors, source = read_pretrained(name_or_path, **config_overrides)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = hf_to_state_dict(tensors, expected, str(source))
        state = {k: v.to(dtype=dtype).contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers.GPT2LMHeadModel`` loads unchanged: this
        model's weights, or ``state_dict`` (a merged copy of them). Tensors GPT-2 does not have are refused
        (``write_pretrained``)."""
        state = self.state_dict() if state_dict is None else state_dict
        with torch.device("meta"):
            base_keys = set(type(self)(self.config).state_dict())
        return write_pretrained(path, self.config, state, base_keys, next(self.parameters()).dtype)

    # generation -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``input_ids`` by up to ``max_new_tokens``; greedy when ``temperature`` is 0.

        Batched prompts of different lengths are left-padded with ``attention_mask`` marking real tokens. A row that
        emits ``eos_token_id`` is filled with it afterwards; generation ends early once every row has. Returns
        ``(batch, prompt + generated)``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        B, T = input_ids.shape
        total = T + max_new_tokens
        if total > self.config.n_positions:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds n_positions="
                             f"{self.config.n_positions}")
        device = input_ids.device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).bool()
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, total, device, next(self.parameters()).dtype)
        tokens = input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step_input, step_mask = input_ids, mask
        with eval_mode(self):
            for _ in range(max_new_tokens):
                if cache is None:
                    step_input, step_mask = tokens, mask
                logits = self(step_input, step_mask, cache)[:, -1, :].float()  # (B, vocab)
                next_token = _pick(logits, temperature, top_k, top_p, generator)  # (B,)
                if eos_token_id is not None:
                    next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                    finished |= next_token == eos_token_id
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
                step_input, step_mask = next_token[:, None], torch.ones(B, 1, dtype=torch.bool, device=device)
                if eos_token_id is not None and bool(finished.all()):
                    break
        return tokens


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a sample from the top-k / top-p filtered distribution."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) inside the block, and back in the mode it was in afterwards, even when the
    block raises: a policy that generates or scores a reference mid-training must keep training with dropout."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def last_token_index(attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """Each row's last real token, ``(B,)``: for right padding, number of tokens - 1; for left padding (or no mask)
    the last column."""
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    positions = torch.arange(T, device=attention_mask.device)[None, :]
    return (positions * attention_mask.long()).max(dim=1).values  # (B,), index of the rightmost real token


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The hidden state of each row's last real token, ``(batch, n_embd)``; where a classification head reads."""
    B, T, _ = hidden.shape
    index = last_token_index(attention_mask, B, T, hidden.device)
    return hidden[torch.arange(B, device=hidden.device), index]
