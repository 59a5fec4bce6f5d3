"""Runs deploys, rollbacks and retirements through the adapters (systemd, router, state,
health), in DESIGN.md's order, and reconciles what a killed run left behind.

Timeline of a switch at T0: the old color gets no new work from T0 and may finish what it
has until T0 + drain; the new color is watched until T0 + watch while the old one keeps
running; the old color stays the router's fallback (and on standby) until
T0 + max(drain, watch + standby), when its retire timer stops it.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switcher import audit, health, plan, state
from switcher.config import Config, Environment
from switcher.errors import (
    AbortedError,
    NeedsRepairError,
    SwitchedBackError,
    SwitchError,
    UsageError,
)
from switcher.lock import Lock
from switcher.model import (
    RUN_DIR,
    Color,
    Fallback,
    Pending,
    Phase,
    State,
    color_unit,
    unit_names,
)
from switcher.ops import builds, checks
from switcher.progress import Plain, Progress
from switcher.routerctl import Router, serving
from switcher.systemd import Systemd

STOP_AT_VAR = "ALIVE_SWITCH_TEST_STOP_AT"
RETIRE_MARGIN = 0.5  # the retire timer fires this long after the fallback window closes
# A retire holding the lock stops one color: systemd gives it stop_timeout, then SIGKILL; the
# margin covers that kill, the CLI's own start and its state write.
RETIRE_LOCK_MARGIN = 10.0
SWITCH_BACK = "switch-back"  # the deploy_id of a switch-back's intent
HOOK_TAIL = 20  # lines of a hook's output kept in history
HOOK_IDENTIFIER = "alive-switch-hook"  # SYSLOG_IDENTIFIER of hook output in the journal
Say = Callable[[str], None]


@dataclass
class Clock:
    """Wall time for deadlines shared with the router; injectable for tests."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


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

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "ok": self.ok,
                "target": self.target.value if self.target else None, "build": self.build,
                "message": self.message, "phases": self.phases, "warnings": self.warnings,
                "hooks": self.hooks}


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


def stop_here(point: str) -> None:
    """Test-only fault injection: with ``ALIVE_SWITCH_TEST_STOP_AT=<point>`` the CLI freezes
    (SIGSTOP) there, so a test can SIGKILL it or let it go on (SIGCONT) at a chosen moment.
    The points are the deploy phases and ``retire`` (a retire holding the lock)."""
    if os.environ.get(STOP_AT_VAR) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


class Phases:
    """Times each phase, reports it as it runs (``progress``: plain lines by default), and
    honours the fault-injection hook. ``limit`` is the phase's own bound, when it has one
    (the health gate's timeout, the watch), for a terminal to show ``elapsed / limit``."""

    def __init__(self, say: Say, progress: Progress | None = None) -> None:
        self.say = say
        self.progress = progress or _SayProgress(say)
        self.durations: dict[str, float] = {}
        self.current: Phase | None = None

    @contextlib.contextmanager
    def __call__(self, phase: Phase, label: str = "", limit: float | None = None
                 ) -> Iterator[None]:
        self.current = phase
        stop_here(phase.value)
        self.progress.begin(phase.value, limit)
        began = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            took = time.monotonic() - began
            self.durations[phase.value] = round(took, 3)
            self.progress.end(phase.value, took, label, ok=ok)


class _SayProgress(Plain):
    """Plain phase lines through a ``say`` function (the default, and the unit tests')."""

    def __init__(self, say: Say) -> None:  # no stream of its own: no super().__init__
        self._say = say

    def say(self, line: str) -> None:
        self._say(line)


class Deployer:
    def __init__(self, cfg: Config, env: Environment, sd: Systemd, router: Router, *,
                 say: Say, clock: Clock | None = None, run_dir: Path = Path(RUN_DIR),
                 progress: Progress | None = None, lock_wait: float | None = None) -> None:
        self.cfg, self.env, self.sd, self.router, self.say = cfg, env, sd, router, say
        self.progress = progress
        self.lock_wait = lock_wait  # --wait; None: the command's own (see lock_wait_for)
        self.clock = clock or Clock()
        self.run_dir = run_dir
        self.prefix = cfg.unit_prefix(env)
        self.env_dir = cfg.env_dir(env)
        self.names = unit_names(cfg.app, env.name)

    # ---------------------------------------------------------------- names and facts

    def unit(self, color: Color) -> str:
        return color_unit(self.cfg.app, self.env.name, color)

    def timer(self, color: Color) -> str:
        return f"{self.prefix}-retire-{color.value}"

    def lock(self, command: str) -> Lock:
        """The environment's lock for ``command``; see :mod:`switcher.lock` for who waits."""
        lock = Lock(self.run_dir / f"{self.prefix}.lock", command, say=self.say,
                    retire_wait=self.env.unit.stop_timeout + RETIRE_LOCK_MARGIN)
        lock.wait = lock_wait_for(lock, self.lock_wait)
        return lock

    def load_state(self) -> State:
        try:
            return state.load_state(self.env_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NeedsRepairError(
                f"{self.env_dir / state.STATE} is unreadable ({exc}); the router keeps "
                "serving its last switch",
                f"run `alive-switch repair {self.env.name}`") from None

    def linked_build(self, color: Color) -> str | None:
        link = state.color_link(self.env_dir, color)
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def active_states(self) -> dict[str, str]:
        """ActiveState of the router, both colors and both retire timers, in one systemctl
        call (each costs about 10 ms, and a warm rollback has 0.5 s in all)."""
        units = [self.names["router"], *(self.unit(c) for c in Color),
                 *(f"{self.timer(c)}.timer" for c in Color)]
        shown = self.sd.show_many(units, "ActiveState")
        return {unit: shown.get(unit, {}).get("ActiveState", "") for unit in units}

    def running_builds(self, active: dict[str, str] | None = None) -> dict[Color, str | None]:
        """The build each color runs (None when its unit is not active): now, or as of
        ``active`` (from :meth:`active_states`)."""
        states = self.active_states() if active is None else active
        return {color: self.linked_build(color) if states[self.unit(color)] == "active"
                else None for color in Color}

    def identity(self, color: Color) -> dict[str, str]:
        return self.sd.show(self.unit(color), "ActiveState", "SubState", "MainPID",
                            "InvocationID", "Result")

    def gone(self, color: Color, started: dict[str, str]) -> str:
        """"" while ``color`` runs the very process we started, else what happened."""
        now = self.identity(color)
        if now["ActiveState"] != "active" or now["MainPID"] in ("", "0"):
            return (f"{self.unit(color)} is {now['ActiveState']} ({now['SubState']}, "
                    f"result {now['Result']})")
        if (now["MainPID"], now["InvocationID"]) != (started["MainPID"],
                                                     started["InvocationID"]):
            return (f"{self.unit(color)} restarted (MainPID {started['MainPID']} → "
                    f"{now['MainPID']})")
        return ""

    def journal_hint(self, color: Color) -> str:
        return f"see: journalctl -u {self.unit(color)} -n 50 --no-pager"

    # ---------------------------------------------------------------- commands

    def deploy(self, build_arg: str | None, *, force: bool, dry_run: bool) -> Outcome:
        if dry_run:
            return self._dry_run(build_arg, force)
        with self.lock(f"deploy {self.env.name} {build_arg or ''}".strip()):
            current, running = self.begin()
            build = builds.resolve(self.env, build_arg)
            if build_arg is None:
                self.say(f"build: {build.name} (newest deployable in {self.env.builds})")
            the_plan = plan.plan_deploy(current, build.name, force=force, running=running)
            return self._execute(the_plan, current, build.path)

    def rollback(self, *, dry_run: bool) -> Outcome:
        if dry_run:
            the_plan = plan.plan_rollback(self.load_state(), self.running_builds())
            for line in the_plan.describe():
                self.say(line)
            return Outcome("rollback", True, the_plan.target, the_plan.build, "dry run")
        with self.lock(f"rollback {self.env.name}"):
            current, running = self.begin()
            the_plan = plan.plan_rollback(current, running)
            path = Path(self.env.builds) / the_plan.build
            if not the_plan.warm and not path.is_dir():
                raise AbortedError(
                    f"cannot roll back to {the_plan.target} ({the_plan.build}): {path} is gone "
                    "and the color is not running; nothing was changed",
                    f"deploy another build: alive-switch deploy {self.env.name} BUILD")
            return self._execute(the_plan, current, path)

    def retire(self, color: Color) -> Outcome:
        with self.lock(f"retire {self.env.name} {color.value}"):
            stop_here("retire")
            current = self.load_state()
            now = self.clock.now()
            reason = _why_not_retire(current, color, now)
            if reason:
                raise UsageError(f"not retiring {color}: {reason}",
                                 "nothing to do; a later deploy schedules its retirement")
            warnings = self._stop_and_check(color)
            if current.fallback and current.fallback.color == color:
                self.router.set_fallback(None)
                state.save_state(self.env_dir, current.with_(fallback=None))
            message = f"retired {color} ({self.unit(color)} stopped)"
            self.say(message)
            self.record({"kind": "retire", "color": color.value, "outcome": "ok",
                         "build": current.builds.get(color), "warnings": warnings})
            return Outcome("retire", True, color, current.builds.get(color) or "", message,
                           warnings=warnings)

    def _stop_and_check(self, color: Color) -> list[str]:
        """Stop a color; a stop that ran out of time ended in SIGKILL: warn about it."""
        self.sd.stop(self.unit(color))
        result = self.sd.show(self.unit(color), "Result")["Result"]
        if result not in ("timeout", "signal"):
            return []
        warning = (f"{self.unit(color)} did not stop within unit.stop_timeout "
                   f"({self.env.unit.stop_timeout:g} s) and was killed (result {result})")
        self.say(f"warning: {warning}")
        return [warning]

    def _dry_run(self, build_arg: str | None, force: bool) -> Outcome:
        build = builds.resolve(self.env, build_arg)
        the_plan = plan.plan_deploy(self.load_state(), build.name, force=force,
                                    running=self.running_builds())
        for line in the_plan.describe():
            self.say(line)
        return Outcome("deploy", True, the_plan.target, build.name, "dry run")

    # ---------------------------------------------------------------- step 1: reconcile

    def begin(self) -> tuple[State, dict[Color, str | None]]:
        """Router running, then reconcile state.json with what the router serves. Returns
        the state and the build each color runs."""
        if (self.env_dir / state.TAKEOVER_INTENT).exists():
            self._resume_takeover()
        active = self.active_states()
        router_unit = self.names["router"]
        if active[router_unit] != "active":
            self.sd.start(router_unit)
            self.say(f"started {router_unit}")
        current = self.load_state()
        actual = serving(self.router.status())
        action = plan.reconcile(current, actual)
        if action is plan.Reconcile.nothing:
            self._ensure_retire_timer(current, active)
            return current, self.running_builds(active)
        self.say(f"reconcile: {action.value}")
        fixed = self._reconcile(action, current, actual)
        self.record({"kind": "reconcile", "action": action.name, "outcome": "ok",
                       "router_was": actual.value if actual else None})
        return fixed, self.running_builds()  # the reconcile may have stopped a color

    def _resume_takeover(self) -> None:
        from switcher.ops.takeover import runner as takeover  # noqa: PLC0415 - it imports this module

        if takeover.resume(self) is takeover.Resumed.undone:
            raise AbortedError(
                "an interrupted takeover was undone (see above): the legacy unit serves "
                "again and nothing else was changed",
                f"run the takeover again: alive-switch install {self.env.name} --takeover UNIT")

    def _ensure_retire_timer(self, current: State, active: dict[str, str]) -> None:
        """A run killed between its commit and step 8 left the old color without a retire
        timer: schedule it now, or it would stay up for good."""
        fb = current.fallback
        if fb is None or fb.color == current.active:
            return
        if active[self.unit(fb.color)] != "active":
            return
        if active[f"{self.timer(fb.color)}.timer"] != "active":
            self.say(f"reconcile: {fb.color} had no retire timer")
            self._schedule_retire(fb.color, fb.until)

    def _reconcile(self, action: plan.Reconcile, current: State, actual: Color | None
                   ) -> State:
        pending = current.pending
        if action is plan.Reconcile.commit and pending is not None \
                and pending.deploy_id == SWITCH_BACK:
            failed = pending.target.other
            self._stop_quietly(failed)
            fixed = self._undo_link(current.with_(pending=None), failed)
            state.save_state(self.env_dir, fixed)
            self._move_boot_enable(pending.target)
            self.say(f"finished the switch back to {pending.target}; stopped {failed}")
            return fixed
        if action is plan.Reconcile.commit and pending is not None:
            old = current.active
            fixed = self._committed(current, pending.target, pending.build, pending.deploy_id,
                                    self.clock.now())
            state.save_state(self.env_dir, fixed)
            self._move_boot_enable(pending.target)
            if old is not None and fixed.fallback is not None:
                self._schedule_retire(old, fixed.fallback.until)
            return fixed
        if pending is not None:
            target = pending.target
            if target not in (current.active, current.fallback_at(self.clock.now())):
                self.sd.stop(self.unit(target))
                self.say(f"stopped {self.unit(target)} (its deploy was interrupted)")
            current = self._undo_link(current, target)
        if actual != current.active and current.active is not None:
            self.router.switch(current.active, current.fallback, current.drain_until,
                               current.builds)
            self.say(f"router switched back to {current.active}")
        state.save_state(self.env_dir, current)
        return current

    # ---------------------------------------------------------------- steps 2-9

    def _execute(self, the_plan: plan.Plan, current: State, path: Path) -> Outcome:
        if the_plan.noop:
            message = the_plan.describe()[0]
            self.say(message)
            return Outcome(the_plan.kind.value, True, the_plan.target, the_plan.build, message)
        deploy_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        phases = Phases(self.say, self.progress)
        outcome = Outcome(the_plan.kind.value, False, the_plan.target, the_plan.build)
        result = "failed"
        self.say(f"{the_plan.kind} {the_plan.build} → {the_plan.target} "
                 f"(live now: {the_plan.old.value if the_plan.old else 'nothing'})")
        try:
            self._steps(the_plan, current, path, deploy_id=deploy_id, phases=phases,
                        outcome=outcome)
            outcome.ok = True
        except AbortedError as exc:
            outcome.message = exc.message
            self._clear_intent(the_plan.target)
            raise
        except SwitchedBackError as exc:
            outcome.message = exc.message
            result = "switched-back"
            raise
        except SwitchError as exc:
            outcome.message = exc.message
            raise
        finally:
            outcome.phases = phases.durations
            self.record({"kind": the_plan.kind.value, "deploy_id": deploy_id,
                           "color": the_plan.target.value, "build": the_plan.build,
                           "from": the_plan.old.value if the_plan.old else None,
                           "outcome": "ok" if outcome.ok else result,
                           "failed_phase": None if outcome.ok else _value(phases.current),
                           "message": outcome.message, "phases": phases.durations,
                           "warnings": outcome.warnings, "hooks": outcome.hooks})
        return outcome

    def _steps(self, the_plan: plan.Plan, current: State, path: Path, *, deploy_id: str,
               phases: Phases, outcome: Outcome) -> None:
        target, old = the_plan.target, the_plan.old
        # Pre-flight first: a failed check must leave the standby color's timer and
        # fallback as they were ("nothing was changed").
        with phases(Phase.preflight):
            self._preflight(target, old, path)
        with phases(Phase.cancel_timer):
            self.sd.cancel(self.timer(target))
            current = self._withdraw_fallback(current, target)
        intent = Pending(target, Phase.start, deploy_id, the_plan.build)
        with phases(Phase.start, "warm: already running" if the_plan.warm else ""):
            state.save_state(self.env_dir, current.with_(pending=intent))
            started = self._start(target, the_plan.build, path, warm=the_plan.warm)
        with phases(Phase.health, limit=self.env.health.timeout):
            self._health_gate(target, started)
        with phases(Phase.pre_switch):
            self._hook("pre_switch", target, the_plan.build, path, abort=True,
                       outcome=outcome)
        with phases(Phase.switching):
            self._still_healthy_process(target, started)
            switching = current.with_(pending=Pending(target, Phase.switching, deploy_id,
                                                      the_plan.build))
            state.save_state(self.env_dir, switching)
            t0 = self.clock.now()
            committed = self._committed(current, target, the_plan.build, deploy_id, t0)
            self.router.switch(target, committed.fallback, committed.drain_until,
                               committed.builds)
        with phases(Phase.commit):
            state.save_state(self.env_dir, committed)
            # With the commit, not after the hooks: a run killed later must not leave the
            # old color as the one that starts at boot.
            self._move_boot_enable(target)
        with phases(Phase.watch, limit=self.env.watch):
            self._watch(target, started, t0, current, the_plan.build)
        with phases(Phase.schedule_retire):
            if old is not None and committed.fallback is not None:
                warning = self._schedule_retire(old, committed.fallback.until)
                if warning:
                    outcome.warnings.append(warning)
        with phases(Phase.post_switch):
            warning = self._hook("post_switch", target, the_plan.build, path, abort=False,
                                 outcome=outcome)
            if warning:
                outcome.warnings.append(warning)
        outcome.message = f"{the_plan.build} is live on {target}"
        self.say(outcome.message)

    def _withdraw_fallback(self, current: State, target: Color) -> State:
        """A color about to be (re)started or health-checked must not get fallback traffic.
        The router is told even when state.json names no fallback (after a repair, say):
        the only fallback there can be is the idle color, which is the target."""
        self.router.set_fallback(None)
        if current.fallback is None or current.fallback.color != target:
            return current
        withdrawn = current.with_(fallback=None)
        state.save_state(self.env_dir, withdrawn)
        return withdrawn

    def _clear_intent(self, target: Color) -> None:
        """After an abort before the switch: nothing pending, the color's link back."""
        with contextlib.suppress(NeedsRepairError, OSError):
            current = self.load_state()
            if current.pending is not None and not current.pending.phase.past_switch:
                state.save_state(self.env_dir, self._undo_link(current, target))

    def _undo_link(self, current: State, target: Color) -> State:
        """Point ``target`` back at the build it last ran for real, so a refused build
        never becomes what a rollback would start. ``builds`` keeps that build's name."""
        before = current.builds.get(target)
        path = Path(self.env.builds) / before if before else None
        if path is not None and path.is_dir() and self.linked_build(target) != before:
            state.symlink_atomic(state.color_link(self.env_dir, target), path)
            self.say(f"{target} points at {before} again")
        return current.with_(pending=None)

    def _committed(self, current: State, target: Color, build: str, deploy_id: str,
                   t0: float) -> State:
        old = current.active if current.active != target else None
        window = max(self.env.drain, self.env.watch + self.env.standby)
        return current.with_(
            active=target, previous=old if old is not None else current.previous,
            builds={**current.builds, target: build}, pending=None,
            fallback=Fallback(old, t0 + window) if old is not None else None,
            drain_until=t0 + self.env.drain, deploy_id=deploy_id)

    def preflight(self, target: Color, live: Color | None, path: Path) -> list[checks.Check]:
        subject = checks.Subject(self.cfg.app, self.env, self.sd, target, live, path)
        results = checks.run_all(subject)
        for result in results:
            if result.level is not checks.Level.ok:
                self.say(f"    {result.line()}")
        return results

    def _preflight(self, target: Color, live: Color | None, path: Path) -> None:
        failed = checks.failures(self.preflight(target, live, path))
        if failed:
            raise AbortedError("pre-flight failed: " + "; ".join(
                f"{c.name}: {c.detail}" for c in failed) + "; nothing was changed",
                f"fix it, then deploy again (alive-switch check {self.env.name})")

    def _start(self, target: Color, build: str, path: Path, *, warm: bool) -> dict[str, str]:
        unit = self.unit(target)
        if not warm:
            state.symlink_atomic(state.color_link(self.env_dir, target), path)
            state.write_atomic(self.env_dir / f"{target.value}.env",
                               f"ALIVE_SWITCH_BUILD={_env_quote(build)}\n".encode())
            self.sd.reset_failed(unit)
            try:
                self.sd.restart(unit)
            except SwitchError as exc:
                self._stop_quietly(target)
                raise AbortedError(f"{target} failed to start {build}: {exc.message}",
                                   self.journal_hint(target)) from None
        started = self.identity(target)
        gone = self.gone(target, started)
        if gone:
            self._stop_quietly(target)
            raise AbortedError(f"{target} failed to start {build}: {gone}; the live color "
                               "still serves", self.journal_hint(target))
        return started

    def _health_gate(self, target: Color, started: dict[str, str]) -> None:
        host, port = self.env.host, self.env.port(target)
        result = health.wait_healthy(host, port, self.env.health,
                                     still_running=lambda: self.gone(target, started),
                                     sleep=self.clock.sleep)
        if result.exited:
            self._stop_quietly(target)
            raise AbortedError(f"{target} failed to start: {result.detail}; {target} stopped, "
                               "the live color still serves", self.journal_hint(target))
        if not result.ok:
            self._stop_quietly(target)
            where = health.url(host, port, self.env.health.path)
            raise AbortedError(f"{target} failed its health check: GET {where} → "
                               f"{result.detail}; {target} stopped, the live color still "
                               "serves", self.journal_hint(target))

    def _still_healthy_process(self, target: Color, started: dict[str, str]) -> None:
        """The process that passed the gate must be the one that gets traffic."""
        gone = self.gone(target, started)
        if gone:
            self._stop_quietly(target)
            raise AbortedError(f"{target} died before the switch: {gone}; {target} stopped, "
                               "the live color still serves", self.journal_hint(target))

    def _watch(self, target: Color, started: dict[str, str], t0: float, before: State,
               build: str) -> None:
        deadline = t0 + self.env.watch
        interval = self.env.health.interval
        while (left := deadline - self.clock.now()) > 0:
            problem = self.gone(target, started)
            if not problem:
                probe = health.probe(self.env.host, self.env.port(target), self.env.health,
                                     timeout=max(interval, 1.0))
                problem = "" if probe.ok else f"health check → {probe.detail}"
            if problem:
                self._switch_back(target, before, build, problem)
            self.clock.sleep(min(interval, left))

    def _switch_back(self, target: Color, before: State, build: str, problem: str) -> None:
        if before.active is None:
            raise SwitchError(f"{target} failed during the watch ({problem}); this was the "
                              f"first deploy, so there is no color to switch back to and "
                              f"{target} keeps serving (systemd restarts it on failure)",
                              self.journal_hint(target))
        fallback = before.fallback if before.fallback and before.fallback.color != target else None
        back = before.with_(pending=None, fallback=fallback)
        live_build = before.builds.get(before.active) or ""
        state.save_state(self.env_dir, before.with_(pending=Pending(
            before.active, Phase.switching, SWITCH_BACK, live_build)))
        self.router.switch(before.active, back.fallback, back.drain_until, back.builds)
        self._stop_quietly(target)
        back = self._undo_link(back, target)  # a failed build never becomes a rollback target
        state.save_state(self.env_dir, back)
        self._move_boot_enable(before.active)
        raise SwitchedBackError(
            f"{target} failed during the watch ({problem}); switched back to "
            f"{before.active} and stopped {target}", self.journal_hint(target))

    def _schedule_retire(self, old: Color, until: float) -> str:
        """Returns a warning, or "" when scheduled (or retired now)."""
        delay = until - self.clock.now() + RETIRE_MARGIN
        name = self.timer(old)
        if self.env.standby == 0 and delay <= RETIRE_MARGIN:
            warnings = self._stop_and_check(old)
            self.say(f"retired {old} (standby = 0)")
            return "; ".join(warnings)
        self.sd.cancel(name)
        argv = [*self_command(), "--config", os.path.abspath(self.cfg.path),
                "retire", self.env.name, old.value]
        try:
            self.sd.schedule(name, max(delay, 0.1), argv)
        except SwitchError as exc:
            warning = (f"could not schedule the retirement of {old}: {exc.message}; it stays "
                       f"up until `alive-switch retire {self.env.name} {old.value}`")
            self.say(f"warning: {warning}")
            return warning
        self.say(f"{old} on standby; retires in {delay:.0f} s ({name}.timer)")
        return ""

    def _move_boot_enable(self, target: Color) -> None:
        self.sd.enable(self.unit(target))
        self.sd.disable(self.unit(target.other))

    def _hook(self, name: str, color: Color, build: str, path: Path, *, abort: bool,
              outcome: Outcome) -> str:
        run = self.run_hook(name, color, build, path)
        if run is None:
            return ""
        outcome.hooks.append(run.to_json())
        if run.ok:
            return ""
        if abort:
            self._stop_quietly(color)
            raise AbortedError(f"{name} hook failed ({run.outcome}): {run.command}; {color} "
                               "stopped, the live color still serves",
                               "fix the hook and deploy again; its output: alive-switch "
                               f"history {self.env.name}, journalctl -t {HOOK_IDENTIFIER}")
        warning = f"{name} hook failed ({run.outcome}): {run.command}; traffic stays on {color}"
        self.say(f"warning: {warning}")
        return warning

    def run_hook(self, name: str, color: Color, build: str, path: Path) -> HookRun | None:
        """Run hook ``name`` (None when not configured) in the build directory with the
        environment of ``color``; each line of its output goes to the terminal and the journal
        as it comes; after ``hook_timeout`` its whole process group is killed."""
        command: str = getattr(self.env, name)
        if not command:
            return None
        env = {**os.environ, **self.env.environment, "COLOR": color.value,
               "HOST": self.env.host, "PORT": str(self.env.port(color)),
               "ALIVE_SWITCH_BUILD": build, "ALIVE_SWITCH_ENV": self.env.name}
        fields = {"ALIVE_SWITCH_APP": self.cfg.app, "ALIVE_SWITCH_ENV": self.env.name,
                  "ALIVE_SWITCH_HOOK": name, "ALIVE_SWITCH_COLOR": color.value,
                  "ALIVE_SWITCH_BUILD": build}
        tail: collections.deque[str] = collections.deque(maxlen=HOOK_TAIL)

        def line(text: str) -> None:
            tail.append(text)
            self.say(f"    {name}: {text}")
            _journal(text, 6, fields)

        began = time.monotonic()
        try:
            outcome = _run_hook_process(command, path, env, self.env.hook_timeout, line)
        except OSError as exc:
            outcome = f"could not run: {exc}"
        run = HookRun(name, command, outcome, round(time.monotonic() - began, 3), list(tail))
        _journal(f"{name} hook: {outcome} after {run.seconds:g} s: {command}",
                 6 if run.ok else 3, fields)
        return run

    def _stop_quietly(self, color: Color) -> None:
        with contextlib.suppress(SwitchError):
            self.sd.stop(self.unit(color))

    def record(self, record: dict[str, Any]) -> None:
        record = {"time": round(self.clock.now(), 3), "env": self.env.name, **record}
        with contextlib.suppress(OSError):
            state.append_history(self.env_dir, record)
        audit.send(self.cfg.app, record)


def lock_wait_for(lock: Lock, asked: float | None) -> float:
    """``--wait`` when given; else a retire waits as long as its holder holds (a standby
    timer must neither fail nor give up: its color would stay up with no timer) and every
    other command is refused at once."""
    if asked is not None:
        return asked
    return math.inf if lock.is_retire else 0.0


def _why_not_retire(current: State, color: Color, now: float) -> str:
    if color in (current.serving(), current.active):
        return "it is the live color"
    if current.pending is not None and current.pending.target == color:
        return "a deploy to it is pending"
    fb = current.fallback
    if fb is not None and fb.color == color and fb.open_at(now):
        return f"it is the fallback for {fb.until - now:.0f} s more"
    return ""


def _env_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _run_hook_process(command: str, cwd: Path, env: dict[str, str], timeout: float,
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


def _value(phase: Phase | None) -> str | None:
    return phase.value if phase else None


def self_command() -> list[str]:
    """How a timer runs this very alive-switch: an absolute path, never a PATH lookup."""
    script = os.path.abspath(sys.argv[0])
    if script.endswith(".py") or not os.access(script, os.X_OK):
        return [sys.executable, "-m", "switcher"]
    return [script]


def repair(deployer: Deployer) -> list[str]:
    """Rebuild ``state.json`` from the router's color, the color links and history."""
    d = deployer
    done: list[str] = []
    with d.lock(f"repair {d.env.name}"):
        router_unit = d.names["router"]
        if d.sd.show(router_unit, "ActiveState")["ActiveState"] != "active":
            d.sd.start(router_unit)
            done.append(f"started {router_unit}")
        try:
            actual = serving(d.router.status())
        except SwitchError as exc:
            actual = None
            done.append(f"router not reachable ({exc.message}); using history")
        records = [r for r in state.read_history(d.env_dir)
                   if r.get("kind") in ("deploy", "rollback") and r.get("outcome") == "ok"]
        last = records[-1] if records else None
        active = actual or (Color(last["color"]) if last else None)
        previous = Color(last["from"]) if last and last.get("from") else None
        if previous == active:
            previous = None
        repaired = State(active=active, previous=previous,
                         builds={c: d.linked_build(c) for c in Color},
                         deploy_id=str(last.get("deploy_id", "")) if last else "",
                         updated=time.time())
        if actual is None and active is not None:
            d.router.switch(active, None, None, repaired.builds)
            done.append(f"router switched to {active}")
        state.save_state(d.env_dir, repaired)
        done.append(f"state.json rewritten: live {_value_color(active)} "
                    f"({repaired.builds.get(active) if active else '-'}), previous "
                    f"{_value_color(previous)}, nothing pending")
        d.record({"kind": "repair", "outcome": "ok", "color": _value_color(active)})
    return done


def _value_color(color: Color | None) -> str:
    return color.value if color else "none"
