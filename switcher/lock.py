"""An environment's lock: ``flock`` on ``/run/alive-switch/<app>-<env>.lock``, and who waits
for whom.

The kernel drops an flock when its holder dies. The file holds one line naming the holder,
written right after the flock is taken, for the messages of whoever waits or is refused::

    pid 4242, `deploy production B`, since 2026-12-01T21:40:00+0000

How long a command waits for another holder (DESIGN.md Part 2, ``--wait``):

- every command waits up to its ``wait`` (``--wait SECONDS``); 0, the default, refuses at
  once (exit 4), so two deploys that overlap by mistake never queue silently;
- any command but a retire also waits for a *retire* holder, up to ``retire_wait`` (the
  color's ``stop_timeout`` plus a margin): a standby timer that fires just as a deploy starts
  must not fail that deploy;
- a retire (what the standby timers run) waits for any holder as long as it holds; under
  the lock it checks again that its color is still neither live, pending nor the fallback,
  and a deploy to that color cancels it (``systemctl stop`` of the timer's service) first.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from switcher.errors import LockHeldError

RETIRE = "retire"  # the command word of what the standby timers run
POLL = 0.05  # seconds between two tries of a held lock
RECORD_GRACE = 1.0  # seconds a new holder may take to write its line after its flock
_LINE = re.compile(r"pid (\d+), `([^`]*)`")


@dataclass(frozen=True)
class Holder:
    """The holder's line as read from the lock file ("" while it is being written)."""

    line: str

    @property
    def command(self) -> str:
        found = _LINE.match(self.line)
        return found.group(2) if found else ""

    @property
    def is_retire(self) -> bool:
        return self.command.partition(" ")[0] == RETIRE


class Lock:
    """The lock of one environment for one ``command`` (its words, e.g. ``deploy prod B``).

    ``wait`` bounds how long it queues behind any holder (``math.inf``: as long as the
    holder holds); ``say`` gets one line each time it starts waiting for a new holder."""

    def __init__(self, path: Path, command: str, *, wait: float = 0.0,
                 retire_wait: float = 0.0, say: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self.command = command
        self.wait = wait
        self.retire_wait = retire_wait
        self.say = say
        self.clock = clock
        self.sleep = sleep
        self.fd = -1

    @property
    def is_retire(self) -> bool:
        return Holder(f"pid 0, `{self.command}`").is_retire

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._wait_turn(fd)
        except BaseException:
            os.close(fd)
            raise
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `{self.command}`, since {stamp}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------

    def _wait_turn(self, fd: int) -> None:
        """Return holding the flock, or raise LockHeldError once patience for the current
        holder runs out. Each holder is judged by its own line: a retire that ends and a
        deploy that takes over the lock at once gets the deploy's patience, not the retire's."""
        began = self.clock()
        first_seen: dict[str, float] = {}
        while not _try_flock(fd):
            holder = Holder(os.pread(fd, 4096, 0).decode(errors="replace").strip())
            now = self.clock()
            seen = first_seen.setdefault(holder.line, now)
            until = self._patience(holder, began, seen)
            if now >= until:
                raise self._refusal(holder, now - began)
            if seen == now and holder.line and self.say is not None:
                self.say(f"waiting for another alive-switch command ({holder.line}) "
                         f"{_for(until - now)}")
            self.sleep(min(POLL, until - now))

    def _patience(self, holder: Holder, began: float, seen: float) -> float:
        until = began + self.wait
        if not holder.line:  # taken this instant: its line follows at once
            until = max(until, seen + RECORD_GRACE)
        elif holder.is_retire and not self.is_retire:
            until = max(until, seen + self.retire_wait)
        return until

    def _refusal(self, holder: Holder, waited: float) -> LockHeldError:
        after = f" (waited {waited:.1f} s)" if waited >= POLL else ""
        return LockHeldError(
            f"another alive-switch command holds {self.path}: {holder.line or 'unknown'}"
            f"{after}", "wait for it to finish, or queue behind it with --wait SECONDS; a "
            "holder that dies releases the lock by itself")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _for(seconds: float) -> str:
    return "until it ends" if math.isinf(seconds) else f"for at most {seconds:.0f} s"
