"""Pure decisions: which color a deploy or rollback starts, whether it is a no-op, whether
the target is warm, and how to reconcile a state left by a killed run. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from switcher.errors import UsageError
from switcher.model import Color, Phase, State


class Kind(enum.StrEnum):
    deploy = "deploy"
    rollback = "rollback"


@dataclass(frozen=True)
class Plan:
    kind: Kind
    target: Color
    build: str
    old: Color | None
    warm: bool = False  # the target already runs this build: no restart, just a health check
    noop: bool = False  # already live: nothing to do
    canary: tuple[int, ...] = ()  # percent of clients per canary step before the switch
    step_seconds: float = 0.0

    def phases(self) -> list[Phase]:
        if self.noop:
            return []
        skip = {Phase.lock, Phase.reconcile, Phase.done}
        if not self.canary:
            skip.add(Phase.canary)
        return [p for p in Phase if p not in skip]

    def describe(self) -> list[str]:
        """What --dry-run prints: the phases a run would go through, in the order it runs
        them (both read :meth:`phases`)."""
        if self.noop:
            return [f"build {self.build} is already live on {self.target}: nothing to do "
                    "(--force deploys it again)"]
        old = self.old.value if self.old else "nothing"
        start = (f"{self.target} already runs {self.build}: health check only" if self.warm
                 else f"point {self.target} at {self.build}, (re)start {self.target}")
        says = {
            Phase.preflight: "pre-flight checks (a failure changes nothing)",
            Phase.cancel_timer: f"cancel any retire timer of {self.target}; it is no fallback",
            Phase.start: start,
            Phase.health: f"health gate on {self.target}",
            Phase.pre_switch: "pre_switch hook, if configured",
            Phase.canary: f"canary: {', '.join(f'{p} %' for p in self.canary)} of clients on "
                          f"{self.target}, {self.step_seconds:g} s each, judged on traffic",
            Phase.switching: f"switch the router to {self.target}",
            Phase.commit: f"commit; {self.target} starts at boot",
            Phase.watch: f"watch {self.target}; {old} drains",
            Phase.schedule_retire: f"{old} on standby, then it retires",
            Phase.post_switch: "post_switch hook, if configured; history",
        }
        return [f"{self.kind} {self.build} to {self.target} (live now: {old})",
                *(f"  {n:>2}. {says[phase]}" for n, phase in enumerate(self.phases(), 1))]


def plan_deploy(state: State, build: str, *, force: bool, running: dict[Color, str | None]
                ) -> Plan:
    """``running[c]``: the build color c runs now, or None when it is not running."""
    live = state.active
    if live is not None and state.builds.get(live) == build and not force:
        return Plan(Kind.deploy, live, build, live, noop=True)
    target = live.other if live is not None else Color.blue
    return Plan(Kind.deploy, target, build, live, warm=running.get(target) == build)


def plan_rollback(state: State, running: dict[Color, str | None]) -> Plan:
    target = state.previous
    build = state.builds.get(target) if target else None
    if target is None or not build or target == state.active:
        raise UsageError("nothing to roll back to: no previous live color is recorded",
                         "deploy a build by name instead (alive-switch deploy ENV BUILD)")
    return Plan(Kind.rollback, target, build, state.active, warm=running.get(target) == build)


class Reconcile(enum.Enum):
    nothing = "state and router agree"
    commit = "finish the interrupted switch: the router already serves the target"
    undo = "undo the interrupted deploy: the router still serves the old color"
    resync = "the router serves another color than state.json: switch it back"


def reconcile(state: State, router_serving: Color | None) -> Reconcile:
    pending = state.pending
    if pending is None:
        return Reconcile.nothing if router_serving == state.active else Reconcile.resync
    if pending.phase.past_switch and router_serving == pending.target:
        return Reconcile.commit
    return Reconcile.undo
