"""Running an operator's hook (``pre_switch``, ``post_switch``): its own process group in
the build directory, each output line to the terminal and to the journal (identifier
``alive-switch-hook``, with the app, environment, hook, color and build as fields) as it
comes, the whole group killed after its timeout."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOOK_TAIL = 20  # lines of a hook's output kept in history
HOOK_IDENTIFIER = "alive-switch-hook"  # SYSLOG_IDENTIFIER of hook output in the journal


@dataclass(frozen=True)
class HookRun:
    """One run of a hook: ``outcome`` is "ok", "exit N", "timed out after N s" or
    "could not run: …"; ``tail`` its last HOOK_TAIL lines of output (stdout and stderr)."""

    name: str
    command: str
    outcome: str
    seconds: float
    tail: list[str]

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "command": self.command, "outcome": self.outcome,
                "seconds": self.seconds, "output": self.tail}


def run(name: str, command: str, *, cwd: Path, env: dict[str, str], timeout: float,
        fields: dict[str, str], say: Callable[[str], None]) -> HookRun:
    """Run ``command``; each output line goes to ``say`` and the journal as it comes."""
    tail: collections.deque[str] = collections.deque(maxlen=HOOK_TAIL)

    def line(text: str) -> None:
        tail.append(text)
        say(f"    {name}: {text}")
        _journal(text, 6, fields)

    began = time.monotonic()
    try:
        outcome = _run_process(command, cwd, env, timeout, line)
    except OSError as exc:
        outcome = f"could not run: {exc}"
    done = HookRun(name, command, outcome, round(time.monotonic() - began, 3), list(tail))
    _journal(f"{name} hook: {outcome} after {done.seconds:g} s: {command}",
             6 if done.ok else 3, fields)
    return done


def _run_process(command: str, cwd: Path, env: dict[str, str], timeout: float,
                 line: Callable[[str], None]) -> str:
    """Run ``command`` in its own process group, passing each output line to ``line``;
    return the outcome. On timeout the whole group is killed: a shell's children too."""
    proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, text=True,  # noqa: S602 - the operator's own hook
                            errors="replace", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, line), daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    reader.join(1.0)
    if not reader.is_alive() and proc.stdout is not None:
        # Else a daemon the hook started holds the pipe open: closing it now would block
        # on the reader's lock, so the reader keeps it until this process exits.
        proc.stdout.close()
    if code is None:
        return f"timed out after {timeout:g} s"
    return "ok" if code == 0 else f"exit {code}"


def _pump(stream: Any, line: Callable[[str], None]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for text in stream:
            line(text.rstrip("\n"))


def _journal(message: str, priority: int, fields: dict[str, str]) -> None:
    from systemd import journal  # noqa: PLC0415 - only commands that run hooks need it

    journal.sendv(f"MESSAGE={message}", f"PRIORITY={priority}",
                  f"SYSLOG_IDENTIFIER={HOOK_IDENTIFIER}", *(f"{k}={v}" for k, v in fields.items()))

