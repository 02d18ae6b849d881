"""Which study file ``--study`` means: a shipped study's name wins over whatever the working directory holds, and a
path has to look like one (issue 11: ``--study guide`` next to a rendered guide folder named ``guide``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from model import ConfigError
from sweeps.costs import SETUP_SECONDS, THROUGHPUT, PreflightRates, trial_cost
from sweeps.dry_run import read_plan_csv, write_plan_csv
from sweeps.launch import main
from sweeps.study import (
    STUDIES_DIR,
    PlannedTrial,
    Study,
    config_key,
    duplicates_removed,
    load_study,
    plan,
    planned_memberships,
    resolve_study_path,
)


@pytest.fixture
def cwd_with_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding folders named like shipped studies (a guide rendered with ``--out guide``)."""
    for name in ("guide", "smoke"):
        (tmp_path / name).mkdir()
    (tmp_path / "guide" / "guide.md").write_text("# a rendered guide\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["guide", "smoke"])
def test_shipped_name_wins_over_a_folder_of_the_same_name(cwd_with_folders: Path, name: str) -> None:
    assert resolve_study_path(name) == STUDIES_DIR / f"{name}.yaml"
    study = load_study(name)
    assert study.name == name and study.path == STUDIES_DIR / f"{name}.yaml"


def test_grid_dry_run_of_a_shipped_study_beside_a_folder_of_its_name(cwd_with_folders: Path, capsys) -> None:
    db = cwd_with_folders / "results.duckdb"
    assert main(["grid", "--study", "guide", "--dry-run", "--db", str(db)]) == 0
    assert "distinct trials planned from" in capsys.readouterr().out
    assert not db.exists()


@pytest.mark.parametrize("name", ["nosuch", "guide2"])
def test_a_bare_name_that_is_no_shipped_study_is_refused(cwd_with_folders: Path, name: str) -> None:
    (cwd_with_folders / "guide2").mkdir()  # a folder of that name is no study either
    with pytest.raises(ConfigError) as err:
        load_study(name)
    message = str(err.value)
    assert "no such study file" in message
    assert "shipped studies: " + ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))) in message


def test_bad_study_name_exits_2_with_the_shipped_studies(cwd_with_folders: Path, capsys) -> None:
    assert main(["grid", "--study", "nosuch", "--dry-run", "--db", str(cwd_with_folders / "x.duckdb")]) == 2
    err = capsys.readouterr().err
    assert "no such study file" in err and "guide" in err and "smoke" in err


def _write_study(path: Path) -> Path:
    smoke = yaml.safe_load((STUDIES_DIR / "smoke.yaml").read_text())
    path.write_text(yaml.safe_dump({**smoke, "name": "mine"}))
    return path


@pytest.mark.parametrize("given", ["{cwd}/studies/mine.yaml", "studies/mine.yaml", "./studies/mine.yaml", "mine.yml"])
def test_a_path_to_a_study_file_works(cwd_with_folders: Path, given: str) -> None:
    (cwd_with_folders / "studies").mkdir()
    _write_study(cwd_with_folders / "studies" / "mine.yaml")
    _write_study(cwd_with_folders / "mine.yml")
    given = given.format(cwd=cwd_with_folders)
    study = load_study(given)
    assert study.name == "mine" and study.path.resolve() == (cwd_with_folders / given).resolve()


@pytest.mark.parametrize("given", ["missing.yaml", "studies/missing", "./guide"])
def test_a_path_that_is_no_study_file_is_refused(cwd_with_folders: Path, given: str) -> None:
    with pytest.raises(ConfigError, match="no such study file"):
        load_study(given)


# --- one configuration, several groups: planned once ----------------------------------------------------------------

SHARED = """
name: shared
base: {model.name: gpt2, model.init: random, model.n_layer: 2, model.n_head: 2, model.n_embd: 32, train.max_steps: 2}
tasks: {sms_spam: {}}
seeds: [0, 1]
learning_rates: {default: [1.0e-3, 3.0e-3]}
dimensions:
  method:
    full: {method.name: full}
    head_only: {method.name: head_only}
  optimizer:
    adamw: {method.name: full, optim.name: adamw}
    sgd: {method.name: full, optim.name: sgd}
"""


def _shared_study(tmp_path: Path, text: str = SHARED):
    (tmp_path / "shared.yaml").write_text(text)
    return load_study(str(tmp_path / "shared.yaml"))


def test_a_configuration_two_dimensions_share_is_planned_once_with_both_memberships(tmp_path: Path) -> None:
    study = _shared_study(tmp_path)
    trials = plan(study, "s1")
    assert len(trials) == 3 * 2 * 2 and planned_memberships(trials) == 16 and duplicates_removed(trials) == 4
    assert len({config_key(t.config) for t in trials}) == len(trials) == len({t.trial_id for t in trials})
    full = [t for t in trials if t.config["method.name"] == "full" and t.config["optim.name"] == "adamw"]
    assert len(full) == 4
    for trial in full:  # first membership in study order, on the trial itself and first in its list
        assert (trial.dimension, trial.group) == ("method", "full")
        assert trial.memberships == [("method", "full"), ("optimizer", "adamw")]
        assert trial.trial_id.startswith("method-full-")
    assert all(t.memberships == [(t.dimension, t.group)] for t in trials if t not in full)
    # deterministic, and the id comes from the sweep and the configuration, not from the group that asked first
    assert plan(study, "s1") == trials
    alone = {config_key(t.config): t for t in plan(study, "s1", dimensions=["optimizer"])}
    for trial in full:
        other = alone[config_key(trial.config)]
        assert other.memberships == [("optimizer", "adamw")]
        assert other.trial_id.split("-")[-1] == trial.trial_id.split("-")[-1]
    assert {t.trial_id for t in plan(study, "s2")}.isdisjoint(t.trial_id for t in trials)


def test_two_groups_of_one_dimension_that_come_out_identical_are_refused(tmp_path: Path) -> None:
    study = _shared_study(tmp_path)
    with pytest.raises(ConfigError, match="groups 'adamw' and 'sgd' give the same configuration"):
        plan(study, "s1", overrides={"optim.name": "adamw"})


def _asked(study: Study) -> int:
    """(trial, group) pairs the study asks for, counted from the file: every group at each of its learning rates and
    seeds, on every task it runs on."""
    pairs = 0
    for task in study.tasks:
        for dim, groups in study.dimensions.items():
            for variant in groups.values() if study.runs(task, dim) else ():
                given = variant.get("optim.lr")
                grid = study.lr_grid(str({**study.base, **variant}.get("method.name", "full"))) if given is None \
                    else given if isinstance(given, list) else [given]
                pairs += len(grid) * len(study.seeds)
    return pairs


def test_the_guide_plans_every_configuration_once() -> None:
    """No configuration twice, no (trial, group) pair lost, and each dimension holds exactly the configurations it
    would plan on its own."""
    study = load_study("guide")
    trials = plan(study, "g")
    assert len({config_key(t.config) for t in trials}) == len({t.trial_id for t in trials}) == len(trials)
    assert planned_memberships(trials) == _asked(study) and duplicates_removed(trials) > 0
    for dim in study.dimensions:
        alone = {config_key(t.config) for t in plan(study, "g", dimensions=[dim])}
        assert alone == {config_key(t.config) for t in trials if dim in dict(t.memberships)}, dim


def test_plan_csv_reads_back_as_the_same_trials(tmp_path: Path) -> None:
    trials = plan(load_study("guide"), "g", tasks=["sms_spam", "preference"])
    trials.append(PlannedTrial("odd-1", "g", "guide", "d", "x", {**trials[0].config, "task.source": "1e-3",
                                                                 "dpo.init": "", "lora.layers": "[0, 1]"}))
    out = tmp_path / "plan.csv"
    with out.open("w", newline="") as f:
        write_plan_csv(trials, [float(i) for i in range(len(trials))], f)
    with out.open(newline="") as f:
        back = read_plan_csv(f)
    assert back == trials
    assert [type(v) for v in back[-1].config.values()] == [type(v) for v in trials[-1].config.values()]


def test_a_gpu_preflights_rates_replace_the_assumed_ones_on_gpus_only() -> None:
    """Training at the preflight's FLOP/s of the method's kind (full, or frozen weights), evaluation at its full
    rate, its setup seconds; a trial pinned to the CPU and a --cpu mode report keep the assumed rates."""
    from sweeps.config import TrialConfig

    preflight = PreflightRates("pf.json", "H100", "2026-11-20", False, {"full": 3e14, "lora": 1e14}, 5.0, {1: 1.0})
    full = TrialConfig.from_flat({"method.name": "full", "task.name": "sms_spam"}).to_flat()
    lora = {**full, "method.name": "lora"}
    assumed, measured = trial_cost(full), trial_cost(full, preflight=preflight)
    assert (assumed.preflight, measured.preflight) == (False, True)
    assert measured.train_s == pytest.approx(assumed.train_s * THROUGHPUT["gpu"] / 3e14)
    assert measured.eval_s == pytest.approx(assumed.eval_s * THROUGHPUT["gpu"] / 3e14)
    assert (assumed.setup_s, measured.setup_s) == (SETUP_SECONDS["gpu"], 5.0)
    assert trial_cost(lora, preflight=preflight).train_s == pytest.approx(
        trial_cost(lora).train_s * THROUGHPUT["gpu"] / 1e14)
    assert trial_cost({**full, "train.device": "cpu"}, preflight=preflight) == trial_cost({**full, "train.device": "cpu"})
    on_cpu = PreflightRates("pf.json", "CPU", "2026-11-20", True, {"full": 3e14}, 5.0, {})
    assert trial_cost(full, preflight=on_cpu) == assumed
    partial = PreflightRates("pf.json", "H100", "2026-11-20", False, {"full": 3e14}, None, {})
    assert trial_cost(lora, preflight=partial).train_s == trial_cost(lora).train_s  # LoRA not measured: assumed
    assert trial_cost(lora, preflight=partial).setup_s == SETUP_SECONDS["gpu"]


SMALL_STUDY = """name: small
base: {model.name: gpt2, model.init: random, model.n_layer: 2, model.n_head: 2, model.n_embd: 32}
tasks: {sms_spam: {}, preference: {}}
learning_rates: {default: [1.0e-3]}
dimensions:
  method:
    full: {method.name: full}
  dpo:
    lora: {method.name: lora}
dimension_tasks: {dpo: [preference]}
task_dimensions: {preference: [dpo]}
"""


def _small(tmp_path: Path, text: str = SMALL_STUDY) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(text)
    return path


def test_a_selection_that_plans_no_trial_is_refused(tmp_path: Path) -> None:
    study = load_study(str(_small(tmp_path)))
    assert plan(study, "s", tasks=["preference"], dimensions=["dpo"])
    with pytest.raises(ConfigError, match=r"--tasks/--dimensions: tasks preference with dimensions method plan no "
                                          r"trial in study small .* e\.g\. sms_spam/method, preference/dpo"):
        plan(study, "s", tasks=["preference"], dimensions=["method"])


@pytest.mark.parametrize(("old", "new", "where"), [
    ("name: small", "name: ../x", "name"),
    ("  method:\n", "  ../../../tmp/x:\n", "dimensions.../../../tmp/x"),
    ("    full: {", "    '<script>': {", "dimensions.method.<script>"),
    ("    full: {", "    '': {", "dimensions.method."),
    ("{sms_spam: {}, ", "{'a b': {}, sms_spam: {}, ", "tasks.a b"),
], ids=["study", "dimension", "group", "empty-group", "task"])
def test_names_that_become_paths_must_be_safe(tmp_path: Path, old: str, new: str, where: str) -> None:
    path = _small(tmp_path, SMALL_STUDY.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_study(str(path))
    assert any(key == f"{path}: {where}" and "is not a safe name" in message
               for key, message in info.value.problems), info.value


def test_a_study_file_named_unsafely_needs_a_name(tmp_path: Path) -> None:
    path = tmp_path / "my study.yaml"
    path.write_text(SMALL_STUDY.replace("name: small\n", ""))
    with pytest.raises(ConfigError, match="'my study' is not a safe name"):
        load_study(str(path))


def test_a_key_given_twice_in_a_study_is_refused_with_its_line(tmp_path: Path) -> None:
    path = _small(tmp_path, SMALL_STUDY + "dimensions:\n  method:\n    full: {method.name: full}\n")
    with pytest.raises(ConfigError, match=rf"{path}:12: not valid YAML \(duplicate key 'dimensions' \(first given on "
                                          r"line 5\)"):
        load_study(str(path))


def test_every_shipped_study_has_safe_names() -> None:
    for name in ("smoke", "demo", "guide", "guide-lite"):
        load_study(name)


def test_ia3_trials_do_not_inherit_the_base_lora_settings_but_refuse_their_own(tmp_path: Path) -> None:
    """The base's lora.* settings shape LoRA's adapters: LoRA trials take them, IA3 trials do not; an IA3 group that
    sets one itself is refused, naming the group and the key."""
    text = SHARED.replace("train.max_steps: 2}", "train.max_steps: 2, lora.rank: 4, lora.targets: all}")
    text = text.replace("    head_only: {method.name: head_only}",
                        "    head_only: {method.name: head_only}\n    lora: {method.name: lora}\n    ia3: {method.name: ia3}")
    trials = plan(_shared_study(tmp_path, text), "s1")
    by_method = {t.config["method.name"]: t.config for t in trials}
    assert (by_method["lora"]["lora.rank"], by_method["lora"]["lora.targets"]) == (4, ["attn.c_attn", "attn.c_proj",
                                                                                      "mlp.c_fc", "mlp.c_proj"])
    assert (by_method["ia3"]["lora.rank"], by_method["ia3"]["lora.targets"]) == (8, ["attn.c_attn"])  # the defaults
    bad = _shared_study(tmp_path, text.replace("ia3: {method.name: ia3}", "ia3: {method.name: ia3, lora.rank: 2}"))
    with pytest.raises(ConfigError) as err:
        plan(bad, "s1")
    assert {key for key, _ in err.value.problems if "lora" in key} == {"sms_spam / method.ia3: lora.rank"}
