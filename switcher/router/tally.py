"""What each color answered, as the router saw it: counters, a latency histogram, a ring.

    Tally (one per color, cumulative since the router started)
      classes[1..5]   answers by status class (http mode)
      failures[...]   what the router saw itself, by Failure
      connections     client connections forwarded to the color (tcp mode), or handed to
                      it by the kernel (direct mode: the steering's count, read in)
      buckets[0..11]  answers by duration: buckets[i] took ≤ BOUNDS[i] s and > BOUNDS[i-1] s;
                      buckets[11] took > 10 s
      duration_sum    seconds, over all answers in the histogram

    Ring: one Snapshot of every Tally a second, the last RING_SECONDS of them. The figures
    over the last N seconds are the newest snapshot minus the one N seconds older.

A Snapshot is a flat tuple in SNAPSHOT_FIELDS order, so the ring holds no object per request
and a difference is one zip. The wire form of one (``figures_json``) is the FIGURES of
:mod:`switcher.router.control`. Counting costs a few attribute increments and one bisect
per answer: nothing is allocated on the request path.
"""

from __future__ import annotations

import bisect
import collections
import enum
from typing import Any

from switcher.model import DURATION_BOUNDS, FIGURES_RING_SECONDS, STATUS_CLASSES

BOUNDS = DURATION_BOUNDS
CLASSES = STATUS_CLASSES
RING_SECONDS = FIGURES_RING_SECONDS  # the longest `figures` window (and analysis.baseline's)
RECENT_SECONDS = 60  # what `status` calls recent

Snapshot = tuple[float, ...]


class Failure(enum.IntEnum):
    """What the router saw go wrong with a color (its index in Tally.failures)."""

    refused = 0  # the connect was refused (or failed) before anything was sent
    reset = 1  # the connection broke, or the color broke HTTP
    timeout = 2  # no accept within the connect timeout, or no answer within response_timeout


SNAPSHOT_FIELDS = (*CLASSES, *(f.name for f in Failure), "connections",
                   *(f"le {b:g}" for b in BOUNDS), "le +Inf", "sum")
_FAILURES_AT = len(CLASSES)
_CONNECTIONS_AT = _FAILURES_AT + len(Failure)
_BUCKETS_AT = _CONNECTIONS_AT + 1
_SUM_AT = _BUCKETS_AT + len(BOUNDS) + 1
ZERO: Snapshot = (0,) * len(SNAPSHOT_FIELDS)


class Tally:
    """One color's counters (see the module docstring)."""

    __slots__ = ("buckets", "classes", "connections", "duration_sum", "failures")

    def __init__(self) -> None:
        self.classes = [0] * 6  # index = status // 100; 0 is never counted
        self.failures = [0] * len(Failure)
        self.connections = 0
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.duration_sum = 0.0

    def answered(self, status: int, seconds: float) -> None:
        """An answer of ``status`` relayed whole ``seconds`` after its request's head."""
        self.classes[status // 100] += 1
        self.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.duration_sum += seconds

    def snapshot(self) -> Snapshot:
        return (*self.classes[1:], *self.failures, self.connections, *self.buckets,
                self.duration_sum)


def minus(newer: Snapshot, older: Snapshot) -> Snapshot:
    return tuple(a - b for a, b in zip(newer, older, strict=True))


def figures_json(snap: Snapshot) -> dict[str, Any]:
    """A Snapshot as the control socket's FIGURES."""
    return {
        "responses": dict(zip(CLASSES, (int(n) for n in snap[:_FAILURES_AT]), strict=True)),
        "failures": {f.name: int(snap[_FAILURES_AT + f]) for f in Failure},
        "connections": int(snap[_CONNECTIONS_AT]),
        "duration": {"le": list(BOUNDS),
                     "counts": [int(n) for n in snap[_BUCKETS_AT:_SUM_AT]],
                     "sum": round(snap[_SUM_AT], 6)},
    }


class Ring:
    """A Snapshot of every color a second, the last RING_SECONDS; differences over windows."""

    def __init__(self, colors: int, now: float) -> None:
        # (monotonic time, one Snapshot per color); the first is the router's start, at zero.
        self.marks: collections.deque[tuple[float, tuple[Snapshot, ...]]] = \
            collections.deque([(now, (ZERO,) * colors)], maxlen=RING_SECONDS + 1)

    def mark(self, now: float, snaps: tuple[Snapshot, ...]) -> None:
        self.marks.append((now, snaps))

    def since(self, now: float, seconds: float) -> tuple[float, tuple[Snapshot, ...]]:
        """The mark closest to ``seconds`` ago without being younger, or the oldest one:
        (how long ago it was, its snapshots)."""
        marks = self.marks
        target = now - seconds
        chosen = marks[0]
        for mark in marks:  # at most RING_SECONDS + 1, and only on a control request
            if mark[0] > target:
                break
            chosen = mark
        return now - chosen[0], chosen[1]
