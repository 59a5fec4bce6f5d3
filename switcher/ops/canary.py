"""Progressive delivery on one host: a deploy's canary steps, and the orders another
terminal gives them (``promote``, ``abort``).

A step sends ``percent`` of clients to the target for ``step_seconds`` (the router hashes
each client's key, so a client that moved stays moved as the share grows), judged like the
watch at every ``health.interval``: the process, its health, and its answers since the
canary began against the old color's baseline before it; the step's last look must pass
too. The share is in ``state.json`` before the router is told, so a router restarted
mid-step keeps it and a killed deploy leaves it for the next command to undo.

Orders: ``promote``/``abort`` write the order file and the deploy holding the lock (the only
writer of ``state.json``) reads it every ``ORDER_POLL`` s, so an order acts within 1 s. The
file, ``<env_dir>/canary-order.json``::

    {"order": "abort", "deploy_id": "20261202T061500-4242", "pid": 4343, "at": 1790000000.0}

An order for another deploy id (one that has ended) is stale and removed unread.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from switcher import state
from switcher.errors import RouterError
from switcher.model import Canary, Color, Pending, Phase, State
from switcher.ops.site import Site, stop_here
from switcher.ops.traffic import Traffic

if TYPE_CHECKING:
    from pathlib import Path

ORDER_POLL = 0.2  # seconds between the running deploy's reads of the order file
ANSWER_WAIT = 5.0  # seconds promote/abort wait for the running deploy to act on their order


class Order(enum.StrEnum):
    promote = "promote"  # the full switch now, skipping the steps left
    abort = "abort"  # every client back to the old color now, the target stopped


class How(enum.StrEnum):
    """How a canary ended."""

    passed = "passed"
    promoted = "promoted"
    failed = "failed"
    aborted = "aborted"

    @property
    def goes_on(self) -> bool:
        """The deploy goes on with the full switch."""
        return self in (How.passed, How.promoted)


@dataclass(frozen=True)
class Ending:
    how: How
    step: int
    percent: int
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"how": self.how.value, "step": self.step, "percent": self.percent,
                "why": self.why}


def give(env_dir: Path, order: Order, deploy_id: str) -> None:
    record = {"order": order.value, "deploy_id": deploy_id, "pid": os.getpid(),
              "at": round(time.time(), 3)}
    state.write_atomic(env_dir / state.CANARY_ORDER, json.dumps(record).encode(), 0o600)


def take(env_dir: Path, deploy_id: str) -> Order | None:
    """The order given to ``deploy_id``, removed as it is read; None when there is none."""
    path = env_dir / state.CANARY_ORDER
    try:
        raw = state.read_json(path)
    except FileNotFoundError:
        return None
    except state.UNREADABLE:
        raw = {}  # half-written cannot happen (atomic); anything else is not an order
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if raw.get("deploy_id") != deploy_id:
        return None
    try:
        return Order(str(raw.get("order")))
    except ValueError:
        return None


def withdraw(env_dir: Path) -> bool:
    """Remove an order nobody took; True when there was one."""
    try:
        (env_dir / state.CANARY_ORDER).unlink()
    except FileNotFoundError:
        return False
    return True


Look = Callable[[Traffic], str]  # what fails the target at this look ("" when nothing)


@dataclass
class Steps:
    """One deploy's canary: ``run`` the steps, then ``undo`` them if they did not pass."""

    site: Site
    target: Color
    steps: list[int]
    step_seconds: float
    before: State  # state.json as it was before the canary
    intent: Pending  # the deploy's intent; its phase becomes canary
    traffic: Traffic
    look: Look
    records: list[dict[str, Any]] = field(default_factory=list)

    def run(self) -> Ending:
        withdraw(self.site.env_dir)  # an order left for an earlier deploy is not for this one
        for number, percent in enumerate(self.steps, 1):
            ending = self._step(number, percent)
            if ending is not None:
                return ending
        return Ending(How.passed, len(self.steps), self.steps[-1])

    def undo(self, ending: Ending) -> State:
        """Every client back on the old color at once, then, once what it has in flight is
        done, the target stopped and the state without the canary (the router first:
        clients must not wait for systemd)."""
        site = self.site
        with contextlib.suppress(RouterError):
            site.router.set_canary(None)
        site.drain_color(self.target)
        site.stop_quietly(self.target)
        back = site.undo_link(self.before.with_(pending=None, canary=None), self.target)
        state.save_state(site.env_dir, back)
        self._tell(ending.step, ending.percent, ending.how, ending.why)
        return back

    def to_json(self, ending: Ending | None) -> dict[str, Any]:
        """The history record's ``canary``."""
        return {"steps": self.steps, "step_seconds": self.step_seconds,
                "ended": ending.to_json() if ending else None, "records": self.records}

    # -- one step ----------------------------------------------------------------------------

    def _step(self, number: int, percent: int) -> Ending | None:
        """Run step ``number``; None when it passed."""
        canary = Canary(self.target, percent, number, self.intent.deploy_id)
        moved = self.before.with_(pending=Pending(self.target, Phase.canary,
                                                  self.intent.deploy_id, self.intent.build),
                                  canary=canary)
        state.save_state(self.site.env_dir, moved)
        try:
            self.site.router.set_canary(canary)
        except RouterError as exc:
            return Ending(How.failed, number, percent, f"the router refused the canary: "
                          f"{exc.message}")
        self._tell(number, percent, "started")
        stop_here("canary_step")  # test-only: a CLI killed mid-step, the split in place
        ending = self._hold(number, percent)
        if ending is not None:
            return ending
        verdict = self.traffic.look()
        if verdict is not None and not verdict.ok:
            return Ending(How.failed, number, percent, verdict.message)
        self._tell(number, percent, How.passed, self.traffic.note())
        return None

    def _hold(self, number: int, percent: int) -> Ending | None:
        """Until the step's end: orders every ORDER_POLL, a look every health.interval."""
        clock, interval = self.site.clock, self.site.env.health.interval
        deadline = clock.now() + self.step_seconds
        next_look = clock.now() + interval
        while (left := deadline - clock.now()) > 0:
            order = take(self.site.env_dir, self.intent.deploy_id)
            if order is Order.abort:
                return Ending(How.aborted, number, percent, "aborted by `alive-switch abort`")
            if order is Order.promote:
                return Ending(How.promoted, number, percent,
                              "promoted by `alive-switch promote`")
            if clock.now() >= next_look:
                problem = self.look(self.traffic)
                if problem:
                    return Ending(How.failed, number, percent, problem)
                next_look = clock.now() + interval
            clock.sleep(max(0.0, min(ORDER_POLL, left, next_look - clock.now())))
        return None

    def _tell(self, number: int, percent: int, status: str, note: str = "") -> None:
        figures = self.traffic.to_json().get("colors")
        record = {"event": "canary", "step": number, "of": len(self.steps),
                  "percent": percent, "color": self.target.value, "status": str(status),
                  "seconds": self.step_seconds, "time": round(time.time(), 3),
                  "verdict": self.traffic.verdict.to_json() if self.traffic.verdict else None,
                  "figures": figures}
        if status != "started":
            self.records.append({k: v for k, v in record.items() if k != "event"})
        line = (f"canary step {number}/{len(self.steps)}: {percent} % of clients on "
                f"{self.target} ({status}{': ' + note if note else ''})")
        if status == "started":
            line = (f"canary step {number}/{len(self.steps)}: {percent} % of clients on "
                    f"{self.target} for {self.step_seconds:g} s")
        self.site.tell(record, line)
