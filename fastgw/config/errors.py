"""Configuration problems, each pinned to a file, a line and a key path."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    path: str                 # key path, e.g. "routes[2].match.paths[0]" ("" = the whole file)
    message: str
    file: str = "<config>"
    line: int | None = None
    severity: str = "error"   # error | warning
    column: int | None = None  # 1-based; only for syntax errors, where the line is not enough

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.line and self.column:
            where += f":{self.column}"
        key = f" {self.path}:" if self.path else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}:{key} {prefix}{self.message}"


class ConfigError(Exception):
    """The config cannot be used; `problems` says where and why."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class CompileError(Exception):
    """Raised by compile_config: problems found while building runtime tables, with key paths but
    no file positions yet (the loader adds those)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


class ConfigWriteError(Exception):
    """A valid change could not be written to the config file; nothing was applied."""


class ConflictError(Exception):
    """A change collides with what is there (a target address that already exists)."""
