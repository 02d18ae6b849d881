"""sweeps/train.py: one trial from the command line, JSON out, exports, and exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from sweeps.train import main
from tests.conftest import REPO_ROOT


def _json_line(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_lora_trial_prints_metrics_and_exports(real_data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["--smoke", "--task", "sms_spam", "--method", "lora", "--set", "lora.rank=4",
                 "--set", "optim.lr=1e-3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = _json_line(captured.out)
    assert record["status"] == "completed" and 0 <= record["test_accuracy"] <= 1
    assert "step      1" in captured.err  # progress went to stderr
    assert {p.name for p in out.iterdir()} == {"adapter", "model", "head.safetensors", "result.json", "config.yaml"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = transformers.GPT2LMHeadModel.from_pretrained(out / "model")
    assert merged.config.n_layer == 2
    assert json.loads((out / "result.json").read_text())["test_accuracy"] == record["test_accuracy"]


def test_yaml_config_with_nested_sections(real_data, tmp_path: Path, capsys) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text("task:\n  name: nli\nmethod:\n  name: last_k\n  k: 1\noptim.lr: 1e-3\n")
    assert main(["--smoke", "--config", str(config), "--quiet"]) == 0
    record = _json_line(capsys.readouterr().out)
    assert record["task"] == "nli" and record["method"] == "last_k"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "lora.rank=0", "--set", "optim.lr=-1", "--set", "optim.lrr=1"],
         ["lora.rank: must be", "optim.lr: must be", "optim.lrr: unknown key"]),
        (["--set", "method.k=13", "--set", "method.name=last_k", "--set", "model.init=pretrained",
          "--set", "model.n_layer=null", "--set", "model.n_head=null", "--set", "model.n_embd=null"],
         ["method.k: last_k with k=13 but the model has only 12 blocks"]),
        (["--set", "novalue"], ["--set: expected key=value"]),
        (["--config", "/no/such.yaml"], ["/no/such.yaml: no such file"]),
        (["--set", "method.name=ia3", "--set", "lora.rank=4", "--set", "model.quantize=nf4",
          "--set", "lora.dora=true"],
         ["lora.rank: a LoRA setting applies to method.name=lora only (method is ia3)",
          "lora.dora: DoRA applies to method.name=lora only", "model.quantize: NF4 stores the frozen base weights"]),
    ],
    ids=["bad-values", "k-too-large", "bad-set", "missing-config", "variant-that-cannot-apply"],
)
def test_bad_input_exits_2_with_every_problem(args: list[str], expected: list[str], capsys) -> None:
    assert main(["--smoke", *args]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert "Traceback" not in err


def test_bad_yaml_names_the_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text("task:\n  name: nli\n  bad: [unclosed\n")
    assert main(["--smoke", "--config", str(config)]) == 2
    assert f"{config}:" in capsys.readouterr().err


def test_bad_data_file_exits_2(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "sms_spam").mkdir()
    (tmp_path / "sms_spam" / "SMSSpamCollection").write_text("ham\tfine\nspam\n")
    (tmp_path / "gpt2-bpe").symlink_to(data_dir / "gpt2-bpe")
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(tmp_path))
    assert main(["--smoke", "--task", "sms_spam"]) == 2
    assert "SMSSpamCollection:2: expected 'label<TAB>text'" in capsys.readouterr().err


def test_out_dir_that_is_not_empty_is_refused_before_training(tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["--smoke", "--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_script_runs_from_the_repository_root(real_data) -> None:
    proc = subprocess.run([sys.executable, "sweeps/train.py", "--smoke", "--quiet", "--task", "alpaca"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = _json_line(proc.stdout)
    assert record["task"] == "alpaca" and record["test_perplexity"] > 1 and len(record["generations"]) == 1


def _unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; where that does not stop reading (root), the failure it would cause is injected."""
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        real = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", denied)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p.mkdir(), "{p}: is a directory; pass a YAML file"),
    (lambda p: p.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00"), "{p}:1: a binary file (NUL byte), not YAML text"),
    (lambda p: p.write_bytes(b"task.name: nli\ntrain.seed: \xff\n"), "{p}:2: not UTF-8 text (byte 0xff)"),
    (lambda p: p.write_text("task.name: nli\ntrain:\n  seed: 1\n  seed: 2\n"),
     "{p}:4: not valid YAML (duplicate key 'seed' (first given on line 3)"),
    (lambda p: p.write_text("task:\n  name: nli\ntask:\n  max_length: 64\n"), "{p}:3: not valid YAML (duplicate key 'task'"),
    (lambda p: p.write_text("task.max_length: 2048\n"), "task.max_length: 2048 exceeds the model's 1024 positions"),
], ids=["directory", "binary", "bad-utf8", "nested-key-twice", "section-twice", "max-length-beyond-model"])
def test_bad_config_file_exits_2_naming_it(make, expected: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "trial.yaml"
    make(path)
    assert main(["--smoke", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected.format(p=path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_duplicate_key_in_a_json_config_exits_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "trial.json"
    path.write_text('{"train.seed": 1, "train.seed": 2}')
    assert main(["--smoke", "--config", str(path)]) == 2
    assert f"{path}: duplicate key 'train.seed'" in capsys.readouterr().err


def test_unreadable_config_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text("task.name: nli\n")
    _unreadable(path, monkeypatch)
    assert main(["--smoke", "--config", str(path)]) == 2
    assert f"{path}: cannot be read (Permission denied); check its permissions" in capsys.readouterr().err


@pytest.mark.slow
def test_config_script_exits_2_on_a_directory(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "sweeps/train.py", "--config", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{tmp_path}: is a directory" in proc.stderr and "Traceback" not in proc.stderr


def _nan_result(status: str):
    """A trial result whose model and head hold non-finite weights (as a diverged trial's may)."""
    import torch

    from model.gpt2 import GPT2, GPT2Config
    from sweeps.loop import TrialResult
    from sweeps.records import FinalRecord

    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    head = torch.nn.Linear(16, 2)
    with torch.no_grad():
        model.wte.weight[0, 0] = float("nan")
        head.weight[0, 0] = float("inf")
    record = FinalRecord(status=status, task="sms_spam", task_kind="classification", primary_metric="accuracy",
                         higher_is_better=True, step=3)
    return TrialResult(record, model, head)


def test_a_diverged_trial_exports_its_record_without_weights(tmp_path: Path) -> None:
    from sweeps.config import TrialConfig
    from sweeps.train import export

    out = tmp_path / "run"
    export(_nan_result("diverged"), TrialConfig(), out)
    assert {p.name for p in out.iterdir()} == {"result.json", "config.yaml"}
    assert json.loads((out / "result.json").read_text())["status"] == "diverged"


def test_non_finite_weights_are_never_exported(tmp_path: Path) -> None:
    from model.checkpoint import NonFiniteWeightsError
    from sweeps.config import TrialConfig
    from sweeps.train import export

    out = tmp_path / "run"
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        export(_nan_result("completed"), TrialConfig(), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # the staging folder is gone too
