"""What an operation returns to the CLI: printed, and emitted as the ``outcome`` event of
``--json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from switcher.model import Color, color_name


@dataclass
class Outcome:
    kind: str
    ok: bool
    target: Color | None = None
    build: str = ""
    message: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)  # HookRun.to_json() of each
    analysis: dict[str, Any] | None = None  # the watch's figures and verdict (ops/traffic.py)
    canary: dict[str, Any] | None = None  # its steps and how they ended (ops/canary.py)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": self.ok,
                "target": color_name(self.target), "build": self.build,
                "message": self.message, "phases": self.phases, "warnings": self.warnings,
                "hooks": self.hooks, "analysis": self.analysis, "canary": self.canary}

