"""``logs ENV [COLOR]``: ``journalctl`` over the environment's units."""

from __future__ import annotations

from switcher.config import Config, Environment
from switcher.model import Color
from switcher.names import Names


def journal_argv(cfg: Config, env: Environment, color: Color | None, *, follow: bool,
                 lines: int | None) -> list[str]:
    """``journalctl`` over the socket, the router and both colors, or over one color."""
    names = Names(cfg.app, env.name)
    units = ([names.color(color)] if color is not None
             else [names.socket, names.router, *(names.color(c) for c in Color)])
    argv = ["journalctl", *(f"--unit={u}" for u in units)]
    if lines is not None:
        argv.append(f"--lines={lines}")
    if follow:
        argv.append("--follow")
    return argv


