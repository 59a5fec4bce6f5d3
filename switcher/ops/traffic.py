"""The traffic side of the watch: the old color's baseline and the new color's counters
read just before the switch, the new color's window since then at every look, and its
verdict (switcher/analysis.py judges; this reads the router and keeps the figures).

What a deploy's history record keeps of it (``"analysis"``)::

    {"verdict": {"ok": false, "judged": true, "rule": "errors",
                 "message": "green: 37 of 212 answers failed (17 %), blue 0.4 % before the switch"},
     "colors": {"green": {"window": "since the switch", "answers": 212, "failed": 37,
                          "5xx": 37, "failures": {"refused": 0, "reset": 0, "timeout": 0},
                          "p95": 0.012},
                "blue": {"window": "60 s before the switch", "answers": 1000, ...}},
     "router_restarts": 0, "unread_looks": 0}

``colors`` is absent when the router gave no figures before the switch (then the verdict
says so); ``window`` says what each color's figures cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from switcher import routerctl
from switcher.analysis import Figures, Since, Verdict, judge
from switcher.config import Analysis
from switcher.errors import RouterError
from switcher.model import Color
from switcher.ops.site import Say
from switcher.routerctl import Router

UNREADABLE = (RouterError, ValueError)  # the router down, or an answer without figures


@dataclass
class Traffic:
    """One watch's view of the router's figures (see the module docstring)."""

    router: Router
    settings: Analysis
    target: Color
    say: Say
    timeout: float = 1.0  # per control request: a hung router must not stall the watch
    baseline: Figures | None = None  # the old color's, over baseline_seconds before T0
    baseline_seconds: float = 0.0
    since: Since | None = None
    verdict: Verdict | None = None
    missing: str = ""  # why there are no figures to judge, when there are none
    unread_looks: int = 0
    moment: str = "the switch"  # when the window starts: the switch, or "the canary"

    def before_switch(self) -> None:
        """Just before the switch: the old color's baseline (the ``figures`` command) and
        the target's counters as they stand (``status``), from which its window counts."""
        try:
            window = routerctl.window(self.router.figures(self.settings.baseline,
                                                          self.timeout))
            now = routerctl.counters(self.router.status(self.timeout))
        except UNREADABLE as exc:
            self.missing = f"the router gave no figures before {self.moment}: {_why(exc)}"
            self.say(f"warning: {self.missing}; the watch judges health and process only")
            return
        self.baseline = window.colors[self.target.other]
        self.baseline_seconds = window.seconds or 0.0
        self.since = Since(now.started_at, now.colors[self.target])

    def look(self) -> Verdict | None:
        """Read the target's counters and judge its window; None when there is nothing
        to judge on (no baseline, or the router could not be read this time: that alone
        fails no deploy, the process and health checks still run)."""
        if self.since is None or self.baseline is None:
            return None
        try:
            now = routerctl.counters(self.router.status(self.timeout))
        except UNREADABLE as exc:
            self._unread(exc)
            return None
        window = self.since.update(now.started_at, now.colors[self.target])
        self.verdict = judge(window, self.baseline, self.settings, color=self.target,
                             moment=self.moment)
        return self.verdict

    def _unread(self, exc: Exception) -> None:
        if not self.unread_looks:
            self.say(f"warning: the router's figures could not be read during the watch "
                     f"({_why(exc)}); the deploy is not failed for that alone, the process "
                     "and health checks go on")
        self.unread_looks += 1

    def note(self) -> str:
        """The verdict's message, or why there was none; what the output and history say
        when the watch ends."""
        if self.verdict is not None:
            return self.verdict.message
        if self.missing:
            return f"not judged on traffic ({self.missing})"
        if self.unread_looks:
            return "not judged on traffic (the router's figures could not be read)"
        return f"not judged on traffic ({self.since.last.answers if self.since else 0} answers)"

    def to_json(self) -> dict[str, Any]:
        """The history record's ``analysis`` (the module docstring draws it)."""
        record: dict[str, Any] = {
            "verdict": self.verdict.to_json() if self.verdict else {
                "ok": True, "judged": False, "rule": None, "message": self.note()},
            "router_restarts": self.since.restarts if self.since else 0,
            "unread_looks": self.unread_looks}
        if self.since is not None and self.baseline is not None:
            record["colors"] = {
                self.target.value: {"window": f"since {self.moment}",
                                    **self.since.last.summary()},
                self.target.other.value: {
                    "window": f"{self.baseline_seconds:g} s before {self.moment}",
                    **self.baseline.summary()}}
        return record


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, RouterError) else str(exc)
