"""Render an environment's units: a pure function of config values → {relative path: text}.

Paths are relative to the unit directory; drop-ins sit in their ``<unit>.d/`` folders::

    alive-production.socket                      the public port, held by systemd
    alive-production.service                     the router
    alive-production@.service                    the color template
    alive-production@blue.service.d/color.conf   blue's port and working directory
    alive-production@green.service.d/color.conf

Filters quote values for the directive that reads them, so no config value can inject a
directive or a specifier: newlines are refused by config, ``%`` is doubled, ExecStart words
are quoted, Environment= assignments are quoted with C escapes.
"""

from __future__ import annotations

import re
from importlib import resources

import jinja2

from switcher.config import Config, Environment
from switcher.model import Color
from switcher.names import Names

__all__ = ["render", "socket_section", "takeover_units"]


def render(cfg: Config, env: Environment) -> dict[str, str]:
    names = Names(cfg.app, env.name)
    context = _context(cfg, env)
    jenv = _jinja()
    files = {
        names.socket: jenv.get_template("socket.j2").render(context),
        names.router: jenv.get_template("router.j2").render(context),
        names.template: jenv.get_template("color.j2").render(context),
    }
    dropin = jenv.get_template("color-dropin.j2")
    for color in Color:
        files[names.dropin(color)] = dropin.render(context, color=color)
    return files


def takeover_units(cfg: Config, env: Environment) -> dict[str, str]:
    """For a takeover of the unit that has the router's name: the socket, triggering a
    stand-in router ``<prefix>-takeover.service`` instead (systemd refuses to start a socket
    while its service is still active, and the legacy unit may drain for long after it has
    closed its listener), and that stand-in, which never starts at boot."""
    context = _context(cfg, env)
    names = Names(cfg.app, env.name)
    stand_in = names.takeover_router
    jenv = _jinja()
    return {names.socket:
            jenv.get_template("socket.j2").render(context, service=stand_in),
            stand_in: jenv.get_template("router.j2").render(context, takeover=True)}


def _context(cfg: Config, env: Environment) -> dict[str, object]:
    return {
        "app": cfg.app, "env": env, "prefix": cfg.unit_prefix(env),
        "env_dir": str(cfg.env_dir(env)), "router_exec": cfg.router_exec,
        "nofile": max(65536, env.router.max_connections * 2 + 1024),
    }


def socket_section(text: str) -> str:
    """The [Socket] section of a socket unit, whitespace-normalised, for change detection."""
    match = re.search(r"^\[Socket\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    lines = match.group(1).splitlines() if match else []
    return "\n".join(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))


def _jinja() -> jinja2.Environment:
    source = resources.files("switcher") / "templates"
    jenv = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (source / name).read_text()),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,  # noqa: S701 - unit files, not HTML
    )
    jenv.filters.update(sd_path=sd_path, sd_word=sd_word, sd_exec_word=sd_exec_word,
                        sd_quoted=sd_quoted, sd_specifiers=sd_specifiers, sd_number=sd_number)
    return jenv


def sd_specifiers(value: str) -> str:
    """Keep ``%`` literal in any directive that expands specifiers."""
    return value.replace("%", "%%")


def sd_path(value: str) -> str:
    return sd_specifiers(value)


def sd_word(value: str) -> str:
    """One word of a space-separated, quote-aware list (ReadWritePaths=, ExecStart=)."""
    value = sd_specifiers(value)
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sd_exec_word(value: str) -> str:
    """An ExecStart= word: also ``$`` stays literal (ExecStart= expands $VAR)."""
    return sd_word(value.replace("$", "$$"))


def sd_quoted(value: str) -> str:
    """An Environment= assignment, quoted; systemd unquotes and C-unescapes it."""
    escaped = sd_specifiers(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def sd_number(value: float) -> str:
    return f"{value:g}"
