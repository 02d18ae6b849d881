"""PEFT's file format (``adapter_config.json`` + ``adapter_model.safetensors``) for our adapters, both ways.

What we write loads with ``peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel..., path)`` and gives our
logits; what PEFT writes for GPT-2 (LoRA, DoRA, PiSSA, gaussian init, rsLoRA, IA3) loads into ours. Settings we do not
compute are refused by name, never ignored.

A PiSSA adapter is written the way PEFT converts one for sharing (``path_initial_model_for_weight_conversion``): the
base weight it trained against is the residual ``W - s·B0 A0``, so the file holds the rank-2r adapter
``[B, -B0] [A; A0]`` (alpha scaled so the scale stays) that applies to the original base weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.adapters import adapter_layers
from model.checkpoint import CheckpointError, write_checkpoint_files
from model.config import ConfigError, Problems
from model.gpt2 import GPT2
from model.ia3 import IA3Config, IA3Linear, apply_ia3
from model.lora import TARGETS, LoRAConfig, LoRALinear, apply_lora

PEFT_PREFIX = "base_model.model.transformer."
CONFIG_FILE, TENSOR_FILE = "adapter_config.json", "adapter_model.safetensors"


def _layers_fields(resolved: list[int], n_layer: int) -> dict[str, Any]:
    all_layers = resolved == list(range(n_layer))
    return {"layers_to_transform": None if all_layers else resolved, "layers_pattern": None if all_layers else "h"}


def _lora_file(model: GPT2, config: LoRAConfig, base_model: str | None) -> tuple[dict, dict]:
    pissa = config.init == "pissa"
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        assert isinstance(layer, LoRALinear)
        a, b = layer.lora_A, layer.lora_B
        if pissa:  # W_res + s·B A = W + s·(B A - B0 A0): a plain rank-2r adapter on the original W
            a, b = torch.cat([a, layer.lora_A0]), torch.cat([b, -layer.lora_B0], dim=1)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        if layer.lora_magnitude is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude
    rank, alpha = config.rank, config.alpha
    if pissa:  # same scale at twice the rank: alpha / r -> 2 alpha / 2r, alpha / √r -> √2 alpha / √(2r)
        rank, alpha = 2 * rank, alpha * (math.sqrt(2) if config.rslora else 2)
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": config.dropout, "use_rslora": config.rslora,
        "use_dora": config.dora, "target_modules": list(config.targets),
        **_layers_fields(config.resolve_layers(model.config.n_layer), model.config.n_layer),
        "fan_in_fan_out": True,  # GPT-2's projections are Conv1D in transformers
        "bias": "none", "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "modules_to_save": None, "inference_mode": True,
    }
    return tensors, settings


def _ia3_file(model: GPT2, config: IA3Config, base_model: str | None) -> tuple[dict, dict]:
    tensors = {f"{PEFT_PREFIX}{name}.ia3_l": _peft_shaped(layer.ia3_l, layer)
               for name, layer in adapter_layers(model) if isinstance(layer, IA3Linear)}
    settings = {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "target_modules": list(config.targets), "feedforward_modules": list(config.feedforward),
        "fan_in_fan_out": True, "init_ia3_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    return tensors, settings


def _peft_shaped(vector: torch.Tensor, layer: IA3Linear) -> torch.Tensor:
    """PEFT keeps IA3's vector as ``(out, 1)``, or ``(1, in)`` for a feed-forward target."""
    return vector.reshape(1, -1) if layer.feedforward else vector.reshape(-1, 1)


def save_peft_adapter(model: GPT2, path: str | Path, base_model: str | None = None) -> Path:
    """Write the model's adapters (LoRA family or IA3) in PEFT's format; the model is not changed."""
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise RuntimeError("adapters are merged into the weights; unmerge_adapters(model) before saving them alone")
    if getattr(model, "lora_config", None) is not None:
        tensors, settings = _lora_file(model, model.lora_config, base_model)
    elif getattr(model, "ia3_config", None) is not None:
        tensors, settings = _ia3_file(model, model.ia3_config, base_model)
    else:
        raise ValueError("model has no adapters to save")
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    return write_checkpoint_files(path, tensors, TENSOR_FILE, {CONFIG_FILE: settings})


# PEFT matches a target by exact name or by suffix after a dot; GPT-2's short names map to ours like this.
_PEFT_TARGET_NAMES = {"c_attn": ("attn.c_attn",), "c_fc": ("mlp.c_fc",), "c_proj": ("attn.c_proj", "mlp.c_proj"),
                      **{t: (t,) for t in TARGETS}}
_LORA_INITS = {True: "default", "gaussian": "gaussian", "pissa": "pissa"}


def _refuse_unsupported(data: dict, expected: dict[str, Any], problems: Problems) -> None:
    for key, ok in expected.items():
        value = data.get(key, ok)
        if value != ok and not (ok is None and not value) and not (ok == {} and not value):
            problems.add(key, f"{value!r} is not supported (expected {ok!r})")


def _targets(data: dict, key: str, problems: Problems) -> list[str]:
    targets = data.get(key)
    if not isinstance(targets, list):
        problems.add(key, f"expected a list of module names, got {targets!r}")
        return []
    names: list[str] = []
    for t in targets:
        if t not in _PEFT_TARGET_NAMES:
            problems.add(key, f"{t!r} is not a GPT-2 projection ({', '.join(_PEFT_TARGET_NAMES)})")
        names.extend(_PEFT_TARGET_NAMES.get(t, ()))
    return names


def read_peft_config(path: Path) -> LoRAConfig | IA3Config:
    """Our config from a PEFT ``adapter_config.json``; settings we do not compute are refused by name."""
    file = path / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a PEFT adapter needs {CONFIG_FILE}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
    problems = Problems()
    kind = data.get("peft_type")
    if kind not in ("LORA", "IA3"):
        problems.add("peft_type", f"{kind!r} is not supported (expected 'LORA' or 'IA3')")
    common = {"modules_to_save": None}
    if kind == "IA3":
        _refuse_unsupported(data, {**common, "init_ia3_weights": True}, problems)
    else:
        _refuse_unsupported(data, {**common, "bias": "none", "lora_bias": False, "rank_pattern": {},
                                   "alpha_pattern": {}, "layer_replication": None}, problems)
    init = data.get("init_lora_weights", True)
    if kind == "LORA" and init not in _LORA_INITS and init is not False:
        problems.add("init_lora_weights", f"{init!r} is not supported (expected true, 'gaussian' or 'pissa')")
    names = _targets(data, "target_modules", problems)
    layers = data.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    if layers is not None and data.get("layers_pattern") not in (None, "h", ["h"]):
        problems.add("layers_pattern", f"{data['layers_pattern']!r}: GPT-2's blocks are 'h'")
    if kind == "IA3" and layers is not None:
        problems.add("layers_to_transform", "IA3 adapts every block")
    if kind == "IA3":
        feedforward = _targets(data, "feedforward_modules", problems)
        if sorted(feedforward) != sorted(t for t in names if t == "mlp.c_proj"):
            problems.add("feedforward_modules", f"{data.get('feedforward_modules')!r}: ours rescale the input of "
                                                "mlp.c_proj (when targeted) and of nothing else")
    if problems.items:
        raise CheckpointError(str(ConfigError(problems.items, f"{file}: unsupported PEFT adapter")))
    layers = "all" if layers is None else layers
    try:
        if kind == "IA3":
            return IA3Config(targets=names)
        return LoRAConfig(rank=data.get("r", 8), alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                          targets=names, layers=layers, rslora=bool(data.get("use_rslora", False)),
                          dora=bool(data.get("use_dora", False)), init=_LORA_INITS.get(init, "default"))
    except ConfigError as err:
        raise CheckpointError(f"{file}: {err}") from None


def _signature(config: LoRAConfig | IA3Config, n_layer: int) -> tuple:
    """What makes two configs the same adapters on a model of ``n_layer`` blocks (``last:2`` == ``[1, 2]`` on 3)."""
    if isinstance(config, IA3Config):
        return ("ia3", config.targets)
    return ("lora", config.rank, config.scaling, config.targets, config.resolve_layers(n_layer), config.dora)


def _expected_tensors(model: GPT2) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Every tensor the file must hold: its key, our parameter, and the shape PEFT stores it in."""
    expected = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, IA3Linear):
            expected[f"{PEFT_PREFIX}{name}.ia3_l"] = (layer.ia3_l, tuple(_peft_shaped(layer.ia3_l, layer).shape))
            continue
        for key, param in (("lora_A.weight", layer.lora_A), ("lora_B.weight", layer.lora_B),
                           ("lora_magnitude_vector", layer.lora_magnitude)):
            if param is not None:
                expected[f"{PEFT_PREFIX}{name}.{key}"] = (param, tuple(param.shape))
    return expected


def load_peft_adapter(model: GPT2, path: str | Path) -> GPT2:
    """Put a PEFT adapter (ours or one trained with ``peft``) onto ``model``; strict about every tensor."""
    directory = Path(path)
    config = read_peft_config(directory)
    current = getattr(model, "lora_config", None) or getattr(model, "ia3_config", None)
    if current is None:
        (apply_ia3 if isinstance(config, IA3Config) else apply_lora)(model, config)
    elif _signature(current, model.config.n_layer) != _signature(config, model.config.n_layer):
        raise CheckpointError(f"{directory}: adapter config {config} differs from the model's {current}")
    file = directory / TENSOR_FILE
    try:
        stored = load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None
    expected = _expected_tensors(model)
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    wrong = [f"{k}: {tuple(stored[k].shape)} in file, expected {shape}"
             for k, (_, shape) in expected.items() if k in stored and tuple(stored[k].shape) != shape]
    if missing or unexpected or wrong:
        parts = [f"missing: {', '.join(missing)}" if missing else "",
                 f"unexpected: {', '.join(unexpected)}" if unexpected else "",
                 f"wrong shape: {'; '.join(wrong)}" if wrong else ""]
        raise CheckpointError(f"{file}: does not match the adapter config:\n  - " + "\n  - ".join(p for p in parts if p))
    with torch.no_grad():
        for key, (param, _) in expected.items():
            param.copy_(stored[key].reshape(param.shape))
    return model
