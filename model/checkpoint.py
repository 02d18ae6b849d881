"""Hugging Face GPT-2 checkpoints in and out: find them (local directory or hub), read them safely, check them
strictly, and map their tensors to and from ``model.gpt2.GPT2``'s names and layout (the model itself is
built in ``GPT2.from_pretrained``: this module knows only configs and tensors).

Hugging Face stores GPT-2's four projections as ``Conv1D`` with ``(in, out)`` weights; ours are ``nn.Linear``
``(out, in)``. They are transposed here, once at load and once at save, and nowhere else.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ConfigError, GPT2Config, preset_name

CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Non-parameter buffers older checkpoints carry (the causal mask); recomputed, so skipped.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_PREFIX = "transformer."
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or mapped onto GPT-2; the message names the file and every problem."""


class NonFiniteWeightsError(CheckpointError, FloatingPointError):
    """Weights with inf or nan entries, refused when written or merged: saved, they would poison every later use (a
    merge, a resume, a DPO start, an evaluation) far from where they went wrong. A ``CheckpointError`` (so
    ``sweeps/train.py`` reports it with exit code 2) and a ``FloatingPointError`` (what it is)."""


def non_finite_entries(tensors: Mapping[str, Any]) -> list[str]:
    """``name (k of n non-finite)`` for each floating-point tensor with inf or nan entries; other values ignored."""
    found = []
    for name, value in tensors.items():
        if torch.is_tensor(value) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                found.append(f"{name} ({bad} of {value.numel()} non-finite)")
    return found


# --------------------------------------------------------------------------------------------------------------------
# Finding a checkpoint
# --------------------------------------------------------------------------------------------------------------------


def hub_repo_id(name: str) -> str:
    """``gpt2-large`` -> ``openai-community/gpt2-large``; other ids pass through unchanged."""
    key = preset_name(name)
    return f"openai-community/{key}" if key is not None else name


_RESOLVED: dict[str, Path] = {}  # hub id -> snapshot folder, per process


def _download(name: str) -> Path:
    """Fetch config + weights of a hub id into the standard Hugging Face cache and return the snapshot folder.

    Asked once per process: a sweep worker reused across trials (Ray's ``reuse_actors``) would otherwise ask the hub
    for every trial; the weights themselves are then read from the local snapshot (memory-mapped safetensors)."""
    if name not in _RESOLVED or not _RESOLVED[name].is_dir():  # a cleared cache is fetched again
        _RESOLVED[name] = _fetch(name)
    return _RESOLVED[name]


def _fetch(name: str) -> Path:
    from huggingface_hub import snapshot_download

    repo_id = hub_repo_id(name)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors*"]))
        if not any((folder / f).exists() for f in _WEIGHT_FILES[:2]):  # an older repo with only PyTorch pickles
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model.bin*"]))
    except Exception as err:  # offline, unknown repo, HTTP errors: all end the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"could not get GPT-2 checkpoint {name!r} (hub repo {repo_id!r}): {type(err).__name__}: {reason}\n"
            "If this machine is offline, pass a local directory in Hugging Face format instead "
            "(config.json + model.safetensors or pytorch_model.bin), e.g. GPT2.from_pretrained('/path/to/gpt2'); "
            f"on a machine with network, `huggingface-cli download {repo_id}` fills the cache it is read from."
        ) from None
    return folder


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as it is, otherwise a hub id downloaded (or found in the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a directory with config.json and model weights, found a file")
    if isinstance(name_or_path, Path) or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return _download(str(name_or_path))


# --------------------------------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------------------------------


def read_config(directory: Path) -> GPT2Config:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face GPT-2 checkpoint needs config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return GPT2Config.from_hf_dict(data, source=str(path))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def _load_torch_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Read ``pytorch_model.bin`` with ``weights_only=True``: tensors and plain containers only, code never runs."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{path}: refused: not a plain state dict of tensors (safe loading rejected it: {first[:300]}). "
            "It was not executed. Convert it to model.safetensors in a trusted environment."
        ) from None
    except Exception as err:  # truncated zip, not a torch file at all...
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({type(err).__name__}: {str(err)[:300]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(f"{path}: not a plain state dict; entries that are not tensors: {', '.join(bad[:10])}")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _load_sharded(index_path: Path, loader: Any) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' ({err})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(loader(index_path.parent / shard))
    return tensors


def read_state_dict(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors as stored (Hugging Face names and layout), and the file they came from."""
    for name, loader in (
        ("model.safetensors", _load_safetensors),
        ("model.safetensors.index.json", lambda p: _load_sharded(p, _load_safetensors)),
        ("pytorch_model.bin", _load_torch_pickle),
        ("pytorch_model.bin.index.json", lambda p: _load_sharded(p, _load_torch_pickle)),
    ):
        path = directory / name
        if path.is_file():
            return loader(path), path
    raise CheckpointError(f"{directory}: no weights found; expected one of {', '.join(_WEIGHT_FILES)}")


# --------------------------------------------------------------------------------------------------------------------
# Mapping onto our model
# --------------------------------------------------------------------------------------------------------------------


def _is_conv1d(key: str) -> bool:
    return key.endswith(CONV1D_SUFFIXES)


def hf_to_state_dict(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str
) -> dict[str, torch.Tensor]:
    """Rename, transpose and check Hugging Face tensors against our parameter shapes.

    Missing, unexpected and wrongly shaped tensors are collected and reported together, in the file's own names
    and layout, so one error shows everything that is wrong with a checkpoint.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    lm_head = None
    for stored_key, tensor in tensors.items():
        key = stored_key.removeprefix(_PREFIX)
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            lm_head = (stored_key, tensor)
            continue
        if key not in expected:
            unexpected.append(stored_key)
            continue
        if key in seen:
            unexpected.append(f"{stored_key} (duplicate of {key})")
            continue
        seen.add(key)
        want = expected[key]
        want_stored = torch.Size(reversed(want)) if _is_conv1d(key) else want
        if tensor.shape != want_stored:
            wrong_shape.append(f"{stored_key}: {tuple(tensor.shape)} in file, expected {tuple(want_stored)}")
            continue
        out[key] = tensor.t() if _is_conv1d(key) else tensor
    missing = [k for k in expected if k not in seen]
    if lm_head is not None and "wte.weight" in out:
        stored_key, tensor = lm_head
        if tensor.shape != out["wte.weight"].shape or not torch.equal(tensor, out["wte.weight"]):
            wrong_shape.append(
                f"{stored_key}: differs from wte.weight, but GPT-2 ties the LM head to the token embedding"
            )
    problems = []
    if missing:
        problems.append(f"missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shape ({len(wrong_shape)}):\n      " + "\n      ".join(wrong_shape))
    if problems:
        raise CheckpointError(f"{source}: does not match the GPT-2 configuration:\n  - " + "\n  - ".join(problems))
    return out


def read_pretrained(name_or_path: str | Path, **config_overrides: Any
                    ) -> tuple[GPT2Config, dict[str, torch.Tensor], Path]:
    """A checkpoint's config (with ``config_overrides`` applied), its tensors as stored, and the file they came
    from; ``hf_to_state_dict`` maps the tensors onto a model of that config."""
    directory = resolve_checkpoint(name_or_path)
    config = read_config(directory)
    if config_overrides:
        try:
            config = GPT2Config(**{**config.__dict__, **config_overrides})
        except TypeError as err:
            raise CheckpointError(f"from_pretrained({name_or_path!r}): {err}") from None
    tensors, source = read_state_dict(directory)
    return config, tensors, source


def write_pretrained(path: str | Path, config: GPT2Config, state: dict[str, torch.Tensor], base_keys: set[str],
                     dtype: torch.dtype) -> Path:
    """Write the Hugging Face format exactly as ``GPT2LMHeadModel.save_pretrained`` would (``transformer.`` names,
    Conv1D layout, the tied LM head left out). Files are written to temporaries and renamed, so an interrupted save
    never leaves a half-written checkpoint under the final names.

    Tensors that are not GPT-2's (not in ``base_keys``: adapters, task heads) are refused rather than dropped:
    ``model.lora.save_merged`` folds adapters in, ``model.lora.save_peft_adapter`` saves them alone.
    """
    extra = sorted(set(state) - base_keys)
    if extra:
        raise CheckpointError(
            f"cannot save {path} as a plain GPT-2: the model has tensors GPT-2 does not ({', '.join(extra[:6])}"
            f"{', ...' if len(extra) > 6 else ''}). Fold LoRA adapters in with model.lora.save_merged(model, path) "
            "or save them alone with save_peft_adapter."
        )
    tensors = {
        _PREFIX + k: (v.t() if _is_conv1d(k) else v).detach().to("cpu").contiguous()
        for k, v in state.items()
    }
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    return write_checkpoint_files(path, tensors, "model.safetensors", {"config.json": hf_config})


def write_checkpoint_files(
    path: str | Path, tensors: dict[str, torch.Tensor], tensor_file: str, json_files: dict[str, Any]
) -> Path:
    """Write a safetensors file and JSON files into ``path`` through temporaries renamed at the end, so an
    interrupted save never leaves a half-written file under a final name. Non-finite tensors are refused before
    anything is written (``NonFiniteWeightsError``)."""
    out_dir = Path(path)
    bad = non_finite_entries(tensors)
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {out_dir / tensor_file}: non-finite weights in {', '.join(bad[:6])}"
            f"{f' and {len(bad) - 6} more tensors' if len(bad) > 6 else ''}; nothing was written")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".saving-") as tmp:
        tmp_dir = Path(tmp)
        save_file(tensors, tmp_dir / tensor_file, metadata={"format": "pt"})
        for name, content in json_files.items():
            (tmp_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        for name in (tensor_file, *json_files):
            os.replace(tmp_dir / name, out_dir / name)
    return out_dir
