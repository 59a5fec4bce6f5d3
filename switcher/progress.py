"""How a deploy or rollback shows its phases: plain lines, a live terminal line, or JSON.

``deploy.Phases`` calls ``begin`` and ``end`` around each phase; everything else the
deployer has to say goes through ``say``; the CLI calls ``finished`` or ``failed`` once.

- ``Plain`` (output is not a terminal): one line per finished phase, as logs want them.
- ``Terminal``: the running phase on one line that updates itself (elapsed, and the limit
  where there is one: ``health 1.2 s / 60 s``), replaced by a ✓/✗ line when it ends, and
  one closing line.
- ``JsonEvents`` (``--json``): one JSON object per line on stdout::

    {"event": "phase", "phase": "health", "status": "started", "limit": 60.0, "time": 1790000000.0}
    {"event": "phase", "phase": "health", "status": "ok" | "failed", "seconds": 0.612,
     "detail": "", "time": 1790000000.6}
    {"event": "message", "text": "blue on standby; retires in 4 s (…)"}
    {"event": "canary", "step": 1, "of": 2, "percent": 10, "color": "green",
     "status": "started" | "passed" | "failed" | "aborted" | "promoted", "seconds": 30.0,
     "time": 1790000000.0,
     "verdict": {…} | null, "figures": {"green": {…}, "blue": {…}} | null}
    {"event": "outcome", "kind": "deploy", "ok": true, "exit_code": 0, "target": "green",
     "build": "b2", "message": "b2 is live on green", "phases": {"health": 0.61, …},
     "warnings": []}

  A failed command ends with ``{"event": "outcome", "ok": false, "exit_code": 3,
  "message": …, "hint": …}`` (the message also goes to stderr, as for every command).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Protocol, TextIO

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
TICK = 0.1  # seconds between redraws of the running phase's line
CLEAR = "\r\x1b[2K"


class Progress(Protocol):
    def begin(self, phase: str, limit: float | None) -> None: ...
    def end(self, phase: str, took: float, detail: str, *, ok: bool) -> None: ...
    def say(self, line: str) -> None: ...
    def event(self, event: dict[str, Any], line: str) -> None: ...


def for_stream(out: TextIO, *, as_json: bool = False) -> Plain:
    """The reporter that suits ``out``: JSON if asked, a live line on a terminal, else plain."""
    if as_json:
        return JsonEvents(out)
    if out.isatty() and os.environ.get("TERM") != "dumb":
        return Terminal(out, color="NO_COLOR" not in os.environ)
    return Plain(out)


class Plain:
    """One line per finished phase; the base the other two specialise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def begin(self, phase: str, limit: float | None) -> None:
        pass

    def end(self, phase: str, took: float, detail: str, *, ok: bool) -> None:
        tail = detail if ok else f"failed {detail}".rstrip()
        self.say(f"  {phase:<16} {took:7.2f} s  {tail}".rstrip())

    def say(self, line: str) -> None:
        self.write(line + "\n")

    def event(self, event: dict[str, Any], line: str) -> None:
        """Something with figures (a canary step): ``line`` for people, ``event`` for --json."""
        self.say(line)

    def finished(self, outcome: dict[str, Any]) -> None:
        """The command succeeded; ``outcome`` is ``Outcome.to_json()``."""

    def failed(self, command: str, exit_code: int, message: str, hint: str) -> None:
        """The command failed; the CLI prints the message to stderr after this."""


class Terminal(Plain):
    """A live line for the running phase, redrawn by a ticker thread."""

    def __init__(self, out: TextIO, *, color: bool = True) -> None:
        super().__init__(out)
        self.color = color
        self._lock = threading.Lock()
        self._running: tuple[str, float, float | None] | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def begin(self, phase: str, limit: float | None) -> None:
        with self._lock:
            self._running = (phase, time.monotonic(), limit)
            self._draw()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()

    def end(self, phase: str, took: float, detail: str, *, ok: bool) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        mark = self._paint("✓", "32") if ok else self._paint("✗", "31")
        tail = detail if ok else self._paint(f"failed {detail}".rstrip(), "31")
        with self._lock:
            self._running = None
            self.write(f"{CLEAR}  {mark} {phase:<16} {took:7.2f} s  {tail}".rstrip() + "\n")

    def say(self, line: str) -> None:
        with self._lock:
            self.write((CLEAR if self._running else "") + line + "\n")
            if self._running:
                self._draw()

    def finished(self, outcome: dict[str, Any]) -> None:
        if outcome.get("phases"):  # a dry run or a no-op already said all there is
            self.write(self._paint("✓ " + closing_line(outcome), "1;32") + "\n")

    def failed(self, command: str, exit_code: int, message: str, hint: str) -> None:
        self.write(self._paint(f"✗ {command} failed (exit {exit_code}); see below", "1;31")
                   + "\n")

    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                if self._running:
                    self._draw()

    def _draw(self) -> None:
        """Called with the lock held and a phase running."""
        assert self._running is not None
        phase, began, limit = self._running
        elapsed = time.monotonic() - began
        spin = SPINNER[int(elapsed / TICK) % len(SPINNER)]
        of = f" / {limit:g} s" if limit else ""
        self.write(f"{CLEAR}  {spin} {phase:<16} {elapsed:7.1f} s{of}")

    def _paint(self, text: str, sgr: str) -> str:
        return f"\x1b[{sgr}m{text}\x1b[0m" if self.color else text


class JsonEvents(Plain):
    """One JSON object per line (see the module docstring)."""

    def emit(self, event: dict[str, Any]) -> None:
        self.write(json.dumps(event) + "\n")

    def begin(self, phase: str, limit: float | None) -> None:
        self.emit({"event": "phase", "phase": phase, "status": "started", "limit": limit,
                   "time": round(time.time(), 3)})

    def end(self, phase: str, took: float, detail: str, *, ok: bool) -> None:
        self.emit({"event": "phase", "phase": phase, "status": "ok" if ok else "failed",
                   "seconds": round(took, 3), "detail": detail, "time": round(time.time(), 3)})

    def say(self, line: str) -> None:
        self.emit({"event": "message", "text": line.strip()})

    def event(self, event: dict[str, Any], line: str) -> None:
        self.emit(event)

    def finished(self, outcome: dict[str, Any]) -> None:
        self.emit({"event": "outcome", **outcome, "exit_code": 0})

    def failed(self, command: str, exit_code: int, message: str, hint: str) -> None:
        self.emit({"event": "outcome", "kind": command, "ok": False, "exit_code": exit_code,
                   "message": message, "hint": hint})


def closing_line(outcome: dict[str, Any]) -> str:
    """``b2 is live on green: deploy took 2.31 s, the switch 3 ms``."""
    phases: dict[str, float] = outcome.get("phases") or {}
    took = sum(phases.values())
    switch = phases.get("switching")
    tail = f", the switch {switch * 1000:.0f} ms" if switch is not None else ""
    return f"{outcome['message']}: {outcome['kind']} took {took:.2f} s{tail}"
