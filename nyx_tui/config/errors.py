"""What is wrong with a config, said for a user: the field, what is wrong, and how to fix it.

Every way a config can be bad (TOML syntax, a wrong type, a value out of range, a missing folder, a backend
that cannot train it) ends up as a `Problem`, so the CLI, the TUI form and the job launcher show them all the
same way and never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config. `field` is the dotted TOML key (`dataset.subsets[0].image_dir`), or the
    file/source name when the problem is not about one field (a TOML syntax error, an unreadable file)."""

    field: str
    message: str
    fix: str
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else "warning: "
        return f"{prefix}{self.field}: {self.message}\n  fix: {self.fix}"


def has_errors(problems: Iterable[Problem]) -> bool:
    """Warnings do not stop a run; errors do."""
    return any(p.is_error for p in problems)


class ConfigError(Exception):
    """A config that cannot be used, with every problem found (not just the first), so one edit fixes all."""

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems: list[Problem] = list(problems)
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        errors = sum(p.is_error for p in self.problems)
        head = f"{self.source}: " if self.source else ""
        head += f"{errors} problem{'s' if errors != 1 else ''} in the config" if errors else "problems in the config"
        return "\n".join([head, *(str(p) for p in self.problems)])

    def __str__(self) -> str:
        return self.format()
