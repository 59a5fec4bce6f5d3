"""Site: one environment as the operations see it — its config and names, the adapters
(systemd, the router, state files, the lock, history, hooks), the reporter and the clock —
and the steps on a color that deploy, recovery and takeover share: pre-flight, the health
gate, stopping, the retire timer, the boot-time enable, the one phase runner.

The phase runner is also the one place that reads the test-only fault injection:

- ``ALIVE_SWITCH_TEST_STOP_AT=<phase>``: SIGSTOP on entering that phase (a deploy's, or
  ``retire`` for a retire holding the lock), so a test can SIGKILL or SIGCONT it there;
- ``ALIVE_SWITCH_TEST_TAKEOVER_KILL=<step>``: SIGKILL on entering that takeover step;
- ``ALIVE_SWITCH_TEST_TAKEOVER_FAIL=<step>``: that takeover step fails.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switcher import audit, health, hooks, state
from switcher.config import Config, Environment
from switcher.errors import AbortedError, NeedsRepairError, SwitchError
from switcher.hooks import HookRun
from switcher.lock import Lock
from switcher.model import Color, Fallback, Mode, State
from switcher.names import RUN_DIR, Names
from switcher.ops import checks
from switcher.progress import Plain, Progress
from switcher.routerctl import Router
from switcher.systemd import Systemd

STOP_AT_VAR = "ALIVE_SWITCH_TEST_STOP_AT"
TAKEOVER_FAIL_VAR = "ALIVE_SWITCH_TEST_TAKEOVER_FAIL"
TAKEOVER_KILL_VAR = "ALIVE_SWITCH_TEST_TAKEOVER_KILL"
SWITCH_BACK = "switch-back"  # the deploy_id of a switch-back's intent
RETIRE_MARGIN = 0.5  # the retire timer fires this long after the fallback window closes
# A retire holding the lock stops one color: systemd gives it stop_timeout, then SIGKILL; the
# margin covers that kill, the CLI's own start and its state write.
RETIRE_LOCK_MARGIN = 10.0
Say = Callable[[str], None]
DRAIN_POLL = 0.05  # seconds between looks at a draining color's in-flight count
DRAIN_POLL_TIMEOUT = 1.0  # per look: a hung router must not stall the drain


@dataclass
class Clock:
    """Wall time for deadlines shared with the router; injectable for tests."""

    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


def stop_here(point: str) -> None:
    """Test-only fault injection: with ``ALIVE_SWITCH_TEST_STOP_AT=<point>`` the CLI freezes
    (SIGSTOP) there, so a test can SIGKILL it or let it go on (SIGCONT) at a chosen moment.
    The points are the deploy phases, ``canary_step`` (a canary step's split in place) and
    ``retire`` (a retire holding the lock)."""
    if os.environ.get(STOP_AT_VAR) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


class Phases:
    """The one phase runner: times each phase (deploy phases, takeover steps), reports it
    as it runs (``progress``: plain lines by default) and honours the fault injection.
    ``limit`` is the phase's own bound, when it has one (the health gate's timeout, the
    watch), for a terminal to show ``elapsed / limit``."""

    def __init__(self, say: Say, progress: Progress | None = None) -> None:
        self.say = say
        self.progress = progress or _SayProgress(say)
        self.durations: dict[str, float] = {}
        self.current: enum.StrEnum | None = None

    @contextlib.contextmanager
    def __call__(self, phase: enum.StrEnum, label: str = "", limit: float | None = None, *,
                 kill_inside: bool = False) -> Iterator[None]:
        """``kill_inside``: the phase takes its injected SIGKILL at its own ``kill_here``."""
        self.current = phase
        _inject(phase.value, kill=not kill_inside)
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


def kill_here(point: str) -> None:
    """Test-only: SIGKILL with ``ALIVE_SWITCH_TEST_TAKEOVER_KILL=<point>``."""
    if os.environ.get(TAKEOVER_KILL_VAR) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _inject(point: str, *, kill: bool) -> None:
    stop_here(point)
    if kill:
        kill_here(point)
    if os.environ.get(TAKEOVER_FAIL_VAR) == point:
        raise SwitchError(f"injected failure at step {point} ({TAKEOVER_FAIL_VAR})")


class _SayProgress(Plain):
    """Plain phase lines through a ``say`` function (the default, and the unit tests')."""

    def __init__(self, say: Say) -> None:  # no stream of its own: no super().__init__
        self._say = say

    def say(self, line: str) -> None:
        self._say(line)


class Site:
    """One environment as the operations see it (see the module docstring)."""

    def __init__(self, cfg: Config, env: Environment, sd: Systemd, router: Router, *,
                 say: Say, clock: Clock | None = None, run_dir: Path = Path(RUN_DIR),
                 progress: Progress | None = None, lock_wait: float | None = None) -> None:
        self.cfg, self.env, self.sd, self.router, self.say = cfg, env, sd, router, say
        self.progress = progress
        self.lock_wait = lock_wait  # --wait; None: the command's own (see lock_wait_for)
        self.clock = clock or Clock()
        self.run_dir = run_dir
        self.names = Names(cfg.app, env.name)
        self.prefix = self.names.prefix
        self.env_dir = cfg.env_dir(env)

    def phases(self) -> Phases:
        return Phases(self.say, self.progress)

    def tell(self, event: dict[str, Any], line: str) -> None:
        """Something with figures: ``line`` for people, ``event`` for --json."""
        (self.progress or _SayProgress(self.say)).event(event, line)

    @staticmethod
    def new_deploy_id() -> str:
        return time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"

    def unit(self, color: Color) -> str:
        return self.names.color(color)

    def timer(self, color: Color) -> str:
        return self.names.retire(color)

    def lock(self, command: str) -> Lock:
        """The environment's lock for ``command``; see :mod:`switcher.lock` for who waits."""
        lock = Lock(self.run_dir / f"{self.prefix}.lock", command, say=self.say,
                    retire_wait=self.env.unit.stop_timeout + RETIRE_LOCK_MARGIN)
        lock.wait = lock_wait_for(lock, self.lock_wait)
        return lock

    def load_state(self) -> State:
        try:
            return state.load_state(self.env_dir)
        except state.UNREADABLE as exc:
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
        units = [self.names.router, *(self.unit(c) for c in Color),
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

    def preflight(self, target: Color, live: Color | None, path: Path,
                  which: Iterable[checks.CheckFn] | None = None) -> list[checks.Check]:
        """Run the pre-flight checks (all, or ``which``); print every one that is not ok."""
        subject = checks.Subject(self.cfg.app, self.env, self.sd, target, live, path)
        results = [check(subject) for check in (checks.CHECKS if which is None else which)]
        for result in results:
            if result.level is not checks.Level.ok:
                self.say(f"    {result.line()}")
        return results

    def require_preflight(self, target: Color, live: Color | None, path: Path, *,
                          which: Iterable[checks.CheckFn] | None = None, after: str,
                          hint: str) -> None:
        """Pre-flight that raises AbortedError on a failure (warnings only print)."""
        failed = checks.failures(self.preflight(target, live, path, which))
        if failed:
            raise AbortedError("pre-flight failed: " + "; ".join(
                f"{c.name}: {c.detail}" for c in failed) + after, hint)

    def stop_and_check(self, color: Color) -> list[str]:
        """Stop a color; a stop that ran out of time ended in SIGKILL: warn about it."""
        self.sd.stop(self.unit(color))
        result = self.sd.show(self.unit(color), "Result")["Result"]
        if result not in ("timeout", "signal"):
            return []
        warning = (f"{self.unit(color)} did not stop within unit.stop_timeout "
                   f"({self.env.unit.stop_timeout:g} s) and was killed (result {result})")
        self.say(f"warning: {warning}")
        return [warning]

    def schedule_retire(self, old: Color, until: float) -> str:
        """Returns a warning, or "" when scheduled (or retired now)."""
        delay = until - self.clock.now() + RETIRE_MARGIN
        name = self.timer(old)
        if self.env.standby_applied == 0 and delay <= RETIRE_MARGIN:
            warnings = self.stop_and_check(old)
            why = "direct mode: no standby" if self.env.mode is Mode.direct else "standby = 0"
            self.say(f"retired {old} ({why})")
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
        waits = "finishes its work (direct mode: no standby)" if self.env.mode is Mode.direct \
            else "on standby"
        self.say(f"{old} {waits}; retires in {delay:.0f} s ({name}.timer)")
        return ""

    def move_boot_enable(self, target: Color) -> None:
        self.sd.enable(self.unit(target))
        self.sd.disable(self.unit(target.other))

    def undo_link(self, current: State, target: Color) -> State:
        """Point ``target`` back at the build it last ran for real, so a refused build
        never becomes what a rollback would start. ``builds`` keeps that build's name."""
        before = current.builds.get(target)
        path = Path(self.env.builds) / before if before else None
        if path is not None and path.is_dir() and self.linked_build(target) != before:
            state.symlink_atomic(state.color_link(self.env_dir, target), path)
            self.say(f"{target} points at {before} again")
        return current.with_(pending=None)

    def committed(self, current: State, target: Color, build: str, deploy_id: str,
                   t0: float) -> State:
        old = current.active if current.active != target else None
        window = max(self.env.drain, self.env.watch + self.env.standby_applied)
        return current.with_(
            active=target, previous=old if old is not None else current.previous,
            builds={**current.builds, target: build}, pending=None,
            fallback=Fallback(old, t0 + window) if old is not None else None,
            drain_until=t0 + self.env.drain, deploy_id=deploy_id)

    def run_hook(self, name: str, color: Color, build: str, path: Path,
                 extra: dict[str, str] | None = None) -> HookRun | None:
        """Run hook ``name`` (None when not configured) in the build directory with the
        environment of ``color`` (and ``extra``, which never reaches the journal); each line
        of its output goes to the terminal and the journal as it comes; after
        ``hook_timeout`` its whole process group is killed."""
        command: str = getattr(self.env, name)
        if not command:
            return None
        env = {**os.environ, **self.env.environment, "COLOR": color.value,
               "HOST": self.env.host, "PORT": str(self.env.port(color)),
               "ALIVE_SWITCH_BUILD": build, "ALIVE_SWITCH_ENV": self.env.name, **(extra or {})}
        fields = {"ALIVE_SWITCH_APP": self.cfg.app, "ALIVE_SWITCH_ENV": self.env.name,
                  "ALIVE_SWITCH_HOOK": name, "ALIVE_SWITCH_COLOR": color.value,
                  "ALIVE_SWITCH_BUILD": build}
        return hooks.run(name, command, cwd=path, env=env, timeout=self.env.hook_timeout,
                         fields=fields, say=self.say)

    def drain_color(self, color: Color) -> None:
        """Once the router sends ``color`` nothing new: wait (at most ``drain`` s) until it
        has nothing in flight there. A connection the router already gave the color may
        still sit in the app's accept queue, and a stopping app resets those."""
        deadline = self.clock.now() + self.env.drain
        while self.clock.now() < deadline:
            try:
                inflight = self.router.status(DRAIN_POLL_TIMEOUT).get("inflight", {})
            except SwitchError:
                return  # a router that does not answer has nothing in flight to wait for
            if not inflight.get(color.value):
                return
            self.clock.sleep(DRAIN_POLL)

    def stop_quietly(self, color: Color) -> None:
        with contextlib.suppress(SwitchError):
            self.sd.stop(self.unit(color))

    def record(self, record: dict[str, Any]) -> None:
        record = {"time": round(self.clock.now(), 3), "env": self.env.name, **record}
        with contextlib.suppress(OSError):
            state.append_history(self.env_dir, record)
        audit.send(self.cfg.app, record)

    def health_problem(self, color: Color, started: dict[str, str]) -> str:
        """Wait for ``color``'s health gate: "" once healthy, else what went wrong ("failed
        to start: …" when its process went, "failed its health check: GET … → …")."""
        host, port = self.env.host, self.env.port(color)
        result = health.wait_healthy(host, port, self.env.health,
                                     still_running=lambda: self.gone(color, started),
                                     sleep=self.clock.sleep)
        if result.exited:
            return f"failed to start: {result.detail}"
        if not result.ok:
            where = health.url(host, port, self.env.health.path)
            return f"failed its health check: GET {where} → {result.detail}"
        return ""

    def restart_color(self, color: Color, build: str) -> dict[str, str]:
        """(Re)start ``color`` from a clean failure count; returns its identity."""
        unit = self.unit(color)
        self.sd.reset_failed(unit)
        try:
            self.sd.restart(unit)
        except SwitchError as exc:
            raise AbortedError(f"{color} failed to start {build}: {exc.message}",
                               self.journal_hint(color)) from None
        return self.identity(color)

    def point_at(self, color: Color, build: str, path: Path) -> None:
        """The color's link and env file name ``build``: what its next start runs."""
        state.symlink_atomic(state.color_link(self.env_dir, color), path)
        state.write_atomic(self.env_dir / f"{color.value}.env",
                           f"ALIVE_SWITCH_BUILD={env_quote(build)}\n".encode())


def lock_wait_for(lock: Lock, asked: float | None) -> float:
    """``--wait`` when given; else a retire waits as long as its holder holds (a standby
    timer must neither fail nor give up: its color would stay up with no timer) and every
    other command is refused at once."""
    if asked is not None:
        return asked
    return math.inf if lock.is_retire else 0.0


def env_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def self_command() -> list[str]:
    """How a timer runs this very alive-switch: an absolute path, never a PATH lookup."""
    script = os.path.abspath(sys.argv[0])
    if script.endswith(".py") or not os.access(script, os.X_OK):
        return [sys.executable, "-m", "switcher"]
    return [script]


def why_not_retire(current: State, color: Color, now: float) -> str:
    if color in (current.serving(), current.active):
        return "it is the live color"
    if current.pending is not None and current.pending.target == color:
        return "a deploy to it is pending"
    fb = current.fallback
    if fb is not None and fb.color == color and fb.open_at(now):
        return f"it is the fallback for {fb.until - now:.0f} s more"
    return ""
