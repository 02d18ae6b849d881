"""What every config dataclass of the project shares: problems collected per key and raised once."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A configuration with problems; ``problems`` holds ``(key, message)`` pairs and the message lists them all."""

    def __init__(self, problems: Sequence[tuple[str, str]], title: str = "invalid configuration") -> None:
        self.problems = list(problems)
        self.title = title
        super().__init__(title + ":\n" + "\n".join(f"  - {key}: {msg}" for key, msg in self.problems))

    def keys(self) -> list[str]:
        return [key for key, _ in self.problems]

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems under a section name: ``rank`` becomes ``lora.rank``."""
        return ConfigError([(f"{prefix}.{key}", msg) for key, msg in self.problems], self.title)


class Problems:
    """Collects ``(key, message)`` problems in ``__post_init__`` and raises them together."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def extend(self, err: ConfigError, prefix: str | None = None) -> None:
        self.items.extend((err.prefixed(prefix) if prefix else err).problems)

    def raise_if_any(self, title: str) -> None:
        if self.items:
            raise ConfigError(self.items, title)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
