"""``install ENV --takeover UNIT [BUILD]``: the one-time cut-over from a legacy unit that runs
the app and binds the public port itself (installing the socket beside it would fail with
EADDRINUSE: the original incident).

In order, and why each step is where it is::

    before the stop: a failure undoes every change; UNIT never noticed
      check           UNIT is loaded and not ours, the socket is not active, no color is live,
                      nothing but UNIT listens on the public port
      backup          UNIT's unit file and drop-ins -> <state>/<app>-<env>/takeover/, and
                      takeover/intent.json (see below)
      write_units     every unit, daemon-reload, router.json. When UNIT has the router's name,
                      its file stays UNIT's until the end, and the socket triggers a stand-in
                      router, <prefix>-takeover.service: systemd refuses to start a socket
                      while its service is active, and UNIT may drain for long after it has
                      closed its listener
      start_blue      point blue at BUILD, start it on its internal port, beside UNIT
      health          the health gate, as a deploy's
      pre_switch      the hook, if any
      disable_legacy  UNIT stays running, but no longer starts at boot
      commit          state.json: blue live (whatever router starts then serves blue)
    the cut-over: the port refuses connections from the moment UNIT closes its listener until
    the socket unit binds (the gap, measured by connecting every 2 ms)
      cut_over        PID 1 runs takeover/cutover.py as <prefix>-cutover.service: stop UNIT, start
                      the socket as soon as the port is free (or start UNIT again). Not the
                      CLI: a CLI killed inside the gap would leave the port closed
      start_router    the router (or its stand-in); connections waited in the socket's backlog
    after the stop, a failure restores UNIT: our units stopped and removed, UNIT re-enabled
    and started again
    after the router serves, a failure is a warning (and the intent stays, for the next command)
      enable          the socket, the router and blue start at boot
      swap_router     (UNIT has the router's name) UNIT's file becomes the router's, the socket
                      triggers it again, daemon-reload, the stand-in hands over to the router;
                      connections wait in the backlog meanwhile, none is refused
      post_switch     the hook, if any (a failure is a warning); history

A CLI that dies (SIGKILL, a lost session) undoes nothing itself: takeover/intent.json,
written with the backup and removed at the very end, tells the next command (any deploy or
rollback, or the takeover run again) to finish the takeover if the socket is bound, or else
to undo it: UNIT enabled and started as before, blue stopped, no color live.

``ALIVE_SWITCH_TEST_TAKEOVER_FAIL=<step>`` (tests only, off unless set) raises a failure on
entering that step, to prove the undo from any point; ``ALIVE_SWITCH_TEST_TAKEOVER_KILL=<step>``
SIGKILLs the CLI there (for ``cut_over``: as soon as PID 1 has started it).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switcher import host, render, state
from switcher.errors import AbortedError, SwitchError, UsageError
from switcher.model import Color
from switcher.names import Names
from switcher.ops import builds, checks, install
from switcher.ops.site import Site, kill_here
from switcher.ops.takeover.cutover import port_free
from switcher.routerctl import serving

__all__ = ["Resumed", "Takeover", "intent_path", "port_free", "resume"]

PROBE_EVERY = 0.002  # seconds between connection attempts while measuring the gap
# The cut-over gives up (and starts UNIT again) when the port is still held this long after
# the stop; systemd itself SIGKILLs UNIT after its TimeoutStopSec (90 s by default).
CUTOVER_TIMEOUT = 300.0
OUTCOME_POLL = 0.002  # seconds between looks for the cut-over's outcome file
LEGACY_PROPS = ("LoadState", "ActiveState", "UnitFileState", "FragmentPath", "DropInPaths")
# What a takeover may check before it starts blue: the socket and router checks of a deploy
# cannot pass yet (UNIT holds the port), and there is no live color to probe.
PREFLIGHT = (checks.idle_port_free, checks.colors_not_failed, checks.disk_space,
             checks.memory, checks.build_ready, checks.user_can_read)
Say = Callable[[str], None]


class Step(enum.StrEnum):
    check = "check"
    backup = "backup"
    write_units = "write_units"
    start_blue = "start_blue"
    health = "health"
    pre_switch = "pre_switch"
    disable_legacy = "disable_legacy"
    commit = "commit"
    cut_over = "cut_over"
    bind = "bind"
    start_router = "start_router"
    enable = "enable"
    swap_router = "swap_router"
    post_switch = "post_switch"


# ---------------------------------------------------------------- the plan (pure)

@dataclass(frozen=True)
class Legacy:
    """The unit being replaced, as systemd shows it."""

    unit: str
    active: bool
    enabled: bool
    fragment: str
    dropins: tuple[str, ...]

    @classmethod
    def from_props(cls, unit: str, props: dict[str, str]) -> Legacy:
        return cls(unit, props.get("ActiveState") not in ("inactive", "failed", ""),
                   props.get("UnitFileState") == "enabled", props.get("FragmentPath", ""),
                   tuple(props.get("DropInPaths", "").split()))


@dataclass(frozen=True)
class Plan:
    env: str
    legacy: Legacy
    build: str
    names: Names
    blue: str  # blue's unit
    listen: str
    backup_dir: Path

    @property
    def same_name(self) -> bool:
        """UNIT is named like the router: its file is replaced, not left beside ours."""
        return self.legacy.unit == self.names.router

    @property
    def stand_in(self) -> str:
        return self.names.takeover_router

    @property
    def first_router(self) -> str:
        """The router unit that serves first: the stand-in when UNIT has the router's name."""
        return self.stand_in if self.same_name else self.names.router

    def steps(self) -> list[tuple[Step, str]]:
        unit, router, sock = self.legacy.unit, self.names.router, self.names.socket
        stand_in = (f" ({router} stays {unit}'s file until the end; {sock} triggers the "
                    f"stand-in {self.stand_in})") if self.same_name else ""
        steps = [
            (Step.check, f"check: {unit} is loaded, nothing else listens on {self.listen}, "
                         f"{sock} is not active, no color is live"),
            (Step.backup, f"back up {self.legacy.fragment or unit + ' (no file)'}"
                          + (" and its drop-ins" if self.legacy.dropins else "")
                          + f" to {self.backup_dir}/; intent.json there until the end"),
            (Step.write_units, f"write the units{stand_in}, daemon-reload, router settings"),
            (Step.start_blue, f"point blue at {self.build}, start {self.blue} on its own port "
                              f"while {unit} serves"),
            (Step.health, "health gate on blue; failure: undo all of the above"),
            (Step.pre_switch, "pre_switch hook, if configured"),
        ]
        if self.legacy.enabled:
            steps.append((Step.disable_legacy, f"disable {unit} (it keeps running)"))
        steps.append((Step.commit, f"state.json: blue live with {self.build}"))
        if self.legacy.active:
            steps.append((Step.cut_over, f"PID 1 stops {unit} and starts {sock} as soon as "
                                         f"{self.listen} is free (the gap)"))
        else:
            steps.append((Step.bind, f"start {sock}: {self.listen} listens"))
        steps += [
            (Step.start_router, f"start {self.first_router}: it serves blue"),
            (Step.enable, f"enable {sock}, {router}, {self.blue} at boot"),
        ]
        if self.same_name:
            steps.append((Step.swap_router, f"write {router} over {unit}'s file, daemon-reload,"
                                            f" {self.stand_in} hands over to {router}"))
        steps.append((Step.post_switch, "post_switch hook, if configured; history"))
        return steps

    def describe(self) -> list[str]:
        lines = [f"takeover of {self.legacy.unit} by {self.names.socket} + blue "
                 f"({self.build}):"]
        lines += [f"  {n:>2}. {text}" for n, (_, text) in enumerate(self.steps(), 1)]
        lines.append(f"  a failure before the stop changes nothing; after it, {self.legacy.unit}"
                     " is restored (re-enabled and started); if this command is killed, the "
                     "next deploy, rollback or install finishes or undoes the takeover")
        return lines


def make_plan(d: Site, legacy: Legacy, build: str) -> Plan:
    return Plan(d.env.name, legacy, build, d.names, d.unit(Color.blue), d.env.listen_address,
                backup_dir(d))


def backup_dir(d: Site) -> Path:
    return d.env_dir / state.TAKEOVER


def intent_path(d: Site) -> Path:
    return d.env_dir / state.TAKEOVER_INTENT


# ---------------------------------------------------------------- a takeover whose CLI died

class Resumed(enum.Enum):
    finished = "finished"  # the cut-over had happened: the takeover was completed
    undone = "undone"  # it had not: UNIT serves again, as before the takeover


def resume(d: Site) -> Resumed:
    """Finish or undo a takeover whose CLI died between its backup and its end (the intent
    file exists). The caller holds the lock."""
    info = json.loads(intent_path(d).read_text())
    legacy = Legacy(info["unit"], bool(info["active"]), bool(info["enabled"]),
                    str(info["fragment"]), tuple(info["dropins"]))
    p = make_plan(d, legacy, str(info["build"]))
    takeover = Takeover(d, Path(info["unit_dir"]))
    takeover.wait_cut_over()
    result = Result(p)
    if d.sd.show(p.names.socket, "ActiveState")["ActiveState"] == "active":
        d.say(f"a takeover of {legacy.unit} ended after its cut-over: completing it")
        result.legacy = "replaced"
        takeover.complete(p, result)
        result.warnings.append("the takeover's CLI ended early: completed by a later command"
                               " (its post_switch hook did not run)")
        takeover.record(p, str(info["deploy_id"]), result, None)
        return Resumed.finished
    d.say(f"a takeover of {legacy.unit} ended before its cut-over: undoing it")
    takeover.undo_interrupted(p, result)
    takeover.record(p, str(info["deploy_id"]), result,
                    SwitchError("interrupted before the cut-over; undone by a later command"))
    return Resumed.undone


# ---------------------------------------------------------------- undo

class Undo:
    """What a takeover changed so far, undone newest first. A step that fails to undo is
    reported and the others still run."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def add(self, what: str, action: Callable[[], None]) -> None:
        self._steps.append((what, action))

    def run(self) -> list[str]:
        problems = []
        while self._steps:
            what, action = self._steps.pop()
            try:
                action()
            except (SwitchError, OSError) as exc:
                problems.append(f"{what}: {exc}")
        return problems


def snapshot(path: Path) -> Callable[[], None]:
    """A function that puts ``path`` back as it is now: a file, a symlink or nothing."""
    if path.is_symlink():
        target = Path(os.readlink(path))
        return lambda: state.symlink_atomic(path, target)
    if path.is_file():
        data, mode = path.read_bytes(), stat.S_IMODE(path.stat().st_mode)
        return lambda: state.write_atomic(path, data, mode)
    return lambda: path.unlink(missing_ok=True)


# ---------------------------------------------------------------- measuring the gap

@dataclass
class Gap:
    refused: int = 0  # probes refused
    probes: int = 0
    first: float | None = None  # monotonic time of the first and last refused probe
    last: float | None = None
    bind_after: float = 0.0  # seconds from the stop to the socket bound (an upper bound)

    @property
    def refused_s(self) -> float:
        """How long the port refused: first to last refusal, plus one probe interval."""
        if self.first is None or self.last is None:
            return 0.0
        return self.last - self.first + PROBE_EVERY

    def line(self) -> str:
        if not self.refused:
            seen = f"no probe was refused (gap under {PROBE_EVERY * 1000:.0f} ms)"
        else:
            seen = (f"the public port refused connections for {self.refused_s * 1000:.0f} ms "
                    f"({self.refused} of {self.probes} probes, one every "
                    f"{PROBE_EVERY * 1000:.0f} ms)")
        return f"gap: {seen}; stop → socket bound {self.bind_after * 1000:.0f} ms"

    def to_json(self) -> dict[str, Any]:
        return {"refused_ms": round(self.refused_s * 1000, 1), "refused_probes": self.refused,
                "probes": self.probes, "bind_after_ms": round(self.bind_after * 1000, 1)}


class GapProbe:
    """Connects to the public port every PROBE_EVERY seconds (and closes at once) from
    before the stop until stopped; records when connections were refused."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.gap = Gap()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gap-probe", daemon=True)

    def __enter__(self) -> GapProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                socket.create_connection(self.address, timeout=0.5).close()
            except ConnectionRefusedError:
                self.gap.refused += 1
                self.gap.first = self.gap.first or began
                self.gap.last = began
            except OSError:
                pass  # a timeout is not a refusal: the connection waited in a backlog
            self.gap.probes += 1
            self._stop.wait(PROBE_EVERY)


# ---------------------------------------------------------------- doing it

@dataclass
class Result:
    plan: Plan
    gap: Gap = field(default_factory=Gap)
    steps: dict[str, float] = field(default_factory=dict)
    current: str = ""  # the step running (or that failed)
    legacy: str = "untouched"  # untouched | replaced | restored | restore failed
    warnings: list[str] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)


class Takeover:
    def __init__(self, d: Site, unit_dir: Path) -> None:
        self.d, self.unit_dir, self.say = d, unit_dir, d.say
        self.sd, self.env = d.sd, d.env
        self.phases = d.phases()

    def run(self, unit: str, build_arg: str | None, *, dry_run: bool) -> Result:
        unit = unit if "." in unit else f"{unit}.service"
        if dry_run:
            the_plan, _ = self._plan(unit, build_arg)
            for line in the_plan.describe():
                self.say(line)
            return Result(the_plan)
        with self.d.lock(f"install {self.env.name} --takeover {unit} {build_arg or ''}".strip()):
            if intent_path(self.d).exists():
                resume(self.d)  # an earlier takeover's CLI died: finish or undo it first
            # Read UNIT only now: undoing an earlier attempt may have re-enabled it.
            return self._run(*self._plan(unit, build_arg))

    def _plan(self, unit: str, build_arg: str | None) -> tuple[Plan, builds.Build]:
        legacy = Legacy.from_props(unit, self.sd.show(unit, *LEGACY_PROPS))
        build = builds.resolve(self.env, build_arg)
        return make_plan(self.d, legacy, build.name), build

    def _run(self, p: Plan, build: builds.Build) -> Result:
        result = Result(p)
        deploy_id = self.d.new_deploy_id()
        self.say(f"takeover of {p.legacy.unit}: {build.name} → blue")
        undo = Undo()
        try:
            self._check(p, result)
            self._prepare(p, build, undo, result, deploy_id)
        except BaseException as exc:
            problems = undo.run()
            self.record(p, deploy_id, result, exc)
            if isinstance(exc, SwitchError | OSError):
                message = exc.message if isinstance(exc, SwitchError) else str(exc)
                raise AbortedError(
                    f"takeover aborted before {p.legacy.unit} was stopped: {message}; "
                    + (f"nothing was changed, {p.legacy.unit} still serves" if not problems
                       else f"{p.legacy.unit} still serves, but undoing failed: "
                       + "; ".join(problems)),
                    exc.hint if isinstance(exc, SwitchError) else "") from None
            raise
        try:
            self._cut_over(p, undo, result)
        except BaseException as exc:
            self._restore(p, undo, result, deploy_id, exc)
            raise
        result.legacy = "replaced"
        self._finish(p, build, result)
        self.record(p, deploy_id, result, None)
        return result

    # -- steps --------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, step: Step, result: Result, label: str = "") -> Iterator[None]:
        """A takeover step through the site's one phase runner; ``result`` keeps its time."""
        result.current = step.value
        # The cut-over's kill point is inside it, once PID 1 runs the cut-over (see there).
        with self.phases(step, label, kill_inside=step is Step.cut_over):
            yield
        result.steps[step.value] = self.phases.durations[step.value]

    def _check(self, p: Plan, result: Result) -> None:
        with self.step(Step.check, result):
            legacy, names = p.legacy, p.names
            props = self.sd.show(legacy.unit, "LoadState")
            if props["LoadState"] != "loaded":
                raise UsageError(f"{legacy.unit} is not loaded (LoadState={props['LoadState']})",
                                 f"name the unit that runs the app now (systemctl status "
                                 f"{legacy.unit})")
            ours = {names.socket, names.template, self.d.unit(Color.blue),
                    self.d.unit(Color.green)}
            if legacy.unit in ours:
                raise UsageError(f"{legacy.unit} is one of alive-switch's own units",
                                 "name the legacy unit that runs the app")
            if p.same_name and _rendered_by_us(legacy.fragment):
                raise UsageError(f"{legacy.unit} is already alive-switch's router",
                                 f"deploy instead: alive-switch deploy {self.env.name}")
            if self.sd.show(names.socket, "ActiveState")["ActiveState"] == "active":
                raise UsageError(f"{names.socket} is already active: the port is "
                                 "alive-switch's; a takeover is the first cut-over only",
                                 f"deploy instead: alive-switch deploy {self.env.name}")
            if self.d.load_state().active is not None:
                raise UsageError(f"{self.env.name} already has a live color",
                                 f"deploy instead: alive-switch deploy {self.env.name}")
            self._check_holders(p)

    def _check_holders(self, p: Plan) -> None:
        holders = host.port_holders(self.env.listen_port)
        foreign = [h for h in holders if h.unit != p.legacy.unit]
        if foreign:
            raise UsageError(f"port {self.env.listen_port} is held by {foreign[0].describe()}, "
                             f"not by {p.legacy.unit}: stopping {p.legacy.unit} would not "
                             "free it", "name the unit that holds the port (see: ss -ltnp "
                             f"'sport = :{self.env.listen_port}')")
        if p.legacy.active and not holders:
            self.say(f"note: {p.legacy.unit} does not listen on port {self.env.listen_port}")

    def _prepare(self, p: Plan, build: builds.Build, undo: Undo, result: Result,
                 deploy_id: str) -> None:
        with self.step(Step.backup, result, str(p.backup_dir)):
            self._backup(p, undo, deploy_id)
        with self.step(Step.write_units, result):
            self._write_units(p, undo)
        with self.step(Step.start_blue, result, f"{build.name} on port "
                        f"{self.env.port(Color.blue)}"):
            self._preflight(build)
            started = self._start_blue(build, undo)
        with self.step(Step.health, result):
            self._health_gate(started)
        with self.step(Step.pre_switch, result):
            self._hook("pre_switch", build, result, abort=True)
        if p.legacy.enabled:
            with self.step(Step.disable_legacy, result, p.legacy.unit):
                self.sd.disable(p.legacy.unit)
                undo.add(f"enable {p.legacy.unit}", lambda: self.sd.enable(p.legacy.unit))
        with self.step(Step.commit, result):
            self._commit(p, undo, deploy_id)

    def _backup(self, p: Plan, undo: Undo, deploy_id: str) -> None:
        env_dir = self.d.env_dir
        if not env_dir.exists():
            env_dir.mkdir(parents=True, mode=0o755)
            undo.add(f"remove {env_dir}", lambda: shutil.rmtree(env_dir))
        target = p.backup_dir
        if not target.exists():
            target.mkdir(mode=0o700)
            undo.add(f"remove {target}", lambda: shutil.rmtree(target, ignore_errors=True))
        legacy = p.legacy
        if legacy.fragment and Path(legacy.fragment).is_file():
            shutil.copy2(legacy.fragment, target / f"{legacy.unit}.bak")
        for dropin in legacy.dropins:
            if Path(dropin).is_file():
                (target / f"{legacy.unit}.d").mkdir(exist_ok=True)
                shutil.copy2(dropin, target / f"{legacy.unit}.d" / Path(dropin).name)
        info = {"unit": legacy.unit, "fragment": legacy.fragment,
                "dropins": list(legacy.dropins), "was_enabled": legacy.enabled,
                "was_active": legacy.active, "time": round(time.time(), 3),
                "restore": f"cp {target / (legacy.unit + '.bak')} {legacy.fragment}; "
                           f"systemctl daemon-reload; systemctl enable --now {legacy.unit}"}
        state.write_atomic(target / "legacy.json", (json.dumps(info, indent=2) + "\n").encode())
        self._write_intent(p, undo, deploy_id)

    def _write_intent(self, p: Plan, undo: Undo, deploy_id: str) -> None:
        """Before the first change that matters: what a later command needs to finish or
        undo this takeover if the CLI dies (see :func:`resume`)."""
        intent = intent_path(self.d)
        undo.add(f"remove {intent}", lambda: intent.unlink(missing_ok=True))
        legacy = p.legacy
        state.write_atomic(intent, (json.dumps({
            "unit": legacy.unit, "active": legacy.active, "enabled": legacy.enabled,
            "fragment": legacy.fragment, "dropins": list(legacy.dropins), "build": p.build,
            "deploy_id": deploy_id, "unit_dir": str(self.unit_dir),
        }, indent=2) + "\n").encode())

    def _write_units(self, p: Plan, undo: Undo) -> None:
        # Registered first, so it runs last: after the files are back as they were.
        undo.add("daemon-reload", self.sd.daemon_reload)
        files = render.render(self.d.cfg, self.env)
        if p.same_name:  # until the end, that file is UNIT's; the socket triggers a stand-in
            del files[p.names.router]
            files.update(render.takeover_units(self.d.cfg, self.env))
        for rel, text in sorted(files.items()):
            self._put(self.unit_dir / rel, text.encode(), undo)
        self.sd.daemon_reload()
        settings = install.router_settings(self.d.cfg, self.env)
        undo.add("router settings", snapshot(self.d.env_dir / state.ROUTER_SETTINGS))
        state.save_router_settings(self.d.env_dir, settings)

    def _put(self, path: Path, data: bytes, undo: Undo) -> None:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
            parent = path.parent
            undo.add(f"remove {parent}", lambda: shutil.rmtree(parent, ignore_errors=True))
        undo.add(f"restore {path}", snapshot(path))
        state.write_atomic(path, data)

    def _preflight(self, build: builds.Build) -> None:
        self.d.require_preflight(Color.blue, None, build.path, which=PREFLIGHT, after="",
                                 hint="fix it, then run the takeover again")

    def _start_blue(self, build: builds.Build, undo: Undo) -> dict[str, str]:
        blue, env_dir = self.d.unit(Color.blue), self.d.env_dir
        undo.add("blue's link", snapshot(state.color_link(env_dir, Color.blue)))
        undo.add("blue's env file", snapshot(env_dir / "blue.env"))
        self.d.point_at(Color.blue, build.name, build.path)
        undo.add(f"stop {blue}", lambda: self.sd.stop(blue))
        return self.d.restart_color(Color.blue, build.name)

    def _health_gate(self, started: dict[str, str]) -> None:
        problem = self.d.health_problem(Color.blue, started)
        if problem:
            raise AbortedError(f"blue {problem}", self.d.journal_hint(Color.blue))

    def _hook(self, name: str, build: builds.Build, result: Result, *, abort: bool) -> None:
        run = self.d.run_hook(name, Color.blue, build.name, build.path)
        if run is None:
            return
        result.hooks.append(run.to_json())
        if run.ok:
            return
        problem = f"{name} hook failed ({run.outcome}): {run.command}"
        if abort:
            raise AbortedError(problem, "fix the hook and run the takeover again")
        self._warn(result, problem)

    # -- the cut-over ---------------------------------------------------------------------

    def _cut_over(self, p: Plan, undo: Undo, result: Result) -> None:
        legacy, sd, sock = p.legacy, self.sd, p.names.socket
        with GapProbe(install.listen_probe_address(self.env)) as probe:
            result.gap = probe.gap
            if legacy.active:
                undo.add(f"start {legacy.unit}", lambda: self._start_legacy(legacy.unit))
            undo.add(f"stop {sock}", lambda: sd.stop(sock))
            if legacy.active:
                with self.step(Step.cut_over, result, f"{legacy.unit} → {sock}"):
                    result.gap.bind_after = self._run_cut_over(p)
            else:
                with self.step(Step.bind, result, sock):
                    sd.reset_failed(sock)
                    sd.start(sock)
            with self.step(Step.start_router, result, p.first_router):
                self._start_router(p, undo)
        self.say(result.gap.line())

    def _run_cut_over(self, p: Plan) -> float:
        """Have PID 1 stop UNIT and bind the socket (see ops/takeover/cutover.py); seconds
        from the stop to the bind."""
        name = self.d.names.cutover
        outcome = p.backup_dir / "cutover.json"
        outcome.unlink(missing_ok=True)
        self.sd.cancel(name)  # a finished one of an earlier attempt still holds the name
        self.sd.start_transient(name, [
            sys.executable, "-m", "switcher.ops.takeover.cutover", p.legacy.unit, p.names.socket,
            self.env.listen_address, str(self.env.listen_port), str(outcome),
            f"{CUTOVER_TIMEOUT:g}"])
        kill_here(Step.cut_over.value)
        done = self._wait_outcome(name, outcome)
        self.sd.cancel(name)
        if not done.get("ok"):
            raise SwitchError(f"the cut-over failed: {done.get('error')}",
                              f"see: journalctl -u {name}.service -n 50 --no-pager")
        return float(done.get("bind_after_ms", 0)) / 1000

    def _wait_outcome(self, name: str, outcome: Path) -> dict[str, Any]:
        deadline = time.monotonic() + CUTOVER_TIMEOUT + 30
        next_look = time.monotonic() + 0.5
        while not outcome.exists():
            now = time.monotonic()
            if now > next_look:  # a cut-over that died leaves no outcome: ask systemd
                next_look = now + 0.5
                props = self.sd.show(f"{name}.service", "ActiveState", "Result")
                if props["ActiveState"] in ("failed", "inactive") and not outcome.exists():
                    return {"ok": False, "error": f"{name}.service ended without an outcome "
                                                  f"({props['ActiveState']}, {props['Result']})"}
            if now > deadline:
                return {"ok": False, "error": f"no outcome from {name}.service in "
                                              f"{CUTOVER_TIMEOUT + 30:g} s"}
            time.sleep(OUTCOME_POLL)
        return dict(json.loads(outcome.read_text()))

    def wait_cut_over(self) -> None:
        """Until a cut-over started by a CLI that died has ended (PID 1 runs it on)."""
        name = f"{self.d.names.cutover}.service"
        deadline = time.monotonic() + CUTOVER_TIMEOUT + 30
        while self.sd.show(name, "SubState")["SubState"] in ("running", "start"):
            if time.monotonic() > deadline:
                raise SwitchError(f"{name} still runs after {CUTOVER_TIMEOUT + 30:g} s",
                                  f"see: journalctl -u {name} -n 50 --no-pager")
            time.sleep(0.05)
        self.sd.cancel(name.removesuffix(".service"))

    def undo_interrupted(self, p: Plan, result: Result) -> None:
        """UNIT serves again as before; blue stops; no color is live."""
        legacy = p.legacy
        if legacy.enabled:
            self.sd.enable(legacy.unit)
        if legacy.active and self.sd.show(legacy.unit, "ActiveState")["ActiveState"] != "active":
            self._start_legacy(legacy.unit)
        self.sd.stop(p.blue)
        current = self.d.load_state()
        state.save_state(self.d.env_dir, current.with_(active=None, pending=None, fallback=None,
                                                       drain_until=None))
        intent_path(self.d).unlink(missing_ok=True)
        result.legacy = "restored"

    def _start_legacy(self, unit: str) -> None:
        self.sd.reset_failed(unit)
        self.sd.start(unit)

    def _commit(self, p: Plan, undo: Undo, deploy_id: str) -> None:
        """Blue live before the cut-over: whichever router starts then serves it."""
        env_dir = self.d.env_dir
        current = self.d.load_state()
        committed = current.with_(active=Color.blue, builds={**current.builds,
                                                             Color.blue: p.build},
                                  pending=None, fallback=None, drain_until=None,
                                  deploy_id=deploy_id)
        undo.add("state.json.prev", snapshot(env_dir / state.STATE_PREV))
        undo.add("state.json", snapshot(env_dir / state.STATE))
        state.save_state(env_dir, committed)

    def _start_router(self, p: Plan, undo: Undo) -> None:
        router = p.first_router
        self.sd.reset_failed(router)
        undo.add(f"stop {router}", lambda: self.sd.stop(router))
        self.sd.restart(router)
        self._router_serves_blue()

    def _router_serves_blue(self) -> None:
        # The router read state.json as it started; this only covers one that did not.
        if serving(self.d.router.status()) != Color.blue:
            current = self.d.load_state()
            self.d.router.switch(Color.blue, None, None, current.builds)

    def _restore(self, p: Plan, undo: Undo, result: Result, deploy_id: str,
                 exc: BaseException) -> None:
        message = exc.message if isinstance(exc, SwitchError) else str(exc) or repr(exc)
        self.say(f"takeover failed after {p.legacy.unit} was stopped: {message}; "
                 f"restoring {p.legacy.unit}")
        problems = undo.run()
        result.legacy = "restore failed" if problems else "restored"
        self.record(p, deploy_id, result, exc)
        if problems:
            raise SwitchError(f"takeover failed after {p.legacy.unit} was stopped ({message}) "
                              f"and restoring it failed too: {'; '.join(problems)}",
                              f"restore it by hand: see {p.backup_dir / 'legacy.json'}"
                              ) from None
        if isinstance(exc, SwitchError | OSError):
            raise AbortedError(f"takeover failed after {p.legacy.unit} was stopped: {message};"
                               f" {p.legacy.unit} was restored (enabled as before, started) "
                               "and serves again; our units were removed",
                               exc.hint if isinstance(exc, SwitchError) else "") from None

    # -- after ----------------------------------------------------------------------------

    def _finish(self, p: Plan, build: builds.Build, result: Result) -> None:
        """The new stack serves: from here a failure is a warning, never a restore."""
        try:
            self.complete(p, result)
            with self.step(Step.post_switch, result):
                self._hook("post_switch", build, result, abort=False)
        except SwitchError as exc:
            self._warn(result, f"{exc.message} (after the cut-over: blue serves)")
        self.say(f"{build.name} is live on blue; {p.legacy.unit} is stopped and disabled, its "
                 f"unit file backed up in {p.backup_dir}/")

    def complete(self, p: Plan, result: Result) -> None:
        """Enable at boot, hand over from the stand-in, end the intent. Run again by a later
        command when the CLI died before the end (see :func:`resume`)."""
        with self.step(Step.enable, result):
            for unit in (p.names.socket, p.blue):
                self._enable(unit, result)
            if not p.same_name:
                self._enable(p.names.router, result)
        if p.same_name:
            with self.step(Step.swap_router, result, f"{p.stand_in} → {p.names.router}"):
                self._swap_router(p)
            self._enable(p.names.router, result)
        intent_path(self.d).unlink(missing_ok=True)

    def _replace_legacy_file(self, p: Plan) -> None:
        # UNIT's own drop-ins would apply to our router: set aside (they are in the backup).
        own = self.unit_dir / f"{p.legacy.unit}.d"
        for dropin in map(Path, p.legacy.dropins):
            if dropin.parent == own and dropin.is_file():
                dropin.unlink()
        with contextlib.suppress(OSError):
            own.rmdir()  # only when empty: files it may hold that are not UNIT's stay
        text = render.render(self.d.cfg, self.env)[p.names.router]
        state.write_atomic(self.unit_dir / p.names.router, text.encode())

    def _swap_router(self, p: Plan) -> None:
        """UNIT has stopped: its name becomes the router's. No connection is refused: the
        socket keeps listening, and they wait in its backlog while no router runs."""
        self._replace_legacy_file(p)
        files = render.render(self.d.cfg, self.env)
        sock = p.names.socket
        state.write_atomic(self.unit_dir / sock, files[sock].encode())
        (self.unit_dir / p.stand_in).unlink(missing_ok=True)
        self.sd.daemon_reload()
        self.sd.stop(p.stand_in)
        self.sd.reset_failed(p.names.router)
        self.sd.start(p.names.router)
        self._router_serves_blue()

    def _enable(self, unit: str, result: Result) -> None:
        try:
            self.sd.enable(unit)
        except SwitchError as exc:
            self._warn(result, f"could not enable {unit} at boot: {exc.message}; run "
                               f"`systemctl enable {unit}`")

    def _warn(self, result: Result, warning: str) -> None:
        result.warnings.append(warning)
        self.say(f"warning: {warning}")

    def record(self, p: Plan, deploy_id: str, result: Result, exc: BaseException | None
                ) -> None:
        failed = exc is not None
        message = "" if not failed else (exc.message if isinstance(exc, SwitchError)
                                         else str(exc) or repr(exc))
        self.d.record({
            "kind": "deploy", "deploy_id": deploy_id, "color": "blue", "build": p.build,
            "from": None, "outcome": "failed" if failed else "ok", "message": message,
            "failed_phase": result.current if failed else None,
            "phases": result.steps, "warnings": result.warnings, "hooks": result.hooks,
            "takeover": {"unit": p.legacy.unit, "backup": str(p.backup_dir),
                         "gap": result.gap.to_json(), "legacy": result.legacy},
        })


def _rendered_by_us(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as unit_file:
            return unit_file.read(64).startswith("# Rendered by alive-switch")
    except OSError:
        return False
