"""Run one trial from the command line: the same flat dotted keys the sweeps use.

    python sweeps/train.py --task sms_spam --method lora --set lora.rank=8 --set optim.lr=1e-3
    python sweeps/train.py --config my_trial.yaml --set train.seed=2 --out runs/lora-r8
    python sweeps/train.py --smoke            # tiny random-init model, a few steps: checks the whole path

Progress goes to stderr; the final metrics are printed as one JSON line on stdout. ``--out DIR`` saves the result:
``result.json``, ``config.yaml``, and the weights in Hugging Face form (``model/``; LoRA trials also ``adapter/`` in
PEFT's format, ``model/`` then being the merged model; classification trials add ``head.safetensors``).
Bad input (unknown key, bad value, bad data file, bad checkpoint) prints one clear message and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from analysis.db import DEFAULT_DB, DatabaseError
from model import CheckpointError, ConfigError, TokenizerError
from model.adapters import save_merged
from model.checkpoint import NonFiniteWeightsError, non_finite_entries
from model.methods import ADAPTER_METHODS
from model.peft_format import save_peft_adapter
from sweeps.config import TrialConfig, flatten, read_yaml
from sweeps.loop import TrialResult, run_trial
from sweeps.records import CheckpointRecord, EvalRecord, Record, StepRecord, metric_key
from sweeps.study import resolve_init
from tasks import DataError

SMOKE = {
    "model.init": "random", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64,
    "task.max_train_examples": 64, "task.max_eval_examples": 32, "task.max_length": 64, "task.num_generations": 1,
    "train.max_steps": 5, "train.batch_size": 8, "train.log_every": 1, "train.max_new_tokens": 8,
}
USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, DatabaseError)


def read_config_file(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([("--config", f"{path}: expected a mapping of keys to values, got {type(data).__name__}")])
    return flatten(data)


def parse_sets(items: list[str]) -> dict[str, str]:
    flat, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(("--set", f"expected key=value, got {item!r}"))
        else:
            flat[key.strip()] = value
    if problems:
        raise ConfigError(problems)
    return flat


def build_config(args: argparse.Namespace) -> TrialConfig:
    """Smoke defaults < --config file < --task/--method/--model < --set (later wins)."""
    flat: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    if args.config:
        flat.update(read_config_file(Path(args.config)))
    for key, value in (("task.name", args.task), ("method.name", args.method), ("model.name", args.model)):
        if value is not None:
            flat[key] = value
    flat.update(parse_sets(args.set))
    resolve_init(flat, args.db)  # dpo.init=<trial id> -> that trial's exported weights
    return TrialConfig.from_flat(flat)


def export(result: TrialResult, config: TrialConfig, out: Path) -> None:
    """Write the trial's result and weights to ``out``, through a temporary folder renamed at the end."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError([("--out", f"{out} exists and is not empty; choose a new directory")])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        if result.record.status != "diverged":  # a diverged trial keeps its record, not its (often non-finite) weights
            _export_weights(result, config, staging)
        (staging / "result.json").write_text(json.dumps(json.loads(result.record.to_json()), indent=2) + "\n")
        (staging / "config.yaml").write_text(yaml.safe_dump(config.to_flat(), sort_keys=True))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _export_weights(result: TrialResult, config: TrialConfig, staging: Path) -> None:
    """The model (an adapter method: the adapter and the merged model) and the task head; non-finite weights are
    refused."""
    model, head = result.model, result.head
    if config.method.name in ADAPTER_METHODS:
        save_peft_adapter(model, staging / "adapter", base_model=config.model.name)
        save_merged(model, staging / "model")
    else:
        model.save_pretrained(staging / "model")
    if head is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        bad = non_finite_entries(tensors)
        if bad:
            raise NonFiniteWeightsError(f"refusing to export the task head: non-finite weights in {', '.join(bad)}")
        save_file(tensors, staging / "head.safetensors", metadata={"format": "pt"})


def progress(record: Record) -> None:
    if isinstance(record, StepRecord):
        print(f"step {record.step:>6}  loss {record.loss:.4f}  lr {record.lr:.2e}  "
              f"{record.tokens_per_s:,.0f} tok/s", file=sys.stderr, flush=True)
    elif isinstance(record, EvalRecord):
        shown = "  ".join(f"{metric_key(record.split, k)} {v:.4f}" for k, v in record.metrics.items())
        print(f"eval at step {record.step}: {shown}", file=sys.stderr, flush=True)
    elif isinstance(record, CheckpointRecord):
        print(f"checkpoint: {record.path}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings (flat dotted keys or nested sections)")
    parser.add_argument("--task", help="shorthand for --set task.name=...")
    parser.add_argument("--method", help="shorthand for --set method.name=...")
    parser.add_argument("--model", help="shorthand for --set model.name=...")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any trial setting by its dotted key, e.g. lora.rank=8 (repeatable)")
    parser.add_argument("--out", type=Path, help="save result.json, config.yaml and the weights here")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB,
                        help=f"study database where dpo.init=<trial id> is looked up (default {DEFAULT_DB})")
    parser.add_argument("--checkpoint-dir", type=Path, help="write resumable checkpoints here (train.checkpoint_every)")
    parser.add_argument("--resume", type=Path, help="continue from a checkpoint folder written by --checkpoint-dir")
    parser.add_argument("--smoke", action="store_true", help="tiny random-init model and a few steps")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
        if args.out is not None and args.out.exists() and any(args.out.iterdir()):
            raise ConfigError([("--out", f"{args.out} exists and is not empty; choose a new directory")])
        if args.resume is not None and not (args.resume / "state.pt").is_file():
            raise ConfigError([("--resume", f"{args.resume}: no state.pt; pass a step_* folder from --checkpoint-dir")])
        result = run_trial(config, None if args.quiet else progress, args.checkpoint_dir, args.resume)
        if args.out is not None:
            export(result, config, args.out)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = {k: v for k, v in json.loads(result.record.to_json()).items() if k not in ("history", "predictions")}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
