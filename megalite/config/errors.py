"""The config's one-line errors and how values are written in them (no torch here)."""
from __future__ import annotations

from typing import Any, List


class ConfigError(ValueError):
    """Bad configuration; holds one-line messages so the CLI can print each as ``error: ...``."""

    def __init__(self, lines: List[str]) -> None:
        self.lines: List[str] = list(lines)
        super().__init__("\n".join(self.lines))

    def __str__(self) -> str:
        return "\n".join(self.lines)


def fmt(value: Any) -> str:
    """Render a value the way a user would type it (none/true/false, comma lists)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return str(value)
