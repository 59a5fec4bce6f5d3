"""Finish or undo what a killed run left behind, before the next command acts.

- ``begin``: the first step of every deploy and rollback — the router running, an
  interrupted takeover resumed, ``state.json`` reconciled with the color the router serves
  (plan.reconcile decides: nothing, commit the pending switch, or undo it), and a retire
  timer armed for a standby color that lost it;
- ``repair``: rebuild ``state.json`` from the router, the color links and history.
"""

from __future__ import annotations

import time

from switcher import plan, state
from switcher.errors import AbortedError, SwitchError
from switcher.model import Color, State, color_name
from switcher.ops.site import SWITCH_BACK, Site
from switcher.routerctl import serving


def begin(site: Site) -> tuple[State, dict[Color, str | None]]:
    """Router running, then reconcile state.json with what the router serves. Returns
    the state and the build each color runs."""
    if (site.env_dir / state.TAKEOVER_INTENT).exists():
        _resume_takeover(site)
    active = site.active_states()
    router_unit = site.names.router
    if active[router_unit] != "active":
        site.sd.start(router_unit)
        site.say(f"started {router_unit}")
    current = site.load_state()
    status = site.router.status()
    actual = serving(status)
    if current.canary is not None or status.get("canary"):
        current = _end_canary(site, current)
    action = plan.reconcile(current, actual)
    if action is plan.Reconcile.nothing:
        _ensure_retire_timer(site, current, active)
        return current, site.running_builds(active)
    site.say(f"reconcile: {action.value}")
    fixed = _reconcile(site, action, current, actual)
    site.record({"kind": "reconcile", "action": action.name, "outcome": "ok",
                 "router_was": color_name(actual)})
    return fixed, site.running_builds()  # the reconcile may have stopped a color


def _end_canary(site: Site, current: State) -> State:
    """A canary with no deploy running it (that deploy was killed: only the lock holder
    runs one): every client back on the live color, first of all. The reconcile that
    follows stops its color (its intent is not past the switch)."""
    site.router.set_canary(None)
    left = current.canary
    if left is not None:
        site.drain_color(left.color)
    what = (f"a canary of {left.color} ({left.percent} % of clients, step {left.step})"
            if left else "the router's canary split")
    site.say(f"reconcile: {what} was left by an interrupted deploy: every client is back "
             f"on {_value_color(current.active)}")
    ended = current.with_(canary=None)
    if current.pending is None:  # else the reconcile saves it with the intent undone
        state.save_state(site.env_dir, ended)
    return ended


def _resume_takeover(site: Site) -> None:
    # Imported only here: the takeover needs Jinja2 and psutil, which a rollback must not
    # pay for (status and rollback have timed start-up goals).
    from switcher.ops.takeover import runner as takeover  # noqa: PLC0415

    if takeover.resume(site) is takeover.Resumed.undone:
        raise AbortedError(
            "an interrupted takeover was undone (see above): the legacy unit serves "
            "again and nothing else was changed",
            f"run the takeover again: alive-switch install {site.env.name} --takeover UNIT")


def _ensure_retire_timer(site: Site, current: State, active: dict[str, str]) -> None:
    """A run killed between its commit and step 8 left the old color without a retire
    timer: schedule it now, or it would stay up for good."""
    fb = current.fallback
    if fb is None or fb.color == current.active:
        return
    if active[site.unit(fb.color)] != "active":
        return
    if active[f"{site.timer(fb.color)}.timer"] != "active":
        site.say(f"reconcile: {fb.color} had no retire timer")
        site.schedule_retire(fb.color, fb.until)


def _reconcile(site: Site, action: plan.Reconcile, current: State, actual: Color | None
               ) -> State:
    pending = current.pending
    if action is plan.Reconcile.commit and pending is not None \
            and pending.deploy_id == SWITCH_BACK:
        failed = pending.target.other
        site.stop_quietly(failed)
        fixed = site.undo_link(current.with_(pending=None), failed)
        state.save_state(site.env_dir, fixed)
        site.move_boot_enable(pending.target)
        site.say(f"finished the switch back to {pending.target}; stopped {failed}")
        return fixed
    if action is plan.Reconcile.commit and pending is not None:
        old = current.active
        fixed = site.committed(current, pending.target, pending.build, pending.deploy_id,
                                site.clock.now())
        state.save_state(site.env_dir, fixed)
        site.move_boot_enable(pending.target)
        if old is not None and fixed.fallback is not None:
            site.schedule_retire(old, fixed.fallback.until)
        return fixed
    if pending is not None:
        target = pending.target
        if target not in (current.active, current.fallback_at(site.clock.now())):
            site.sd.stop(site.unit(target))
            site.say(f"stopped {site.unit(target)} (its deploy was interrupted)")
        current = site.undo_link(current, target)
    if actual != current.active and current.active is not None:
        site.router.switch(current.active, current.fallback, current.drain_until,
                           current.builds)
        site.say(f"router switched back to {current.active}")
    state.save_state(site.env_dir, current)
    return current


def repair(deployer: Site) -> list[str]:
    """Rebuild ``state.json`` from the router's color, the color links and history."""
    d = deployer
    done: list[str] = []
    with d.lock(f"repair {d.env.name}"):
        router_unit = d.names.router
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

