"""``alive-switch init``: scaffold a commented config, or add an environment to one.

Text generation is pure (``file_text``, ``environment_text``); ``write`` is the small
writer: it refuses an environment that already exists, appends to an existing file
without touching a byte of what is there, and replaces the file only once the result
passes ``config.load`` — a file it writes always validates.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from switcher import config
from switcher.errors import ConfigError, UsageError

DEFAULT_APP = "alive"
Value = str | int | float


@dataclass(frozen=True)
class Request:
    """What the user asked for, parsed from the command line."""

    env: str
    listen: int | str
    ports: tuple[int, int]  # blue, green
    exec: str
    builds: str
    health: str
    settings: dict[str, Value] = field(default_factory=dict)  # optional keys, e.g. drain


def parse_listen(text: str) -> int | str:
    """``9000`` → 9000 (a port); ``127.0.0.1:9000`` stays a string, as the config wants."""
    return int(text) if text.isdigit() else text


def parse_ports(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise UsageError(f"--ports {text!r}: expected two ports, blue then green",
                         "write e.g. --ports 9001,9002")
    return int(parts[0]), int(parts[1])


def toml_value(value: Value) -> str:
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)


def file_text(app: str, router_exec: str) -> str:
    """The top of a new config file: what every environment shares."""
    default_router = config.Config.router_exec
    router = toml_value(router_exec)
    return f"""\
# alive-switch config, written by `alive-switch init`. Keys commented out show their
# default; the whole list is in the README ("Config"). alive-switch refuses this file
# unless it and its directory are owned by root and not writable by group or others.

# units: {app}-<env>.socket, {app}-<env>.service, {app}-<env>@<color>.service
app = {toml_value(app)}
# state_dir = "/var/lib/alive-switch"
# what the router unit runs (absolute)
{"# " if router_exec == default_router else ""}router_exec = {router}
"""


ENV_TEMPLATE = """\

# Environment {env}: clients connect to {listen_shown}; the app runs as two colors,
# blue and green, on their own ports; a deploy starts the idle one beside the live one.
#   alive-switch install {env} && alive-switch deploy {env}
[env.{env}]
# the public port, held for good by systemd's socket unit (or "ADDR:PORT")
listen = {listen}
# each color's own port: the app binds $HOST:$PORT
ports = {{ blue = {blue}, green = {green} }}
# a build is a directory in here; `deploy` takes the newest unless told
builds = {builds}
# systemd ExecStart syntax, run in the build directory
exec = {exec}
{settings}
[env.{env}.health]
# a color gets traffic only once GET on this path answers 2xx
path = {health}
# timeout = 60                 # seconds a starting color has to turn healthy
# interval = 0.5
# expect_status = "2xx"        # or a list of codes, e.g. [200, 204]
# expect_body = ""             # a substring the answer must contain

# [env.{env}.unit]  (the color units' restart discipline)
# start_timeout = 60
# stop_timeout = 30            # the app's own graceful shutdown
# restart_sec = 10
# start_limit_burst = 3
# start_limit_interval = 300
# hardening = "default"        # or "strict"

# [env.{env}.router]
# mode = "http"                # or "tcp" for non-HTTP protocols
# max_connections = 10000
# metrics = ""                 # "ADDR:PORT" for Prometheus at GET /metrics; "" = off

# [env.{env}.analysis]  (how the new color is judged on live traffic during the watch)
# max_error_rate = 0.02        # tolerated rise of its failure share over the old color's
# min_requests = 50            # fewer answers: judged on health and process only
# baseline = 60                # seconds before the switch that give the old color's figures
# max_latency_ratio = 0        # 0 = off; else fail when p95 > ratio × the old p95 + 0.05 s

# [env.{env}.checks]  (pre-flight limits: alive-switch check {env})
# disk_max_percent = 80
# memory_min_mb = 500
"""


# Optional environment keys, in the order written, with their defaults and why one sets them.
OPTIONAL = (
    ("host", "127.0.0.1", "colors bind here; passed to the app as $HOST beside $PORT"),
    ("environment", None, "plain values, e.g. { NODE_ENV = \"production\" }"),
    ("environment_file", "", "secrets: EnvironmentFile=, root-owned and 0600"),
    ("user", "", "run the app as this user"),
    ("ready_marker", "", "if set, only builds holding this file are deployable"),
    ("drain", 10, "seconds from the switch for the old color to finish its work"),
    ("watch", 10, "seconds the new color is watched; a failure switches back"),
    ("standby", 600, "seconds the old color stays up after the watch (instant rollback)"),
    ("pre_switch", "", "command run once the new color is healthy, before traffic"),
    ("post_switch", "", "command run after the switch"),
)


def environment_text(req: Request) -> str:
    """``[env.NAME]`` and its health table, with the optional keys commented out."""
    listen = toml_value(req.listen)
    lines = []
    for key, default, why in OPTIONAL:
        if key in req.settings:
            lines.append(_keyed(f"{key} = {toml_value(req.settings[key])}", why))
        elif default is not None:
            lines.append(_keyed(f"# {key} = {toml_value(default)}", why))
    unknown = sorted(set(req.settings) - {key for key, _, _ in OPTIONAL})
    if unknown:
        raise UsageError(f"init cannot set {', '.join(unknown)}", "edit the file afterwards")
    return ENV_TEMPLATE.format(
        env=req.env, listen=listen,
        listen_shown=req.listen if isinstance(req.listen, str) else f"port {req.listen}",
        blue=req.ports[0], green=req.ports[1], builds=toml_value(req.builds),
        exec=toml_value(req.exec), health=toml_value(req.health),
        settings="\n".join(lines) + "\n")


def _keyed(assignment: str, why: str) -> str:
    return f"{assignment.ljust(30)} # {why}"


@dataclass(frozen=True)
class Written:
    path: Path
    created: bool  # a new file, rather than an environment added to an existing one
    app: str


def write(path: Path, req: Request, *, app: str | None, router_exec: str) -> Written:
    """Create ``path`` or append ``req``'s environment to it; validate before replacing."""
    if not config.UNIT_NAME_PART.match(req.env):
        raise UsageError(f"environment name {req.env!r} is not a valid unit-name part",
                         "use letters, digits, '_', '.', '-' (starting with a letter/digit)")
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = None
    if old is None:
        text, name = file_text(app or DEFAULT_APP, router_exec), app or DEFAULT_APP
    else:
        name = _existing_app(path, old, req.env, app)
        text = old if old.endswith("\n") or not old else old + "\n"
    text += environment_text(req)
    _replace_validated(path, text, keep_mode_of=path if old is not None else None)
    return Written(path, old is None, name)


def _existing_app(path: Path, old: str, env: str, app: str | None) -> str:
    try:
        raw = tomllib.loads(old)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}",
                          "fix the file first; nothing was written") from None
    if env in (raw.get("env") or {}):
        raise UsageError(f"{path} already has an environment {env!r}; nothing was written",
                         f"edit [env.{env}] by hand, or choose another name")
    existing = str(raw.get("app", ""))
    if app is not None and existing and app != existing:
        raise UsageError(f"{path} is for app {existing!r}, not {app!r}; nothing was written",
                         "drop --app, or write another file with --config")
    return existing


def _replace_validated(path: Path, text: str, *, keep_mode_of: Path | None) -> None:
    """Write ``text`` next to ``path``, load it as a config, then rename it over ``path``."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True)
    temp = path.with_name(f".{path.name}.init-{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if keep_mode_of is not None:
            st = keep_mode_of.stat()
            os.chmod(temp, st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(temp, st.st_uid, st.st_gid)
        try:
            config.load(str(temp), check_owner=False)
        except ConfigError as exc:
            raise UsageError(exc.message.replace(str(temp), str(path))
                             + "; nothing was written", exc.hint) from None
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def owner_warning(path: Path) -> str:
    """What ``config.load`` will say about ownership, so init can say it now ("" if fine)."""
    try:
        config.load(str(path))
    except ConfigError as exc:
        return f"{exc.message}\n  next: {exc.hint}"
    return ""
