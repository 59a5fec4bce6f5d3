"""``promote`` and ``abort``: orders to a running canary, from another terminal.

The deploy running the canary holds the lock and is the only writer of ``state.json``, so an
order goes to it (the order file of :mod:`.canary`) and this command waits until
``state.json`` shows it acted. With no deploy holding the lock (it was killed mid-step), the
command takes the lock and acts itself: ``abort`` undoes the canary as the next deploy would
(every client back, the canary color stopped), ``promote`` finishes it (the full switch,
then Part 1's commit, watch, drain and standby).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from switcher.errors import LockHeldError, SwitchError, UsageError
from switcher.model import Canary, Pending, Phase, State
from switcher.ops import canary, recovery
from switcher.ops.canary import ANSWER_WAIT, Order
from switcher.ops.deploy import Deployer
from switcher.ops.outcome import Outcome

ANSWER_POLL = 0.05  # seconds between reads of state.json while waiting for the deploy


def give(d: Deployer, order: Order) -> Outcome:
    """Promote or abort the running canary of ``d``'s environment."""
    running = _running_canary(d, order)
    lock = d.lock(f"{order.value} {d.env.name}")
    try:
        lock.acquire()
    except LockHeldError:
        return _ask(d, order, running)
    try:
        return _act(d, order)
    finally:
        lock.release()


@dataclass(frozen=True)
class Running:
    """A canary in state.json, and the deploy's intent it belongs to."""

    state: State
    canary: Canary
    pending: Pending


def _running_canary(d: Deployer, order: Order) -> Running:
    current = d.load_state()
    pending = current.pending
    if current.canary is None or pending is None or pending.phase is not Phase.canary:
        raise UsageError(f"no canary is running for {d.env.name}: nothing to {order.value}; "
                         "nothing was changed",
                         f"see: alive-switch status {d.env.name}; a canary starts with "
                         f"alive-switch deploy {d.env.name} BUILD --canary 5,25,50")
    return Running(current, current.canary, pending)


def _ask(d: Deployer, order: Order, running: Running) -> Outcome:
    """Leave the order to the deploy holding the lock; wait until state.json says it acted."""
    deploy_id = running.pending.deploy_id
    canary.give(d.env_dir, order, deploy_id)
    began = time.monotonic()
    while time.monotonic() - began < ANSWER_WAIT:
        now = _still(d, deploy_id)
        if now is None:
            return _asked(d, order, running)
        time.sleep(ANSWER_POLL)
    if canary.withdraw(d.env_dir):
        raise SwitchError(f"the deploy running the canary of {running.canary.color} did not "
                          f"take the {order.value} order within {ANSWER_WAIT:g} s; the order "
                          "was withdrawn and nothing was changed",
                          f"try again; if that deploy hangs, kill it, then alive-switch "
                          f"{order.value} {d.env.name}")
    raise SwitchError(f"the deploy running the canary of {running.canary.color} took the "
                      f"{order.value} order but state.json does not show it yet",
                      f"see: alive-switch status {d.env.name}")


def _still(d: Deployer, deploy_id: str) -> State | None:
    """state.json while the canary of ``deploy_id`` still runs; None once it has ended."""
    with contextlib.suppress(SwitchError):
        now = d.load_state()
        pending = now.pending
        if pending is not None and pending.deploy_id == deploy_id \
                and pending.phase is Phase.canary:
            return now
        return None
    return None  # unreadable for a moment: only the holder writes it, atomically


def _asked(d: Deployer, order: Order, running: Running) -> Outcome:
    color, old = running.canary.color, running.state.active
    if order is Order.abort:
        message = (f"the running deploy aborted its canary: every client is back on {old}, "
                   f"{color} stops (that deploy exits 5)")
    else:
        message = (f"the running deploy promoted its canary: {color} takes every client now "
                   "and that deploy goes on with the watch, drain and standby")
    d.say(message)
    return Outcome(order.value, True, color, running.pending.build, message)


def _act(d: Deployer, order: Order) -> Outcome:
    """No deploy runs the canary any more: act on it here, under the lock."""
    running = _running_canary(d, order)  # read again under the lock
    color, build = running.canary.color, running.pending.build
    if order is Order.promote:
        return d.promote_left(running.state)
    recovery.begin(d)  # undoes it: every client back, the color stopped, said so
    message = (f"the canary of {color} ({build}) left by an interrupted deploy was undone: "
               f"every client is on {running.state.active}")
    d.say(message)
    d.record({"kind": "abort", "outcome": "ok", "color": color.value, "build": build,
              "deploy_id": running.pending.deploy_id, "message": message})
    return Outcome(order.value, True, color, build, message)


def pause(d: Deployer, max_wait: float) -> Outcome:
    """Hold new requests (tcp: new connections) until ``resume`` or ``max_wait``; never
    waits for the lock, so a pre_switch hook may pause."""
    paused = _paused(d)
    if paused:
        raise UsageError(f"{d.env.name} is already paused until {_clock(paused['until'])} "
                         f"({paused.get('held', 0)} requests held); nothing was changed",
                         f"resume first: alive-switch resume {d.env.name}")
    reply = d.router.pause(max_wait)
    message = (f"paused {d.env.name}: new requests are held until alive-switch resume "
               f"{d.env.name}, or until {_clock(reply['paused_until'])} (then 503 with "
               "Retry-After)")
    d.say(message)
    return Outcome("pause", True, None, "", message)


def resume(d: Deployer) -> Outcome:
    if not _paused(d):
        raise UsageError(f"{d.env.name} is not paused: nothing to resume; nothing was changed",
                         f"see: alive-switch status {d.env.name}")
    reply = d.router.resume()
    message = f"resumed {d.env.name}: {reply.get('released', 0)} held requests released"
    d.say(message)
    return Outcome("resume", True, None, "", message)


def _paused(d: Deployer) -> dict[str, Any]:
    paused = d.router.status().get("paused")
    return paused if isinstance(paused, dict) else {}


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))
