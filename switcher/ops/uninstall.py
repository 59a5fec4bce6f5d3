"""``uninstall ENV [--purge]``: stop and disable the socket, the router and both colors,
cancel the retire timers and remove the unit files ``install`` wrote (only files that
carry its "Rendered by alive-switch" header: anything else is kept and named); ``--purge``
also removes the state directory. Other environments are never touched.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from switcher import audit, state
from switcher.config import Config, Environment
from switcher.lock import Lock
from switcher.model import Color
from switcher.names import Names
from switcher.systemd import Systemd

RENDERED_HEADER = "# Rendered by alive-switch"
Say = Callable[[str], None]


def unit_files(cfg: Config, env: Environment) -> list[str]:
    """What ``install`` writes, relative to the unit directory (drop-ins last)."""
    names = Names(cfg.app, env.name)
    return [names.socket, names.router, names.template, *(names.dropin(c) for c in Color),
            names.takeover_router]  # left by a takeover whose CLI died


def uninstall(cfg: Config, env: Environment, sd: Systemd, unit_dir: Path, *, purge: bool,
              lock: Lock, say: Say) -> list[str]:
    """Stop, disable and remove the environment's units; returns what it did."""
    names = Names(cfg.app, env.name)
    prefix = names.prefix
    units = names.units
    done: list[str] = []
    with lock:
        for color in Color:
            sd.cancel(names.retire(color))
        # The socket first: nothing new arrives while the router and the colors stop.
        for unit in units:
            props = sd.show(unit, "LoadState", "ActiveState", "UnitFileState")
            if props["LoadState"] != "loaded":
                continue
            if props["ActiveState"] not in ("inactive", "failed"):
                sd.stop(unit)
                done.append(f"stopped {unit}")
            if props["UnitFileState"] == "enabled":
                sd.disable(unit)
                done.append(f"disabled {unit}")
        removed = _remove_unit_files(cfg, env, unit_dir, done)
        if removed:
            sd.daemon_reload()
            done.append("daemon-reload")
        for unit in units:
            sd.reset_failed(unit)
        env_dir = cfg.env_dir(env)
        record = {"time": round(time.time(), 3), "env": env.name, "kind": "uninstall",
                  "outcome": "ok", "purge": purge}
        if purge and env_dir.exists():
            backup = ", the takeover backup" if (env_dir / state.TAKEOVER).exists() else ""
            shutil.rmtree(env_dir)
            done.append(f"removed {env_dir} (state, history, color links{backup})")
        elif env_dir.exists():
            done.append(f"kept {env_dir} (state and history; --purge removes it)")
            with contextlib.suppress(OSError):
                state.append_history(env_dir, record)
        audit.send(cfg.app, record)
    if not any(line.startswith(("stopped", "disabled", "removed /")) for line in done):
        done.insert(0, f"no unit of {prefix} is installed")
    for line in done:
        say(line)
    return done


def _remove_unit_files(cfg: Config, env: Environment, unit_dir: Path, done: list[str]) -> bool:
    removed = False
    for rel in unit_files(cfg, env):
        path = unit_dir / rel
        if not path.is_file():
            continue
        if not path.read_text(errors="replace").startswith(RENDERED_HEADER):
            done.append(f"kept {path}: alive-switch did not write it")
            continue
        path.unlink()
        removed = True
        done.append(f"removed {path}")
        if path.parent != unit_dir:
            try:
                path.parent.rmdir()
            except OSError:
                done.append(f"kept {path.parent}: it holds files alive-switch did not write")
    return removed


