"""sweeps/preflight.py: the --cpu run writes its report with every check the issue names (correctness checks pass:
our model against transformers), a check that raises still leaves a report, and the dry run costs a study with a
preflight's measured rates (and says so), refusing a malformed report with exit 2."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from sweeps.bench import preflight
from sweeps.launch import main as launch
from tests.conftest import REPO_ROOT

SHARED_STUDY = str(REPO_ROOT / "tests" / "sweeps" / "shared_study.yaml")
CORRECTNESS = ["logits fp32 vs transformers fp32", "logits bf16 vs transformers fp32",
               "logits bf16 vs transformers bf16", "compile loss vs eager", "fused adamw",
               *(f"variant step: {side}" for side in ("lora", "dora", "pissa", "ia3", "qlora", "lora_ckpt", "qlora_ckpt",
                                                      "lora_adamw8bit"))]
SDPA = ["sdpa unpadded", "sdpa right-padded", "sdpa left-padded"]
TARGETS = ["target: full speed vs transformers, seq 32", "target: lora speed vs transformers + peft, seq 32",
           "target: MFU full fine-tuning, seq 64", "target: LoRA peak memory vs full, gpt2-medium",
           "target: trial overhead share of a guide-study trial", "target: packing small LoRA trials",
           "target: full trial vs Trainer", "target: lora trial vs Trainer"]
SPEEDS = [f"speed {m} seq {s}" for m in ("full", "lora") for s in (16, 32, 64)]


@pytest.fixture(scope="module")
def cpu_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One ``--cpu`` preflight for the module: its folder, exit status and printed report."""
    out, printed = tmp_path_factory.mktemp("preflight"), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("FINETUNE_DATA_DIR", str(data_dir))
        code = preflight.main(["--cpu", "--out", str(out)])
    return out, code, printed.getvalue()


@pytest.mark.slow
def test_cpu_preflight_reports_every_check_and_correctness_passes(cpu_run) -> None:
    out, code, printed = cpu_run
    assert code == 0, printed
    report = json.loads((out / "preflight.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert set(CORRECTNESS + SDPA + TARGETS + SPEEDS) <= set(checks), sorted(checks)
    assert all(c["status"] in preflight.STATUSES and c["figure"] for c in report["checks"])
    assert [n for n in CORRECTNESS if checks[n]["status"] != "pass"] == [], [checks[n] for n in CORRECTNESS]
    assert {checks[n]["status"] for n in SDPA} == {"info"}  # flash is a CUDA question; the CPU says what it ran
    assert {checks[n]["status"] for n in TARGETS} == {"info"}  # shown against the target, not judged on tiny shapes
    assert "aot_eager" in checks["compile loss vs eager"]["detail"]
    assert "DB write" in checks["target: trial overhead share of a guide-study trial"]["detail"]
    assert "plain concurrent processes" in checks["target: packing small LoRA trials"]["detail"]
    env, rates = report["environment"], report["rates"]
    assert env["mode"] == "cpu" and env["torch"] == torch.__version__ and env["device"].startswith("CPU")
    assert rates["cpu_mode"] is True and set(rates["train_flops_per_s"]) == {"full", "lora"}
    assert rates["setup_seconds"] > 0 and set(rates["packing"]) == {"1", "2"} and rates["packing"]["1"] == 1.0
    assert set(report["seconds"]) == set(preflight.CHECKS)
    markdown = (out / "preflight.md").read_text()
    for title in preflight.SECTIONS.values():
        assert f"## {title}" in markdown and title in printed
    assert all(f"| {name} |" in markdown for name in checks) and env["date"] in markdown
    assert "checks, 0 failed" in printed and "PASS  logits fp32 vs transformers fp32" in printed


@pytest.mark.slow
def test_the_dry_run_declines_a_cpu_mode_report(cpu_run, tmp_path: Path, capsys) -> None:
    out = cpu_run[0]
    dry = ["grid", "--study", SHARED_STUDY, "--dry-run", "--db", str(tmp_path / "none.duckdb"), "--set",
           "train.device=auto"]
    assert launch([*dry, "--preflight", str(out / "preflight.json")]) == 0
    text = capsys.readouterr().out
    assert "Rates: assumed for 3 planned trials" in text
    assert f"preflight {out / 'preflight.json'} ran with --cpu" in text and "its rates are not used" in text


def test_a_check_that_raises_is_a_failure_and_the_report_is_still_written(tmp_path: Path, monkeypatch,
                                                                           capsys) -> None:
    def broken(ctx: preflight.Context) -> list[preflight.Check]:
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(preflight.CHECKS, "logits", ("correct", broken))
    assert preflight.main(["--cpu", "--only", "logits,fused_adamw", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("logits", "fail"), ("fused adamw", "pass")]
    assert "RuntimeError: no such kernel" in report["checks"][0]["detail"]
    assert report["rates"]["train_flops_per_s"] == {} and report["rates"]["setup_seconds"] is None
    assert "| logits | fail | error |" in (tmp_path / "preflight.md").read_text()
    assert "2 checks, 1 failed" in capsys.readouterr().out


def test_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:
    assert preflight.main(["--cpu", "--only", "correct,warp", "--out", str(tmp_path)]) == 2
    assert "--only: unknown warp; sections are correct, fast, cost" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert preflight.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "preflight.json").exists()
    assert launch(["preflight", "--cpu", "--only", "nothing"]) == 2  # launch.py forwards to the same main


def _gpu_report(path: Path, packing: dict[str, float] | None = None) -> Path:
    """A preflight JSON as a GPU run writes it (rates only matter to the dry run)."""
    rates = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-20T10:00:00+00:00", "cpu_mode": False,
             "train_flops_per_s": {"full": 2.0e14, "lora": 1.0e14}, "setup_seconds": 4.0,
             "packing": packing or {"1": 1.0, "2": 1.9, "4": 3.2}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": {}, "checks": [], "rates": rates}))
    return path


def _plan(capsys, *args: str) -> dict:
    assert launch(["grid", "--study", SHARED_STUDY, "--dry-run", "--name", "g1", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_dry_run_costs_with_a_preflights_rates_and_names_it(tmp_path: Path, monkeypatch, capsys) -> None:
    from sweeps.costs import estimate_eval_tokens, estimate_params, estimate_tokens, training_flops_per_token
    from sweeps.study import load_study, plan

    monkeypatch.chdir(tmp_path)  # no report at the default path yet
    db = ["--db", str(tmp_path / "none.duckdb"), "--set", "train.device=auto"]  # the study pins the CPU
    assumed = {r["trial_id"]: r["estimated_seconds"] for r in _plan(capsys, *db)["plan"]}
    report = _gpu_report(tmp_path / "pf.json")
    data = _plan(capsys, *db, "--preflight", str(report))
    assert data["rates"].startswith(f"Rates: from preflight {report} on NVIDIA H100 80GB HBM3 "
                                    "(2026-11-20T10:00:00+00:00) for 3 planned trials: training 2.00e+14 FLOP/s")
    assert "1.00e+14 FLOP/s with frozen weights (LoRA), 4.0 s setup per trial" in data["rates"]
    measured = {r["trial_id"]: r["estimated_seconds"] for r in data["plan"]}
    for trial in plan(load_study(SHARED_STUDY), "g1", overrides={"train.device": "auto"}):
        config = trial.config
        flops = 2.0e14 if config["method.name"] == "full" else 1.0e14
        expected = (training_flops_per_token(config) * estimate_tokens(config) / flops
                    + 2 * estimate_params(config) * estimate_eval_tokens(config) / 2.0e14 + 4.0)
        assert measured[trial.trial_id] == pytest.approx(expected, abs=0.1)
        assert measured[trial.trial_id] != pytest.approx(assumed[trial.trial_id], rel=0.01)
    _gpu_report(Path("results/preflight/preflight.json"))  # the default path, relative to where the dry run runs
    assert _plan(capsys, *db)["rates"].startswith("Rates: from preflight results/preflight/preflight.json on NVIDIA")
    assert launch(["grid", "--study", SHARED_STUDY, "--dry-run", *db, "--gpus-per-trial", "0.25"]) == 0
    assert "At 4 trials per GPU the preflight measured 3.20x the trials per hour" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "not a readable preflight report"),
    ('{"checks": []}', "missing key 'rates'"),
    ('{"rates": {"device": "x", "date": "d", "train_flops_per_s": {"full": -1}}}',
     "rates.train_flops_per_s.full: expected a positive number or null, got -1"),
    ('{"rates": {"device": "x", "date": "d", "packing": {"four": 3.0}}}', "not a readable preflight report"),
])
def test_a_malformed_preflight_report_exits_2_naming_the_file(text: str, expected: str, tmp_path: Path,
                                                              capsys) -> None:
    path = tmp_path / "preflight.json"
    path.write_text(text)
    dry = ["grid", "--study", SHARED_STUDY, "--dry-run", "--db", str(tmp_path / "none.duckdb")]
    assert launch([*dry, "--preflight", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--preflight: {path}" in err and expected in err, err
    assert launch([*dry, "--preflight", str(tmp_path / "missing.json")]) == 2
    assert f"{tmp_path / 'missing.json'}: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_preflight_starts_without_ray_or_duckdb() -> None:
    """A bare GPU machine may have neither: the entry point and every check module import without them."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['duckdb'] = sys.modules['ray'] = None\n"  # importing either now raises
            "import sweeps.preflight, sweeps.bench.preflight, sweeps.bench.packing, sweeps.bench.overhead\n"
            "print('imported')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr
