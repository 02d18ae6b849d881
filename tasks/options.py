"""The task section of a trial's configuration: its fields, each checked on its own. What the tasks read; the
registry's checks (a known name, one of its sources) are ``tasks.config.TaskConfig``'s."""

from __future__ import annotations

from dataclasses import dataclass

from model.config import Problems, is_int


@dataclass
class TaskOptions:
    """Which task and its data options, each checked on its own (``TaskConfig`` also checks the name and source
    against the registry). Options a task does not use are ignored by it."""

    name: str = "sms_spam"
    """``sms_spam``, ``imdb``, ``nli``, ``alpaca`` or ``preference`` (DPO): a name in ``tasks.TASKS``."""
    max_length: int | None = None
    """Tokens per example after truncation; None is the task's default (sms_spam 128, imdb 256, nli 128, alpaca 512,
    preference 256)."""
    max_train_examples: int | None = None
    """Use a deterministic random subset of the training split of this size (None: all of it)."""
    max_eval_examples: int | None = None
    """Cap validation and test at this many examples, same deterministic subsetting (None: all)."""
    balanced: bool = True
    """sms_spam: True is the GPT-2 reference setup (ham undersampled to the 747 spam); False keeps all 5,574 messages
    with a stratified split."""
    source: str | None = None
    """Which data a task reads (its ``source_names``); None is the task's default. nli: ``sick`` (default, own
    splits), ``snli`` (dev/test only; see tasks/nli.py), ``all_nli_med`` (Hugging Face) or ``med_or_sick``
    (all_nli_med when it can be had, else SICK, loudly; the record notes which). preference:
    ``instruction`` (default, 1,100 pairs), ``hh_helpful`` or ``hh_helpful_train`` (see tasks/preference.py)."""
    prompt_loss: bool = False
    """alpaca: also train on the prompt tokens (default: loss on response tokens only)."""
    num_generations: int = 3
    """Tasks that generate (alpaca, preference): greedy generations kept for the first test prompts (fixed across
    trials), for the guide and an LLM judge; DPO also keeps its starting weights' for the same prompts."""

    def __post_init__(self) -> None:
        problems = Problems()
        self._check_name(problems)
        for key in ("max_length", "max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value < 1):
                problems.add(key, f"must be a positive integer or null, got {value!r}")
        if not isinstance(self.balanced, bool):
            problems.add("balanced", f"must be true or false, got {self.balanced!r}")
        self._check_source(problems)
        if not isinstance(self.prompt_loss, bool):
            problems.add("prompt_loss", f"must be true or false, got {self.prompt_loss!r}")
        if not is_int(self.num_generations) or self.num_generations < 0:
            problems.add("num_generations", f"must be an integer >= 0, got {self.num_generations!r}")
        problems.raise_if_any("invalid task configuration")

    def _check_name(self, problems: Problems) -> None:
        """The name against the registry: ``TaskConfig``'s (the registry imports the tasks, which read these options)."""

    def _check_source(self, problems: Problems) -> None:
        """The source against the task's ``source_names``: ``TaskConfig``'s."""
