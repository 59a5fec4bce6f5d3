"""Runs deploys, rollbacks and retirements through the adapters (systemd, router, state,
health), in DESIGN.md's order, and reconciles what a killed run left behind.

Timeline of a switch at T0: the old color gets no new work from T0 and may finish what it
has until T0 + drain; the new color is watched until T0 + watch while the old one keeps
running; the old color stays the router's fallback (and on standby) until
T0 + max(drain, watch + standby), when its retire timer stops it. Direct mode: the router
takes the new color's listener at the health gate's end, and the old color keeps no standby
(``Environment.standby_applied``).
"""

from __future__ import annotations

import contextlib
import enum
import secrets
from dataclasses import replace
from pathlib import Path

from switcher import health, plan, state
from switcher.config import DIRECT_NO_CANARY, DIRECT_NO_CANARY_FIX, Canary
from switcher.errors import (
    AbortedError,
    NeedsRepairError,
    RouterError,
    SwitchedBackError,
    SwitchError,
    UsageError,
)
from switcher.hooks import HOOK_IDENTIFIER
from switcher.model import PREVIEW_HEADER, Color, Mode, Pending, Phase, State, color_name
from switcher.ops import builds, canary, recovery
from switcher.ops.outcome import Outcome
from switcher.ops.site import SWITCH_BACK, Phases, Site, stop_here, why_not_retire
from switcher.ops.traffic import DIRECT_NOTE, Traffic

PREVIEW_VAR = "ALIVE_SWITCH_PREVIEW"  # pre_switch's environment: the preview header line
PREVIEW_TOKEN_BYTES = 24  # 32 characters of [A-Za-z0-9_-]: not guessable, fits the router's rule


class Deployer(Site):
    """deploy, rollback and retire of one environment, in DESIGN.md's order."""

    def begin(self) -> tuple[State, dict[Color, str | None]]:
        """Step 1: the router running and state reconciled (see ops/recovery.py)."""
        return recovery.begin(self)

    def deploy(self, build_arg: str | None, *, force: bool, dry_run: bool,
               steps: Canary | None = None) -> Outcome:
        """``steps``: the canary (``--canary``); None: the config's ``[env.*.canary]``."""
        if dry_run:
            return self._dry_run(build_arg, force, steps)
        with self.lock(f"deploy {self.env.name} {build_arg or ''}".strip()):
            current, running = self.begin()
            build = builds.resolve(self.env, build_arg)
            if build_arg is None:
                self.say(f"build: {build.name} (newest deployable in {self.env.builds})")
            the_plan = self._with_canary(
                plan.plan_deploy(current, build.name, force=force, running=running), steps)
            return self._execute(the_plan, current, build.path)

    def _with_canary(self, the_plan: plan.Plan, steps: Canary | None) -> plan.Plan:
        chosen = steps or self.env.canary
        if not chosen.steps or the_plan.noop:
            return the_plan
        if self.env.mode is Mode.direct:
            raise UsageError(f"--canary: env.{self.env.name}.router.mode = \"direct\": "
                             f"{DIRECT_NO_CANARY}; nothing was changed", DIRECT_NO_CANARY_FIX)
        if the_plan.old is None:
            self.say("no canary: this is the first deploy, no old color serves clients")
            return the_plan
        return replace(the_plan, canary=tuple(chosen.steps), step_seconds=chosen.step_seconds)

    def rollback(self, *, dry_run: bool) -> Outcome:
        if dry_run:
            the_plan = replace(plan.plan_rollback(self.load_state(), self.running_builds()),
                               direct=self.env.mode is Mode.direct)
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
            reason = why_not_retire(current, color, now)
            if reason:
                raise UsageError(f"not retiring {color}: {reason}",
                                 "nothing to do; a later deploy schedules its retirement")
            warnings = self.stop_and_check(color)
            if current.fallback and current.fallback.color == color:
                self.router.set_fallback(None)
                state.save_state(self.env_dir, current.with_(fallback=None))
            message = f"retired {color} ({self.unit(color)} stopped)"
            self.say(message)
            self.record({"kind": "retire", "color": color.value, "outcome": "ok",
                         "build": current.builds.get(color), "warnings": warnings})
            return Outcome("retire", True, color, current.builds.get(color) or "", message,
                           warnings=warnings)

    def _dry_run(self, build_arg: str | None, force: bool, steps: Canary | None) -> Outcome:
        build = builds.resolve(self.env, build_arg)
        the_plan = self._with_canary(plan.plan_deploy(self.load_state(), build.name,
                                                      force=force,
                                                      running=self.running_builds()), steps)
        the_plan = replace(the_plan, direct=self.env.mode is Mode.direct)
        for line in the_plan.describe():
            self.say(line)
        return Outcome("deploy", True, the_plan.target, build.name, "dry run")

    def promote_left(self, current: State) -> Outcome:
        """Finish a canary whose deploy was killed (the caller holds the lock): the full
        switch to its color, then Part 1's commit, watch, drain and standby."""
        pending = current.pending
        assert pending is not None  # orders._running_canary
        before = current.with_(pending=None, canary=None)
        the_plan = plan.Plan(plan.Kind.deploy, pending.target, pending.build, before.active,
                             warm=True)
        self.say(f"promote: the deploy of {pending.build} to {pending.target} was "
                 "interrupted mid-canary; finishing it with the full switch")
        return self._execute(the_plan, before, Path(self.env.builds) / pending.build,
                             promoting=pending.deploy_id)

    def _execute(self, the_plan: plan.Plan, current: State, path: Path, *,
                 promoting: str = "") -> Outcome:
        """Run ``the_plan``; ``promoting``: the id of a deploy whose canary is finished
        from its switch on."""
        if the_plan.noop:
            message = the_plan.describe()[0]
            self.say(message)
            return Outcome(the_plan.kind.value, True, the_plan.target, the_plan.build, message)
        deploy_id = promoting or self.new_deploy_id()
        phases = self.phases()
        outcome = Outcome(the_plan.kind.value, False, the_plan.target, the_plan.build)
        result = "failed"
        self.say(f"{the_plan.kind} {the_plan.build} → {the_plan.target} "
                 f"(live now: {the_plan.old.value if the_plan.old else 'nothing'})")
        try:
            if promoting:
                self._promote_steps(the_plan, current, path, deploy_id=deploy_id,
                                    phases=phases, outcome=outcome)
            else:
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
            if not outcome.ok:
                self._close_preview()
            outcome.phases = phases.durations
            self.record({"kind": the_plan.kind.value, "deploy_id": deploy_id,
                           "color": the_plan.target.value, "build": the_plan.build,
                           "from": color_name(the_plan.old),
                           "outcome": "ok" if outcome.ok else result,
                           "failed_phase": None if outcome.ok else _value(phases.current),
                           "message": outcome.message, "phases": phases.durations,
                           "warnings": outcome.warnings, "hooks": outcome.hooks,
                           "analysis": outcome.analysis, "canary": outcome.canary})
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
            self._hand_listener(target)
        preview = self._open_preview(target)
        with phases(Phase.pre_switch):
            self._hook("pre_switch", target, the_plan.build, path, abort=True,
                       outcome=outcome, extra=preview)
        if the_plan.canary:
            with phases(Phase.canary, limit=len(the_plan.canary) * the_plan.step_seconds):
                self._canary(the_plan, current, intent, started, outcome)
        self._go_live(the_plan, current, path, deploy_id=deploy_id, phases=phases,
                      outcome=outcome, started=started)

    def _promote_steps(self, the_plan: plan.Plan, current: State, path: Path, *,
                       deploy_id: str, phases: Phases, outcome: Outcome) -> None:
        """A left canary's color, proven healthy again, goes live."""
        target = the_plan.target
        with phases(Phase.health, limit=self.env.health.timeout):
            started = self.identity(target)
            gone = self.gone(target, started)
            if gone:
                raise AbortedError(f"cannot promote {target}: {gone}",
                                   f"undo the canary: alive-switch abort {self.env.name}")
            problem = self.health_problem(target, started)
            if problem:
                raise AbortedError(f"cannot promote {target}: it {problem}",
                                   f"undo the canary: alive-switch abort {self.env.name}")
        self._go_live(the_plan, current, path, deploy_id=deploy_id, phases=phases,
                      outcome=outcome, started=started)

    def _go_live(self, the_plan: plan.Plan, current: State, path: Path, *, deploy_id: str,
                 phases: Phases, outcome: Outcome, started: dict[str, str]) -> None:
        """From the switch on: switch, commit, watch, standby, post_switch."""
        target, old = the_plan.target, the_plan.old
        with phases(Phase.switching):
            self._still_healthy_process(target, started)
            switching = current.with_(pending=Pending(target, Phase.switching, deploy_id,
                                                      the_plan.build))
            state.save_state(self.env_dir, switching)
            traffic = self._traffic(target, old)
            t0 = self.clock.now()
            committed = self.committed(current, target, the_plan.build, deploy_id, t0)
            self.router.switch(target, committed.fallback, committed.drain_until,
                               committed.builds)
        with phases(Phase.commit):
            state.save_state(self.env_dir, committed)
            # With the commit, not after the hooks: a run killed later must not leave the
            # old color as the one that starts at boot.
            self.move_boot_enable(target)
        with phases(Phase.watch, limit=self.env.watch):
            try:
                self._watch(target, started, t0, current, the_plan.build, traffic=traffic)
            finally:
                outcome.analysis = traffic.to_json()
        with phases(Phase.schedule_retire):
            if old is not None and committed.fallback is not None:
                warning = self.schedule_retire(old, committed.fallback.until)
                if warning:
                    outcome.warnings.append(warning)
        with phases(Phase.post_switch):
            warning = self._hook("post_switch", target, the_plan.build, path, abort=False,
                                 outcome=outcome)
            if warning:
                outcome.warnings.append(warning)
        outcome.message = f"{the_plan.build} is live on {target}"
        self.say(outcome.message)

    def _open_preview(self, target: Color) -> dict[str, str]:
        """http mode: from the health gate's end until the switch, requests carrying this
        deploy's token reach ``target``; the header line goes to pre_switch only."""
        if self.env.mode is not Mode.http:
            return {}
        token = secrets.token_urlsafe(PREVIEW_TOKEN_BYTES)
        try:
            self.router.set_preview(target, token)
        except RouterError as exc:
            self.say(f"warning: no preview for pre_switch: {exc.message}")
            return {}
        return {PREVIEW_VAR: f"{PREVIEW_HEADER}: {token}"}

    def _close_preview(self) -> None:
        """A deploy that ends before its switch leaves no preview (the switch ends it)."""
        if self.env.mode is Mode.http:
            with contextlib.suppress(RouterError):
                self.router.set_preview(None)

    def _canary(self, the_plan: plan.Plan, current: State, intent: Pending,
                started: dict[str, str], outcome: Outcome) -> None:
        """The canary steps; a failed or aborted step sends every client back (exit 5)."""
        target, old = the_plan.target, the_plan.old
        traffic = Traffic(self.router, self.env.analysis, target, self.say,
                          timeout=max(self.env.health.interval, 1.0), moment="the canary")
        traffic.before_switch()
        interval = self.env.health.interval
        steps = canary.Steps(self, target, list(the_plan.canary), the_plan.step_seconds,
                             current, intent, traffic,
                             look=lambda t: self._watch_problem(target, started, interval, t))
        ending = steps.run()
        outcome.canary = steps.to_json(ending)
        if ending.how.goes_on:
            return
        steps.undo(ending)
        outcome.canary = steps.to_json(ending)
        what = ("was aborted" if ending.how is canary.How.aborted
                else f"failed ({ending.why})")
        raise SwitchedBackError(
            f"canary step {ending.step} ({ending.percent} % of clients on {target}) {what}; "
            f"every client is back on {old} and {target} is stopped",
            self.journal_hint(target))

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
                state.save_state(self.env_dir, self.undo_link(current, target))

    def _preflight(self, target: Color, live: Color | None, path: Path) -> None:
        self.require_preflight(target, live, path, after="; nothing was changed",
                               hint=f"fix it, then deploy again (alive-switch check "
                               f"{self.env.name})")

    def _start(self, target: Color, build: str, path: Path, *, warm: bool) -> dict[str, str]:
        if not warm:
            self.point_at(target, build, path)
            try:
                self.restart_color(target, build)
            except AbortedError:
                self.stop_quietly(target)
                raise
        started = self.identity(target)
        gone = self.gone(target, started)
        if gone:
            self.stop_quietly(target)
            raise AbortedError(f"{target} failed to start {build}: {gone}; the live color "
                               "still serves", self.journal_hint(target))
        return started

    def _health_gate(self, target: Color, started: dict[str, str]) -> None:
        problem = self.health_problem(target, started)
        if problem:
            self.stop_quietly(target)
            raise AbortedError(f"{target} {problem}; {target} stopped, the live color still "
                               "serves", self.journal_hint(target))

    def _hand_listener(self, target: Color) -> None:
        """Direct mode: the router puts the healthy color's listener in the kernel's map now,
        so the switch is only a map update."""
        if self.env.mode is not Mode.direct:
            return
        try:
            self.router.steer(target)
        except RouterError as exc:
            self.stop_quietly(target)
            raise AbortedError(f"{target} is healthy but the router cannot steer to it: "
                               f"{exc.message}; {target} stopped, the live color still serves",
                               exc.hint) from None

    def _still_healthy_process(self, target: Color, started: dict[str, str]) -> None:
        """The process that passed the gate must be the one that gets traffic."""
        gone = self.gone(target, started)
        if gone:
            self.stop_quietly(target)
            raise AbortedError(f"{target} died before the switch: {gone}; {target} stopped, "
                               "the live color still serves", self.journal_hint(target))

    def _traffic(self, target: Color, old: Color | None) -> Traffic:
        """Just before the switch: what the watch will judge the target's traffic against."""
        traffic = Traffic(self.router, self.env.analysis, target, self.say,
                          timeout=max(self.env.health.interval, 1.0),
                          caveat=DIRECT_NOTE if self.env.mode is Mode.direct else "")
        if old is None:
            traffic.missing = "the first deploy: no old color to compare with"
        else:
            traffic.before_switch()
        return traffic

    def _watch(self, target: Color, started: dict[str, str], t0: float, before: State,
               build: str, *, traffic: Traffic) -> None:
        """Until T0 + watch, every health.interval: the process, its health, its traffic;
        then one last look at the traffic, which has the most answers."""
        deadline = t0 + self.env.watch
        interval = self.env.health.interval
        while (left := deadline - self.clock.now()) > 0:
            problem = self._watch_problem(target, started, interval, traffic)
            if problem:
                self._switch_back(target, before, build, problem)
            self.clock.sleep(min(interval, left))
        verdict = traffic.look()
        if verdict is not None and not verdict.ok:
            self._switch_back(target, before, build, verdict.message)
        self.say(traffic.note())

    def _watch_problem(self, target: Color, started: dict[str, str], interval: float,
                       traffic: Traffic) -> str:
        """What fails the target at this look ("" when nothing does)."""
        problem = self.gone(target, started)
        if problem:
            return problem
        probe = health.probe(self.env.host, self.env.port(target), self.env.health,
                             timeout=max(interval, 1.0))
        if not probe.ok:
            return f"health check → {probe.detail}"
        verdict = traffic.look()
        return verdict.message if verdict is not None and not verdict.ok else ""

    def _switch_back(self, target: Color, before: State, build: str, problem: str) -> None:
        if before.active is None:
            raise SwitchError(f"{target} failed during the watch ({problem}); this was the "
                              f"first deploy, so there is no color to switch back to and "
                              f"{target} keeps serving (systemd restarts it on failure)",
                              self.journal_hint(target))
        fallback = before.fallback if before.fallback and before.fallback.color != target else None
        # The failed color finishes what it has for up to `drain` before it is stopped, as
        # an old color does after a switch; cut at once, its in-flight requests would be
        # 504s to clients whose answers were on their way (an app that stops gracefully
        # would finish them; not every app does).
        back = before.with_(pending=None, fallback=fallback,
                            drain_until=self.clock.now() + self.env.drain)
        live_build = before.builds.get(before.active) or ""
        state.save_state(self.env_dir, before.with_(pending=Pending(
            before.active, Phase.switching, SWITCH_BACK, live_build)))
        self.router.switch(before.active, back.fallback, back.drain_until, back.builds)
        self.drain_color(target)
        self.stop_quietly(target)
        back = self.undo_link(back, target)  # a failed build never becomes a rollback target
        state.save_state(self.env_dir, back)
        self.move_boot_enable(before.active)
        raise SwitchedBackError(
            f"{target} failed during the watch ({problem}); switched back to "
            f"{before.active} and stopped {target}", self.journal_hint(target))

    def _hook(self, name: str, color: Color, build: str, path: Path, *, abort: bool,
              outcome: Outcome, extra: dict[str, str] | None = None) -> str:
        run = self.run_hook(name, color, build, path, extra)
        if run is None:
            return ""
        outcome.hooks.append(run.to_json())
        if run.ok:
            return ""
        if abort:
            self.stop_quietly(color)
            raise AbortedError(f"{name} hook failed ({run.outcome}): {run.command}; {color} "
                               "stopped, the live color still serves",
                               "fix the hook and deploy again; its output: alive-switch "
                               f"history {self.env.name}, journalctl -t {HOOK_IDENTIFIER}")
        warning = f"{name} hook failed ({run.outcome}): {run.command}; traffic stays on {color}"
        self.say(f"warning: {warning}")
        return warning


def _value(phase: enum.StrEnum | None) -> str | None:
    return phase.value if phase else None

