"""The task registry is the one list of task names and sources: config validation and get_task read it."""

from __future__ import annotations

import pytest

from model.config import ConfigError
from tasks import TASKS, TaskConfig, get_task
from tasks.dpo import DPOConfig


def test_config_validates_names_and_sources_against_the_registry() -> None:
    for name, task_cls in TASKS.items():
        for source in task_cls.source_names:
            assert get_task(TaskConfig(name=name, source=source)).source == source
        assert get_task(TaskConfig(name=name)).source == (task_cls.source_names or (None,))[0]
    with pytest.raises(ConfigError, match="unknown task 'gpt'; choose one of sms_spam, imdb, nli, alpaca, preference"):
        TaskConfig(name="gpt")
    with pytest.raises(ConfigError, match="task imdb has a single source"):
        TaskConfig(name="imdb", source="sick")
    with pytest.raises(ConfigError, match="unknown nli source 'instruction'; choose one of sick, snli, all_nli_med"):
        TaskConfig(name="nli", source="instruction")


def test_get_task_hands_the_trial_options_to_the_task_that_reads_them() -> None:
    dpo = DPOConfig(beta=0.3)
    assert get_task(TaskConfig(name="preference"), dpo=dpo).dpo is dpo
    assert get_task(TaskConfig(name="preference")).dpo == DPOConfig()
    assert type(get_task(TaskConfig(name="alpaca"), dpo=dpo)) is TASKS["alpaca"]
