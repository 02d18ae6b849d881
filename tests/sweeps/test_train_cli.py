"""sweeps/train.py: one trial from the command line, JSON out, exports, and exit code 2 on bad input."""

from __future__ import annotations

import json
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
    ],
    ids=["bad-values", "k-too-large", "bad-set", "missing-config"],
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


def test_script_runs_from_the_repository_root(real_data) -> None:
    proc = subprocess.run([sys.executable, "sweeps/train.py", "--smoke", "--quiet", "--task", "alpaca"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = _json_line(proc.stdout)
    assert record["task"] == "alpaca" and record["test_perplexity"] > 1 and len(record["generations"]) == 1
