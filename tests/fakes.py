"""Fakes of the outside world for the unit tests: an in-memory systemd and router.

They stand in for the adapters (switcher/systemd.py, switcher/routerctl.py) only; what a
fake runs on the product's behalf is the product's own code (FakeSystemd.start_transient
runs the real cut-over of ops/takeover/cutover.py against its units)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from switcher.analysis import BOUNDS, Figures
from switcher.errors import RouterError, SystemdError
from switcher.model import Canary, Color, Fallback, canary_json
from switcher.ops.takeover import cutover
from switcher.routerctl import CONTROL_TIMEOUT
from switcher.systemd import UnitProps

CUTOVER_MODULE = "switcher.ops.takeover.cutover"


@dataclass
class FakeUnit:
    active: str = "inactive"
    sub: str = "dead"
    main_pid: int = 0
    invocation: str = ""
    enabled: bool = False


@dataclass
class FakeSystemd:
    """In-memory systemd for unit tests of the deploy logic; records every call."""

    units: dict[str, FakeUnit] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    timers: dict[str, tuple[float, list[str]]] = field(default_factory=dict)
    fail_start: set[str] = field(default_factory=set)
    _pid: int = 1000

    def _unit(self, unit: str) -> FakeUnit:
        return self.units.setdefault(unit, FakeUnit())

    def daemon_reload(self) -> None:
        self.calls.append(("daemon-reload", ""))

    def start(self, unit: str) -> None:
        self.calls.append(("start", unit))
        if unit in self.fail_start:
            self._unit(unit).active = "failed"
            raise SystemdError(f"`systemctl start {unit}` failed", f"journalctl -u {unit}")
        u = self._unit(unit)
        if u.active != "active":
            self._pid += 1
            u.active, u.sub, u.main_pid, u.invocation = ("active", "running", self._pid,
                                                         f"inv{self._pid}")

    def stop(self, unit: str) -> None:
        self.calls.append(("stop", unit))
        u = self._unit(unit)
        u.active, u.sub, u.main_pid = "inactive", "dead", 0

    def restart(self, unit: str) -> None:
        self.stop(unit)
        self.start(unit)

    def reload(self, unit: str) -> None:
        self.calls.append(("reload", unit))

    def reset_failed(self, unit: str) -> None:
        self.calls.append(("reset-failed", unit))

    def enable(self, unit: str) -> None:
        self.calls.append(("enable", unit))
        self._unit(unit).enabled = True

    def disable(self, unit: str) -> None:
        self.calls.append(("disable", unit))
        self._unit(unit).enabled = False

    def show(self, unit: str, *props: str) -> UnitProps:
        u = self._unit(unit)
        if unit.endswith(".timer"):  # a timer made by schedule() is active until cancelled
            u.active = "active" if unit.removesuffix(".timer") in self.timers else "inactive"
        every = {"ActiveState": u.active, "SubState": u.sub, "MainPID": str(u.main_pid),
                 "InvocationID": u.invocation, "LoadState": "loaded",
                 "UnitFileState": "enabled" if u.enabled else "disabled", "Result": "success"}
        return {p: every.get(p, "") for p in props}

    def show_many(self, units: list[str], *props: str) -> dict[str, UnitProps]:
        return {unit: self.show(unit, *props) for unit in units}

    def schedule(self, name: str, after: float, argv: list[str]) -> None:
        self.calls.append(("schedule", name))
        if name in self.timers:
            raise SystemdError(f"unit {name}.timer already exists", "")
        self.timers[name] = (after, argv)

    def cancel(self, name: str) -> None:
        self.calls.append(("cancel", name))
        self.timers.pop(name, None)

    def start_transient(self, name: str, argv: list[str]) -> None:
        """Runs what a transient unit of alive-switch's runs: the takeover's cut-over, its
        real code (cutover.main) against this fake's units."""
        self.calls.append(("start-transient", name))
        if CUTOVER_MODULE not in argv:
            raise SystemdError(f"FakeSystemd cannot run {argv}", "")
        cutover.main(argv[-6:], manager=_CutoverUnits(self))


@dataclass
class _Stopped:
    """A legacy unit's stop, done at once."""

    returncode: int | None = 0
    stderr: IO[str] | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        return 0


@dataclass
class _CutoverUnits:
    """What the cut-over asks of PID 1, answered by a FakeSystemd."""

    sd: FakeSystemd

    def begin_stop(self, unit: str) -> _Stopped:
        self.sd.stop(unit)
        return _Stopped()

    def start(self, unit: str) -> None:
        try:
            self.sd.start(unit)
        except SystemdError as exc:
            raise RuntimeError(exc.message) from None


def answers(ok: int = 0, failed_5xx: int = 0, *, refused: int = 0,
            timed: tuple[int, ...] = ()) -> Figures:
    """A color's figures: ``ok`` 2xx, ``failed_5xx`` 5xx, ``refused`` connects, and the
    latency histogram's first buckets ``timed`` (the rest 0)."""
    counts = timed + (0,) * (len(BOUNDS) + 1 - len(timed))
    return Figures(responses=(0, ok, 0, 0, failed_5xx), failures=(refused, 0, 0),
                   counts=counts)


def no_figures() -> dict[Color, Figures]:
    return {color: Figures() for color in Color}


@dataclass
class FakeRouter:
    """Records switches and answers with per-color figures the test scripts, for unit tests
    of the deploy logic: ``counters`` (cumulative since ``started_at``), ``window`` (what
    ``figures`` answers: the last N seconds), ``recent`` (status's last 60 s). ``traffic``
    runs at every ``status`` (the watch reads one per look): the test's traffic between two
    looks; it may set ``unreadable``, and then ``status`` fails as a router that cannot be
    reached would."""

    active: Color | None = None
    fallback: Fallback | None = None
    switches: list[Color] = field(default_factory=list)
    started_at: float = 1_000.0
    counters: dict[Color, Figures] = field(default_factory=no_figures)
    window: dict[Color, Figures] = field(default_factory=no_figures)
    recent: dict[Color, Figures] = field(default_factory=no_figures)
    traffic: Callable[[FakeRouter], None] | None = None
    unreadable: bool = False
    asked_seconds: list[float] = field(default_factory=list)
    drain_until: float | None = None  # of the last switch
    canary: Canary | None = None  # the split a canary step set
    canaries: list[Canary | None] = field(default_factory=list)  # every split, in order
    preview: tuple[Color, str] | None = None  # (color, token), until the switch
    paused: dict[str, Any] | None = None  # {"until": …, "held": …} while paused
    steered: list[Color] = field(default_factory=list)  # direct mode's listeners taken
    steer_error: str = ""  # set: ``steer`` fails with it
    direct: dict[str, Any] | None = None  # direct mode's report in ``status``
    inflight: dict[str, int] = field(default_factory=lambda: {"blue": 0, "green": 0})

    def status(self, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        if self.traffic is not None:
            self.traffic(self)
        if self.unreadable:
            raise RouterError("router control socket /run/fake.sock: [Errno 111] Connection "
                              "refused", "is the router running?")
        return {"ok": True, "serving": self.active.value if self.active else None,
                "canary": canary_json(self.canary), "paused": self.paused,
                "preview": self.preview[0].value if self.preview else None,
                "inflight": dict(self.inflight), "started_at": self.started_at,
                "counters": _colors(self.counters),
                "recent": {"seconds": 60.0, **_colors(self.recent)},
                **({"direct": self.direct} if self.direct is not None else {})}

    def figures(self, seconds: float, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        self.asked_seconds.append(seconds)
        return {"ok": True, "started_at": self.started_at, "seconds": float(seconds),
                "colors": _colors(self.window)}

    def steer(self, color: Color) -> None:
        if self.steer_error:
            raise RouterError(f"router refused 'steer': {self.steer_error}", "journalctl")
        self.steered.append(color)

    def switch(self, target: Color, fallback: Fallback | None,
               drain_until: float | None, builds: dict[Color, str | None]) -> dict[str, Any]:
        self.active, self.fallback, self.drain_until = target, fallback, drain_until
        self.switches.append(target)
        self.canary = self.preview = None  # as the router: a switch ends both
        return {"ok": True, "serving": target.value}

    def set_fallback(self, fallback: Fallback | None) -> None:
        self.fallback = fallback

    def set_canary(self, canary: Canary | None) -> dict[str, Any]:
        self.canary = canary
        self.canaries.append(canary)
        return {"ok": True, "canary": canary_json(canary)}

    def set_preview(self, color: Color | None, token: str = "") -> None:
        self.preview = (color, token) if color is not None else None

    def pause(self, max_wait: float) -> dict[str, Any]:
        if self.paused:
            raise RouterError("router refused 'pause': already paused", "resume first")
        self.paused = {"until": 2_000_000_000.0 + max_wait, "held": 0}
        return {"ok": True, "paused_until": self.paused["until"]}

    def resume(self) -> dict[str, Any]:
        if not self.paused:
            raise RouterError("router refused 'resume': not paused", "")
        self.paused = None
        return {"ok": True, "released": 3}

    def serve(self, color: Color, figures: Figures) -> None:
        """``color`` answered ``figures`` more."""
        self.counters[color] = self.counters[color] + figures

    def restart(self) -> None:
        """A new router process: a later start time, every counter from zero."""
        self.started_at += 60
        self.counters = no_figures()


def _colors(figures: dict[Color, Figures]) -> dict[str, Any]:
    return {color.value: f.to_json() for color, f in figures.items()}
