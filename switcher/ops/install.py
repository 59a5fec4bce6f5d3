"""``install`` and ``render --out``: put an environment's units and router settings in place.

Never closes the live listening socket: a changed ``[Socket]`` section is refused unless
``--rebind``, which accepts a measured gap.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from switcher import host, render, state, steerprobe
from switcher.config import Config, Environment
from switcher.errors import UsageError
from switcher.model import Color, Mode, RouterSettings
from switcher.names import RUN_DIR, Names
from switcher.systemd import Systemd

DEFAULT_UNIT_DIR = "/etc/systemd/system"
Say = Callable[[str], None]


@dataclass
class InstallResult:
    changed_units: list[str] = field(default_factory=list)
    new_units: list[str] = field(default_factory=list)  # the changed ones that did not exist
    running_colors: list[str] = field(default_factory=list)  # color units active right now
    router_settings_changed: bool = False
    router_action: str = "none"
    rebind_gap: float | None = None

    @property
    def changed(self) -> bool:
        return bool(self.changed_units or self.router_settings_changed
                    or self.router_action != "none")


def write_units(files: dict[str, str], out: Path) -> list[str]:
    """Write rendered files under ``out`` atomically; return the ones that changed."""
    changed = []
    for rel, text in sorted(files.items()):
        path = out / rel
        if path.exists() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        state.write_atomic(path, text.encode())
        changed.append(rel)
    return changed


def router_settings(cfg: Config, env: Environment) -> RouterSettings:
    return RouterSettings(
        app=cfg.app, env=env.name, mode=Mode(env.router.mode),
        colors={c: (env.host, env.port(c)) for c in Color},
        control_socket=Names(cfg.app, env.name).control_socket, backlog=env.router.backlog,
        max_connections=env.router.max_connections, restart_drain=env.router.restart_drain,
        header_timeout=env.router.header_timeout, idle_timeout=env.router.idle_timeout,
        max_header_bytes=env.router.max_header_bytes,
        trusted_proxies=tuple(env.router.trusted_proxies), control_group=env.control_group,
        body_timeout=env.router.body_timeout, response_timeout=env.router.response_timeout,
        tunnels=tuple(env.router.tunnels), metrics=env.router.metrics,
        health_path=env.health.path, health_expect=_expect(env.health.expect_status),
        pool_size=env.router.pool_size, pool_idle=env.router.pool_idle,
    )


def _expect(status: str | list[int]) -> str:
    """expect_status as router.json carries it: "2xx" or "200,204"."""
    return status if isinstance(status, str) else ",".join(str(code) for code in status)


def install(cfg: Config, env: Environment, sd: Systemd, unit_dir: Path, *, rebind: bool,
            dry_run: bool, say: Say) -> InstallResult:
    files = render.render(cfg, env)
    names = Names(cfg.app, env.name)
    socket_unit = names.socket
    _check_socket_change(env, sd, unit_dir / socket_unit, files[socket_unit], rebind=rebind)
    if not _active(sd, socket_unit):
        _check_port_free(env, socket_unit)
    _check_metrics_free(env, names)
    _check_direct_mode(env)
    result = InstallResult()
    pending = [rel for rel, text in sorted(files.items())
               if not (unit_dir / rel).exists() or (unit_dir / rel).read_text() != text]
    result.new_units = [rel for rel in pending if not (unit_dir / rel).exists()]
    result.running_colors = [names.color(c) for c in Color if _active(sd, names.color(c))]
    settings = router_settings(cfg, env)
    if dry_run:
        for rel in pending:
            say(f"would write {unit_dir / rel}")
        say("would write router settings, daemon-reload, enable and start "
            f"{socket_unit}, start or reload {names.router}" if pending
            else "units are up to date; nothing to write")
        return result
    result.changed_units = write_units(files, unit_dir)
    env_dir = cfg.env_dir(env)
    env_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    result.router_settings_changed = state.save_router_settings(env_dir, settings)
    if result.changed_units:
        sd.daemon_reload()
    for unit in (socket_unit, names.router):
        if sd.show(unit, "UnitFileState")["UnitFileState"] != "enabled":
            sd.enable(unit)
    socket_changed = socket_unit in result.changed_units
    if rebind and socket_changed and _active(sd, socket_unit):
        result.rebind_gap = _rebind(sd, socket_unit, names.router, env)
        result.router_action = "restarted"
    else:
        if not _active(sd, socket_unit):
            sd.start(socket_unit)
        result.router_action = _start_or_reload_router(
            sd, names.router, unit_changed=names.router in result.changed_units,
            settings_changed=result.router_settings_changed)
    _report(result, unit_dir, say)
    return result


def _active(sd: Systemd, unit: str) -> bool:
    return sd.show(unit, "ActiveState")["ActiveState"] == "active"


def _start_or_reload_router(sd: Systemd, unit: str, *, unit_changed: bool,
                            settings_changed: bool) -> str:
    if not _active(sd, unit):
        sd.start(unit)
        return "started"
    if unit_changed:
        # New limits or ExecStart need a new process; the socket queues meanwhile.
        sd.restart(unit)
        return "restarted"
    if settings_changed:
        sd.reload(unit)
        return "reloaded"
    return "none"


def _rebind(sd: Systemd, socket_unit: str, router: str, env: Environment) -> float:
    """Stop the router, restart the socket with its new [Socket], start the router:
    the only path that closes the public port. Returns the measured gap in seconds."""
    began = time.monotonic()
    sd.stop(router)
    sd.restart(socket_unit)
    sd.start(router)
    _wait_listening(env, deadline=time.monotonic() + 10)
    return time.monotonic() - began


def _wait_listening(env: Environment, deadline: float) -> None:
    host, port = listen_probe_address(env)
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.01)


def listen_probe_address(env: Environment) -> tuple[str, int]:
    """Where a local client reaches the public socket."""
    listen = env.listen_address
    if ":" not in listen:
        return "127.0.0.1", int(listen)
    addr, port = listen.rsplit(":", 1)
    return addr.strip("[]"), int(port)


def _check_socket_change(env: Environment, sd: Systemd, installed: Path, rendered: str, *,
                         rebind: bool) -> None:
    if rebind:
        return
    if installed.exists():
        before = render.socket_section(installed.read_text())
        if before != render.socket_section(rendered):
            raise UsageError(
                f"the [Socket] section of {installed.name} would change "
                f"({before!r} → {render.socket_section(rendered)!r}); applying it closes the "
                "public port",
                f"run `alive-switch install {env.name} --rebind` to accept a short gap")
    listening = sd.show(installed.name, "Listen", "ActiveState")
    if listening.get("ActiveState") == "active" and not _listen_matches(
            listening.get("Listen", ""), env.listen_address):
        raise UsageError(
            f"{installed.name} listens on {listening['Listen']!r}, the config says "
            f"{env.listen_address!r}; changing it closes the public port",
            f"run `alive-switch install {env.name} --rebind` to accept a short gap")


def _listen_matches(shown: str, listen: str) -> bool:
    """``systemctl show -p Listen`` prints e.g. ``[::]:9000 (Stream)``."""
    addresses = re.findall(r"(\S+) \(Stream\)", shown)
    want = f"[::]:{listen}" if listen.isdigit() else listen
    return addresses == [want]


def _report(result: InstallResult, unit_dir: Path, say: Say) -> None:
    for rel in result.changed_units:
        if rel in result.new_units:
            say(f"wrote {unit_dir / rel} (new)")
        else:
            say(f"changed: {rel} (wrote {unit_dir / rel})")
    color_config = [rel for rel in result.changed_units
                    if "@" in rel and rel not in result.new_units]
    if color_config and result.running_colors:
        # systemd reads ExecStart=/Environment= when a unit starts: the running process
        # keeps what it started with, and `status` flags it as "restart pending".
        say(f"the color config changed (exec, environment, …): it takes effect on the next "
            f"start of a color; running now with the old config: "
            f"{', '.join(result.running_colors)} (a deploy starts the idle color afresh, "
            "unless it already runs that build)")
    if result.router_settings_changed:
        say("router settings changed")
    if result.router_action != "none":
        say(f"router {result.router_action}")
    if result.rebind_gap is not None:
        say(f"rebind: the public port was closed for up to {result.rebind_gap * 1000:.0f} ms")
    if not result.changed:
        say("nothing changed: units, router settings and services are up to date")


def _check_port_free(env: Environment, socket_unit: str) -> None:
    """Starting the socket while another process holds the port fails with EADDRINUSE:
    the original incident. Refuse before writing anything and name the way out."""
    holders = host.port_holders(env.listen_port)
    if not holders:
        return
    holder = holders[0]
    if holder.pid == 1:
        hint = "another socket unit holds it: see `systemctl list-sockets`"
    elif holder.unit.endswith(".service"):
        hint = f"cut over from it: alive-switch install {env.name} --takeover {holder.unit}"
    else:
        hint = (f"stop it, or cut over from the unit that runs it with `alive-switch install "
                f"{env.name} --takeover UNIT`")
    raise UsageError(f"port {env.listen_port} is held by {holder.describe()}; starting "
                     f"{socket_unit} would fail with EADDRINUSE; nothing was changed", hint)


def _check_metrics_free(env: Environment, names: Names) -> None:
    """The router would fail to open its metrics listener on an address another process
    holds; this environment's own running router holding it is what a reinstall finds."""
    where = env.metrics_address
    if where is None:
        return
    problem = host.listen_conflict(*where, own_unit=names.router)
    if problem:
        raise UsageError(f"env.{env.name}.router.metrics {env.router.metrics!r} cannot be "
                         f"listened on: {problem}; nothing was changed",
                         "stop that process or pick another address for router.metrics")


def _check_direct_mode(env: Environment) -> None:
    """A router that cannot steer would serve every connection itself: refuse instead of
    installing a mode that only half works."""
    if env.mode is not Mode.direct:
        return
    lacking = steerprobe.problems()
    if lacking:
        raise UsageError(f"env.{env.name}.router.mode = \"direct\": this host lacks "
                         f"{'; '.join(lacking)}; nothing was changed",
                         f'grant it, or set env.{env.name}.router.mode = "tcp"')


def ensure_run_dir() -> None:
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
