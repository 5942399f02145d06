"""What an audit found: each problem named by where it is and what disagrees."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Finding", "Findings"]


@dataclass(frozen=True)
class Finding:
    """One problem: ``error`` (the audit fails) or ``warning`` (reported, not a verdict)."""

    level: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


@dataclass
class Findings:
    """Findings collected in the order they were made."""

    items: list[Finding] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        self.items.append(Finding("error", where, message))

    def warning(self, where: str, message: str) -> None:
        self.items.append(Finding("warning", where, message))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.items if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.items if f.level == "warning"]
