"""Pre-flight checks: one line each, ok / warning / failed, and why.

Run by ``check ENV`` and by every deploy before it touches the idle color. Warnings never
block (a sick live color is exactly when a fix must deploy); a failure aborts with exit 3.

The common path reads /proc directly; psutil (~17 ms to import, a twentieth of a warm
rollback's budget) is imported only to describe a foreign process in an error.
"""

from __future__ import annotations

import enum
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from switcher import health, host, steerprobe
from switcher.config import Environment
from switcher.model import Color, Mode
from switcher.names import Names
from switcher.systemd import Systemd, UnitProps

FACTS = ("LoadState", "ActiveState", "UnitFileState", "Listen", "Result")


class Level(enum.StrEnum):
    ok = "ok"
    warning = "warning"
    failed = "failed"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def line(self) -> str:
        return f"{self.level.value:<8} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Subject:
    """What is being checked: the environment, its units, the idle color and the build."""

    app: str
    env: Environment
    sd: Systemd
    target: Color
    live: Color | None
    build: Path
    _facts: dict[str, UnitProps] = field(default_factory=dict, repr=False, compare=False)

    def unit(self, color: Color) -> str:
        return Names(self.app, self.env.name).color(color)

    def props(self, unit: str) -> UnitProps:
        """The unit's properties, read for all of the environment's units in one call."""
        if not self._facts:
            names = Names(self.app, self.env.name)
            units = [names.socket, names.router, self.unit(Color.blue),
                     self.unit(Color.green)]
            self._facts.update(self.sd.show_many(units, *FACTS))
        return self._facts.get(unit) or self.sd.show(unit, *FACTS)


CheckFn = Callable[[Subject], Check]


def run_all(subject: Subject) -> list[Check]:
    return [check(subject) for check in CHECKS]


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.level is Level.failed]


def units_loaded(s: Subject) -> Check:
    names = Names(s.app, s.env.name)
    wanted = [names.socket, names.router, s.unit(Color.blue), s.unit(Color.green)]
    missing = [u for u in wanted if s.props(u)["LoadState"] != "loaded"]
    if missing:
        return Check("units", Level.failed, f"not loaded: {', '.join(missing)}; run "
                     f"`alive-switch install {s.env.name}`")
    return Check("units", Level.ok, "installed and loaded")


def socket_held(s: Subject) -> Check:
    unit = Names(s.app, s.env.name).socket
    props = s.props(unit)
    if props["ActiveState"] != "active":
        return Check("socket", Level.failed, f"{unit} is {props['ActiveState']}; run "
                     f"`systemctl start {unit}` (or `alive-switch install {s.env.name}`)")
    if props["UnitFileState"] != "enabled":
        return Check("socket", Level.warning, f"{unit} is not enabled: after a reboot nothing "
                     f"listens; run `systemctl enable {unit}`")
    # The router (and, during a daemon-reload, generators) share systemd's very socket:
    # what matters is that every listening socket on the port is one PID 1 holds.
    systemds = host.socket_inodes_of(1)
    for inode, pids in host.listening_sockets(s.env.listen_port).items():
        if inode not in systemds:
            holder = host.describe(min(pids)) if pids else "an unknown process"
            return Check("socket", Level.failed, f"port {s.env.listen_port} is held by "
                         f"{holder}, not by systemd")
    return Check("socket", Level.ok, f"{unit} active, enabled, {props['Listen']} held by "
                 "systemd")


def idle_port_free(s: Subject) -> Check:
    port = s.env.port(s.target)
    listeners = host.listeners(port)
    foreign = [pid for pid in listeners if host.unit_of_pid(pid) != s.unit(s.target)]
    if foreign:
        return Check("port", Level.failed, f"{s.target}'s port {port} is held by "
                     f"{host.describe(foreign[0])}; stop it or change env.{s.env.name}.ports")
    if listeners:
        return Check("port", Level.ok, f"{port} held by {s.target} itself (it restarts)")
    problem = host.bind_problem(s.env.host, port)
    if problem:
        return Check("port", Level.failed, f"{s.target}'s port {port} cannot be bound: "
                     f"{problem}")
    return Check("port", Level.ok, f"{port} is free")


def metrics_free(s: Subject) -> Check:
    """A warning, never a failure: without its metrics listener the router still routes."""
    where = s.env.metrics_address
    if where is None:
        return Check("metrics", Level.ok, "off (router.metrics is empty)")
    router = Names(s.app, s.env.name).router
    problem = host.listen_conflict(*where, own_unit=router)
    if problem:
        return Check("metrics", Level.warning, f"router.metrics {s.env.router.metrics} "
                     f"cannot be listened on: {problem}; stop that process or change "
                     f"env.{s.env.name}.router.metrics and run `alive-switch install "
                     f"{s.env.name}`")
    return Check("metrics", Level.ok, f"{s.env.router.metrics} free or held by {router}")


def colors_not_failed(s: Subject) -> Check:
    stuck = []
    for color in Color:
        props = s.props(s.unit(color))
        if props["ActiveState"] == "failed":
            stuck.append(f"{s.unit(color)} ({props['Result']})")
    if stuck:
        return Check("restart loops", Level.warning, f"failed: {', '.join(stuck)}; clear with "
                     "`systemctl reset-failed UNIT` (a deploy resets the idle color itself)")
    return Check("restart loops", Level.ok, "no color unit failed or in start-limit-hit")


def disk_space(s: Subject) -> Check:
    usage = shutil.disk_usage(s.env.builds)
    percent = 100 * usage.used / usage.total
    limit = s.env.checks.disk_max_percent
    level = Level.failed if percent >= limit else Level.ok
    return Check("disk", level, f"{s.env.builds} filesystem {percent:.0f}% used (limit "
                 f"{limit:g}%)" + ("; free space or raise checks.disk_max_percent"
                                   if level is Level.failed else ""))


def memory(s: Subject) -> Check:
    available = _available_bytes() / 1048576
    limit = s.env.checks.memory_min_mb
    level = Level.failed if available < limit else Level.ok
    return Check("memory", level, f"{available:.0f} MB available (minimum {limit:g} MB)"
                 + ("; a second color needs room" if level is Level.failed else ""))


def build_ready(s: Subject) -> Check:
    if not s.build.is_dir():
        return Check("build", Level.failed, f"{s.build} is not a directory")
    marker = s.env.ready_marker
    if marker and not (s.build / marker).exists():
        return Check("build", Level.failed, f"{s.build} has no {marker}")
    return Check("build", Level.ok, f"{s.build}" + (f" ({marker} present)" if marker else ""))


def user_can_read(s: Subject) -> Check:
    user = s.env.user
    if not user:
        return Check("user", Level.ok, "runs as root (no user set)")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return Check("user", Level.failed, f"user {user!r} does not exist; create it or fix "
                     f"env.{s.env.name}.user")
    done = subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                           "--init-groups", "test", "-r", str(s.build), "-a", "-x",
                           str(s.build)], capture_output=True, check=False)
    if done.returncode != 0:
        return Check("user", Level.failed, f"{user} cannot read {s.build}; fix its "
                     "permissions")
    return Check("user", Level.ok, f"{user} can read {s.build}")


def live_health(s: Subject) -> Check:
    if s.live is None:
        return Check("live", Level.ok, "no live color yet")
    result = health.probe(s.env.host, s.env.port(s.live), s.env.health, timeout=2.0)
    if result.ok:
        return Check("live", Level.ok, f"{s.live} is healthy ({result.detail})")
    return Check("live", Level.warning, f"{s.live} is unhealthy ({result.detail}); deploying "
                 "anyway: a sick live color is when a fix must go out")


def direct_mode(s: Subject) -> Check:
    if s.env.mode is not Mode.direct:
        return Check("direct mode", Level.ok, f"not used (router.mode = {s.env.mode.value!r})")
    lacking = steerprobe.problems()
    if lacking:
        return Check("direct mode", Level.failed, f"this host lacks {'; '.join(lacking)}; "
                     f'grant it, or set env.{s.env.name}.router.mode = "tcp"')
    return Check("direct mode", Level.ok, "CAP_BPF, CAP_NET_ADMIN, ptrace access; an "
                 "sk_lookup program loads and attaches")


def direct_backlog(s: Subject) -> Check:
    """Direct mode: the app's listen backlog is the public one (a warning: it still serves)."""
    if s.env.mode is not Mode.direct or s.live is None:
        return Check("backlog", Level.ok, "the router's (not direct mode, or no live color)")
    backlog = host.listen_backlog(s.env.port(s.live))
    wanted = s.env.router.backlog
    if backlog is not None and backlog < wanted:
        return Check("backlog", Level.warning, f"{s.live} listens with a backlog of {backlog}, "
                     f"below router.backlog = {wanted}: in direct mode the app's backlog is "
                     "the public port's; raise it in the app's listen() call")
    return Check("backlog", Level.ok, f"{s.live} listens with a backlog of {backlog}"
                 if backlog is not None else f"{s.live} is not listening")


CHECKS: list[CheckFn] = [
    units_loaded, socket_held, idle_port_free, metrics_free, colors_not_failed, disk_space, memory,
    build_ready, user_can_read, live_health, direct_mode, direct_backlog,
]


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what psutil.virtual_memory().available reads)."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")

