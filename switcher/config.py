"""The TOML config as frozen, typed settings; defaults and validation declared once.

Each dataclass below *is* a TOML table: its fields are the table's keys, their defaults
are the contract's defaults, and ``_load_table`` rejects unknown keys (suggesting the
nearest valid one), wrong types and missing required keys, naming the file and key.
Checks that relate several values live in ``_validate_*``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import itertools
import os
import re
import shlex
import stat
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from switcher.errors import ConfigError
from switcher.model import FIGURES_RING_SECONDS, Color, Mode, steered_address

DEFAULT_PATH = "/etc/alive-switch/alive-switch.toml"
ENV_VAR = "ALIVE_SWITCH_CONFIG"
REQUIRED = "required"  # field metadata markers
INTERNAL = "internal"  # filled in by the loader, not a TOML key
UNIT_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EXEC_PREFIXES = "+!:-@|"
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def required() -> Any:
    return field(metadata={REQUIRED: True})


def internal() -> Any:
    return field(metadata={INTERNAL: True})


@dataclass(frozen=True, kw_only=True)
class Health:
    path: str = required()
    timeout: float = 60.0
    interval: float = 0.5
    expect_status: str | list[int] = "2xx"
    expect_body: str = ""

    def status_ok(self, code: int) -> bool:
        if isinstance(self.expect_status, list):
            return code in self.expect_status
        return str(code)[0] == self.expect_status[0]


@dataclass(frozen=True, kw_only=True)
class UnitSettings:
    start_timeout: float = 60.0
    stop_timeout: float = 30.0
    restart_sec: float = 10.0
    start_limit_burst: int = 3
    start_limit_interval: float = 300.0
    hardening: str = "default"


@dataclass(frozen=True, kw_only=True)
class Router:
    mode: str = "http"
    backlog: int = 4096
    processes: int = 1
    max_connections: int = 10000
    restart_drain: float = 1.0
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_header_bytes: int = 65536
    trusted_proxies: list[str] = field(default_factory=list)
    body_timeout: float = 60.0
    response_timeout: float = 60.0
    tunnels: list[str] = field(default_factory=lambda: ["websocket"])
    metrics: str = ""  # "ADDR:PORT" of the Prometheus listener; "" = off
    pool_size: int = 64  # http: idle keep-alive connections kept per color (0 = off)
    pool_idle: float = 2.0  # http: seconds an idle pooled connection may be reused


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """How a new color is judged on live traffic (see switcher/analysis.py)."""

    max_error_rate: float = 0.02  # tolerated rise of its failure share over the baseline
    min_requests: int = 50  # fewer answers than this: not judged on traffic
    baseline: float = 60.0  # seconds before T0 that give the old color's share and p95
    max_latency_ratio: float = 0.0  # 0 = off; else p95 > ratio × baseline p95 + 0.05 s fails


@dataclass(frozen=True, kw_only=True)
class Canary:
    """Progressive delivery: shares of clients on the new color before the full switch."""

    steps: list[int] = field(default_factory=list)  # percent per step, e.g. [5, 25, 50]
    step_seconds: float = 30.0  # each step lasts this long and must pass the analysis


def canary_problem(steps: list[int], step_seconds: float) -> tuple[str, str] | None:
    """What is wrong with a canary (a problem, its fix), or None; for the config and for
    ``deploy --canary``."""
    if step_seconds <= 0:
        return (f"step_seconds {step_seconds:g} is not above 0",
                "write how long each step lasts in seconds, e.g. 30")
    outside = [p for p in steps if not 1 <= p <= 99]
    if outside:
        return (f"step {outside[0]} is outside 1-99 percent",
                "write percents of clients between 1 and 99, e.g. [5, 25, 50] (100 is "
                "the full switch, which follows the last step)")
    for before, after in itertools.pairwise(steps):
        if after <= before:
            return (f"steps {steps} do not increase ({before} then {after})",
                    "write each step's share above the one before, e.g. [5, 25, 50]")
    return None


@dataclass(frozen=True, kw_only=True)
class Checks:
    disk_max_percent: float = 80.0
    memory_min_mb: float = 500.0


@dataclass(frozen=True, kw_only=True)
class Environment:
    name: str = internal()
    listen: int | str = required()
    ports: dict[str, int] = required()
    builds: str = required()
    exec: str = required()
    host: str = "127.0.0.1"
    environment: dict[str, str] = field(default_factory=dict)
    environment_file: str = ""
    user: str = ""
    ready_marker: str = ""
    drain: float = 10.0
    watch: float = 10.0
    standby: float = 600.0
    pre_switch: str = ""
    post_switch: str = ""
    hook_timeout: float = 300.0
    control_group: str = ""
    health: Health = required()
    unit: UnitSettings = field(default_factory=UnitSettings)
    router: Router = field(default_factory=Router)
    analysis: Analysis = field(default_factory=Analysis)
    canary: Canary = field(default_factory=Canary)
    checks: Checks = field(default_factory=Checks)

    def port(self, color: Color) -> int:
        return self.ports[color.value]

    @property
    def listen_address(self) -> str:
        """The socket unit's ListenStream= value."""
        return str(self.listen)

    @property
    def listen_port(self) -> int:
        return int(str(self.listen).rsplit(":", 1)[-1])

    @property
    def mode(self) -> Mode:
        return Mode(self.router.mode)

    @property
    def standby_applied(self) -> float:
        """Direct mode keeps no standby: a running old color would keep its keep-alive
        clients (they are never re-steered), so it retires at T0 + max(drain, watch)."""
        return 0.0 if self.mode is Mode.direct else self.standby

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(address, port) of the router's metrics listener (IPv6 unbracketed); None: off."""
        split = split_address(self.router.metrics)
        return (split[0].strip("[]"), split[1]) if split else None


@dataclass(frozen=True, kw_only=True)
class Config:
    path: str = internal()
    app: str = required()
    state_dir: str = "/var/lib/alive-switch"
    router_exec: str = "/usr/local/bin/alive-switch-router"
    env: dict[str, Environment] = required()

    def environment(self, name: str) -> Environment:
        if name not in self.env:
            known = ", ".join(sorted(self.env)) or "none"
            raise ConfigError(self.path, f"env.{name}", f"no environment {name!r} "
                              f"(configured: {known})", _nearest_hint(name, list(self.env))
                              or f"add an [env.{name}] table or pick one of: {known}")
        return self.env[name]

    def unit_prefix(self, env: Environment) -> str:
        return f"{self.app}-{env.name}"

    def env_dir(self, env: Environment) -> Path:
        return Path(self.state_dir) / self.unit_prefix(env)


# ---------------------------------------------------------------- loading

def config_path(explicit: str | None) -> str:
    return explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str, *, check_owner: bool = True) -> Config:
    """Parse and validate; raises ConfigError naming the file, the key and the fix."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file",
                          f"create it (alive-switch init ENV …) or pass --config / "
                          f"{ENV_VAR}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read: {exc}", "check the path and its permissions"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}", "fix the syntax") from None
    if check_owner:
        _check_owner(p)
    envs_raw = raw.pop("env", None)
    if not isinstance(envs_raw, dict) or not envs_raw:
        raise ConfigError(path, "env", "missing required table",
                          "add at least one [env.NAME] table")
    envs = {name: _load_env(path, name, body) for name, body in envs_raw.items()}
    cfg = _load_table(Config, raw, path, "", {"path": path, "env": envs})
    _validate_config(cfg)
    return cfg


def _load_env(path: str, name: str, body: Any) -> Environment:
    key = f"env.{name}"
    if not isinstance(body, dict):
        raise ConfigError(path, key, "expected a table", f"write it as [env.{name}]")
    if not UNIT_NAME_PART.match(name):
        raise ConfigError(path, key, f"environment name {name!r} is not a valid unit-name part",
                          "use letters, digits, '_', '.', '-' (starting with a letter/digit)")
    body = dict(body)
    subs: dict[str, Any] = {"name": name}
    for sub, cls in (("health", Health), ("unit", UnitSettings), ("router", Router),
                     ("analysis", Analysis), ("canary", Canary), ("checks", Checks)):
        if sub in body:
            if not isinstance(body[sub], dict):
                raise ConfigError(path, f"{key}.{sub}", "expected a table",
                                  f"write it as [{key}.{sub}]")
            subs[sub] = _load_table(cls, body.pop(sub), path, f"{key}.{sub}", {})
    env = _load_table(Environment, body, path, key, subs)
    _validate_env(path, env)
    return env


T = TypeVar("T")


def _load_table(cls: type[T], raw: dict[str, Any], path: str, prefix: str,
                given: dict[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if not f.metadata.get(INTERNAL)}
    hints = get_type_hints(cls)
    for key in raw:
        if key not in fields:
            valid = list(fields)
            raise ConfigError(path, _join(prefix, key), "unknown key",
                              _nearest_hint(key, valid) or f"valid keys: {', '.join(valid)}")
    values: dict[str, Any] = dict(given)
    for name, f in fields.items():
        if name in given:
            continue
        if name not in raw:
            if f.metadata.get(REQUIRED):
                raise ConfigError(path, _join(prefix, name), "missing required key",
                                  f"set {name} = … (see examples/alive-switch.toml)")
            continue
        values[name] = _coerce(raw[name], hints[name], path, _join(prefix, name))
    missing = [n for n, f in fields.items() if f.metadata.get(REQUIRED) and n not in values]
    if missing:
        raise ConfigError(path, _join(prefix, missing[0]), "missing required key",
                          f"add [{_join(prefix, missing[0])}] (see examples/alive-switch.toml)")
    return cls(**values)


def _coerce(value: Any, hint: Any, path: str, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _coerce(value, option, path, key)
            except ConfigError:
                continue
        raise ConfigError(path, key, f"bad value {value!r}", f"expected {_type_name(hint)}")
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(path, key, f"expected a list, got {value!r}", "write [ … ]")
        return [_coerce(v, item, path, key) for v in value]
    if origin is dict:
        _, item = get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(path, key, f"expected a table, got {value!r}", "write { k = v }")
        return {str(k): _coerce(v, item, path, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str) and type(value) is hint:
        return value
    raise ConfigError(path, key, f"expected {_type_name(hint)}, got {value!r}",
                      f"write a {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)).replace("float", "number")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _nearest_hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def _check_owner(p: Path) -> None:
    for target in (p, p.resolve().parent):
        st = target.stat()
        if st.st_uid != 0:
            raise ConfigError(str(p), "", f"{target} is owned by uid {st.st_uid}, not root",
                              f"chown root {target}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(str(p), "", f"{target} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):o})", f"chmod go-w {target}")


# ---------------------------------------------------------------- validation

def _validate_config(cfg: Config) -> None:
    path = cfg.path
    if not UNIT_NAME_PART.match(cfg.app) or "@" in cfg.app:
        raise ConfigError(path, "app", f"{cfg.app!r} is not a valid unit-name part",
                          "use letters, digits, '_', '.', '-' (starting with a letter/digit)")
    for key in ("state_dir", "router_exec"):
        value = getattr(cfg, key)
        if not value.startswith("/"):
            default = Config.__dataclass_fields__[key].default
            raise ConfigError(path, key, f"{value!r} is not an absolute path",
                              f"write an absolute path, e.g. {default}")
        _no_control(path, key, value)
        _no_specifier(path, key, value)
    _validate_distinct_ports(cfg)


def _validate_distinct_ports(cfg: Config) -> None:
    """No two environments share a port (within one, _validate_ports and _validate_metrics
    have already compared addresses)."""
    seen: dict[int, tuple[str, str]] = {}
    for env in cfg.env.values():
        metrics = split_address(env.router.metrics)
        for label, port in (("listen", env.listen_port), ("ports.blue", env.port(Color.blue)),
                            ("ports.green", env.port(Color.green)),
                            *((("router.metrics", metrics[1]),) if metrics else ())):
            owner, where = seen.get(port, (env.name, ""))
            if owner != env.name:
                raise ConfigError(cfg.path, f"env.{env.name}.{label}",
                                  f"port {port} is also used by {where}",
                                  "give every environment its own ports")
            seen.setdefault(port, (env.name, f"env.{env.name}.{label}"))


def _validate_env(path: str, env: Environment) -> None:
    key = f"env.{env.name}"
    _validate_ports(path, key, env)
    for name in ("builds",):
        value = getattr(env, name)
        if not value.startswith("/"):
            raise ConfigError(path, f"{key}.{name}", f"{value!r} is not an absolute path",
                              "write an absolute path, e.g. /srv/alive/builds/production")
    _validate_exec(path, f"{key}.exec", env.exec)
    if not env.health.path.startswith("/"):
        raise ConfigError(path, f"{key}.health.path", f"{env.health.path!r} does not start "
                          "with '/'", f"write e.g. \"/{env.health.path.lstrip('/')}\"")
    _validate_positive(path, key, env)
    _validate_analysis(path, f"{key}.analysis", env.analysis)
    if problem := canary_problem(env.canary.steps, env.canary.step_seconds):
        raise ConfigError(path, f"{key}.canary", *problem)
    if env.router.metrics:
        _validate_metrics(path, f"{key}.router.metrics", env)
    _validate_enums(path, key, env)
    if env.mode is Mode.direct:
        _validate_direct(path, key, env)
    _validate_strings(path, key, env)
    if env.environment_file:
        _validate_secret_file(path, f"{key}.environment_file", env.environment_file)


def _validate_ports(path: str, key: str, env: Environment) -> None:
    if set(env.ports) != {"blue", "green"}:
        raise ConfigError(path, f"{key}.ports", f"expected exactly blue and green, got "
                          f"{sorted(env.ports)}", "write ports = { blue = 9001, green = 9002 }")
    listen = str(env.listen)
    if isinstance(env.listen, str):
        _validate_listen(path, f"{key}.listen", listen)
    for label, port in (("listen", env.listen_port), ("ports.blue", env.port(Color.blue)),
                        ("ports.green", env.port(Color.green))):
        if not 1 <= port <= 65535:
            raise ConfigError(path, f"{key}.{label}", f"port {port} is outside 1–65535",
                              "pick a port between 1 and 65535")
    if env.port(Color.blue) == env.port(Color.green):
        raise ConfigError(path, f"{key}.ports", f"blue and green share port "
                          f"{env.port(Color.blue)}", "give each color its own port")
    if env.listen_port in env.ports.values():
        raise ConfigError(path, f"{key}.ports", f"a color uses the public port "
                          f"{env.listen_port}", "colors need internal ports of their own")
    try:
        ipaddress.ip_address(env.host)
    except ValueError:
        raise ConfigError(path, f"{key}.host", f"{env.host!r} is not an IP address",
                          "write e.g. \"127.0.0.1\"") from None


def _validate_listen(path: str, key: str, listen: str) -> None:
    split = split_address(listen)
    if split is None:
        raise ConfigError(path, key, f"{listen!r} is not a port or ADDR:PORT",
                          "write 9000, \"127.0.0.1:9000\" or \"[::1]:9000\"")
    try:
        ipaddress.ip_address(split[0].strip("[]"))
    except ValueError:
        raise ConfigError(path, key, f"{split[0]!r} is not an IP address",
                          "write e.g. \"127.0.0.1:9000\"") from None


def split_address(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9000"`` / ``"[::1]:9000"`` → (address, port); None when not that shape."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d{1,5})", value)
    return (match.group(1), int(match.group(2))) if match else None


def _validate_metrics(path: str, key: str, env: Environment) -> None:
    value = env.router.metrics
    split = split_address(value)
    if split is None:
        raise ConfigError(path, key, f"{value!r} is not ADDR:PORT",
                          "write e.g. \"127.0.0.1:9100\" or \"[::1]:9100\", or \"\" for no "
                          "metrics listener")
    address, port = split
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ConfigError(path, key, f"{address!r} in {value!r} is not an IP address",
                          "write e.g. \"127.0.0.1:9100\"") from None
    if (ip.version == 6) != address.startswith("["):
        raise ConfigError(path, key, f"{address!r} in {value!r}: an IPv6 address goes in "
                          "brackets, an IPv4 one without", "write e.g. \"127.0.0.1:9100\" or "
                          "\"[::1]:9100\"")
    if not 1 <= port <= 65535:
        raise ConfigError(path, key, f"port {port} in {value!r} is outside 1–65535",
                          "pick a port between 1 and 65535")
    for label, taken in _ports_of(env):
        if taken[1] == port and _overlap(ip, taken[0]):
            raise ConfigError(path, key, f"{value!r} is also env.{env.name}.{label} "
                              f"({taken[0]} port {port})", "give the metrics listener a port "
                              "of its own: the router serves the public port, the colors theirs")


def _ports_of(env: Environment) -> list[tuple[str, tuple[Address, int]]]:
    """The listeners the environment already has: the public socket (a bare port listens
    on every address) and the two colors on ``host``."""
    listen = split_address(str(env.listen))
    public = ipaddress.ip_address(listen[0].strip("[]")) if listen else ipaddress.ip_address("::")
    colors = ipaddress.ip_address(env.host)
    return [("listen", (public, env.listen_port)),
            *((f"ports.{c.value}", (colors, env.port(c))) for c in Color)]


def _overlap(a: Address, b: Address) -> bool:
    """Whether listeners on ``a`` and ``b`` (same port) would clash: the same address, or
    a wildcard that covers the other (``::`` is dual-stack, as systemd binds it)."""
    return a == b or _covers(a, b) or _covers(b, a)


def _covers(wildcard: Address, other: Address) -> bool:
    return wildcard.is_unspecified and (wildcard.version == 6 or other.version == 4)


def _validate_analysis(path: str, key: str, analysis: Analysis) -> None:
    rules = (
        ("max_error_rate", 0 <= analysis.max_error_rate <= 1, "is outside 0–1",
         "write a share of the answers, e.g. 0.02 for 2 percentage points"),
        ("min_requests", analysis.min_requests >= 1, "is below 1",
         "write a whole number of answers, e.g. 50"),
        ("baseline", 0 < analysis.baseline <= FIGURES_RING_SECONDS,
         f"is outside (0, {FIGURES_RING_SECONDS}] seconds",
         f"the router keeps the last {FIGURES_RING_SECONDS} s of figures: write e.g. 60"),
        ("max_latency_ratio", analysis.max_latency_ratio >= 0, "is negative",
         "write 0 (off) or a ratio such as 3"),
    )
    for name, ok, problem, fix in rules:
        if not ok:
            raise ConfigError(path, f"{key}.{name}", f"{getattr(analysis, name)!r} {problem}",
                              fix)


def _validate_exec(path: str, key: str, value: str) -> None:
    _no_control(path, key, value)
    if value.rstrip().endswith("\\"):
        raise ConfigError(path, key, f"{value!r} ends in a backslash",
                          "remove it: systemd would join the next unit line to the command")
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ConfigError(path, key, f"cannot split {value!r}: {exc}", "balance the quotes"
                          ) from None
    if not words:
        raise ConfigError(path, key, "empty command", "write e.g. \"/usr/bin/node server.js\"")
    first = words[0]
    if first[0] in EXEC_PREFIXES:
        raise ConfigError(path, key, f"{first!r} carries a systemd prefix ({first[0]!r})",
                          "remove the prefix: alive-switch decides how the color runs")
    if not first.startswith("/"):
        raise ConfigError(path, key, f"{first!r} is not an absolute path",
                          f"write the full path, e.g. /usr/bin/{first}")


def _validate_positive(path: str, key: str, env: Environment) -> None:
    checks: list[tuple[str, float]] = [
        ("health.timeout", env.health.timeout), ("health.interval", env.health.interval),
        ("hook_timeout", env.hook_timeout), ("drain", env.drain), ("watch", env.watch),
        ("unit.start_timeout", env.unit.start_timeout),
        ("unit.stop_timeout", env.unit.stop_timeout),
        ("unit.restart_sec", env.unit.restart_sec),
        ("unit.start_limit_burst", env.unit.start_limit_burst),
        ("unit.start_limit_interval", env.unit.start_limit_interval),
        ("router.backlog", env.router.backlog), ("router.processes", env.router.processes),
        ("router.max_connections", env.router.max_connections),
        ("router.restart_drain", env.router.restart_drain),
        ("router.header_timeout", env.router.header_timeout),
        ("router.idle_timeout", env.router.idle_timeout),
        ("router.max_header_bytes", env.router.max_header_bytes),
        ("router.body_timeout", env.router.body_timeout),
        ("router.response_timeout", env.router.response_timeout),
        ("router.pool_idle", env.router.pool_idle),
    ]
    for name, value in checks:
        if value <= 0:
            raise ConfigError(path, f"{key}.{name}", f"{value!r} must be greater than 0",
                              "use a positive number")
    if env.router.pool_size < 0:
        raise ConfigError(path, f"{key}.router.pool_size", f"{env.router.pool_size!r} is "
                          "negative", "use 0 (no idle connections kept) or a positive number, "
                          "e.g. 64")
    if env.router.processes != 1:
        raise ConfigError(path, f"{key}.router.processes", f"{env.router.processes} router "
                          "processes are not supported yet (one process serves the socket)",
                          "remove the key or set processes = 1")
    if env.standby < 0:
        raise ConfigError(path, f"{key}.standby", f"{env.standby!r} is negative",
                          "use 0 (retire when the watch ends) or a positive number of seconds")
    for name, value in (("checks.disk_max_percent", env.checks.disk_max_percent),
                        ("checks.memory_min_mb", env.checks.memory_min_mb)):
        if value < 0 or (name.endswith("percent") and value > 100):
            raise ConfigError(path, f"{key}.{name}", f"{value!r} is out of range",
                              "use 0–100 for a percentage, ≥ 0 for megabytes")


def _validate_enums(path: str, key: str, env: Environment) -> None:
    for name, value, allowed in (("router.mode", env.router.mode, [m.value for m in Mode]),
                                 ("unit.hardening", env.unit.hardening, ["default", "strict"])):
        if value not in allowed:
            raise ConfigError(path, f"{key}.{name}", f"{value!r} is not one of {allowed}",
                              _nearest_hint(value, allowed) or f"use one of {allowed}")
    status = env.health.expect_status
    if isinstance(status, str) and not re.fullmatch(r"[1-5]xx", status):
        raise ConfigError(path, f"{key}.health.expect_status", f"{status!r} is not like '2xx'",
                          "write \"2xx\" or a list of codes such as [200, 204]")
    if isinstance(status, list) and not all(100 <= c <= 599 for c in status):
        raise ConfigError(path, f"{key}.health.expect_status", f"{status!r} has a code "
                          "outside 100–599", "list HTTP status codes, e.g. [200, 204]")
    for proxy in env.router.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(path, f"{key}.router.trusted_proxies", f"{proxy!r} is not an "
                              "address or network", "write e.g. [\"10.0.0.1\", \"192.168.0.0/16\"]"
                              ) from None
    for tunnel in env.router.tunnels:
        if tunnel.lower() == "h2c" or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", tunnel):
            raise ConfigError(path, f"{key}.router.tunnels", f"{tunnel!r} cannot be tunnelled",
                              "list Upgrade protocols such as \"websocket\", or \"connect\" to "
                              "allow CONNECT (h2c never: it would bypass every request rule)")


DIRECT_NO_CANARY = ("direct mode cannot send a share of clients to the new color (the "
                    "kernel steers every new connection to one listener)")
DIRECT_NO_CANARY_FIX = 'use mode = "http" or "tcp" for canary steps, or deploy without them'


def _validate_direct(path: str, key: str, env: Environment) -> None:
    """The kernel can steer only connections the colors' own listeners would accept; and
    it steers all of them to one color, so no canary."""
    if env.canary.steps:
        raise ConfigError(path, f"{key}.canary.steps", f"{env.canary.steps!r}: "
                          f"{DIRECT_NO_CANARY}", DIRECT_NO_CANARY_FIX)
    public = env.listen_address.rpartition(":")[0] if ":" in env.listen_address else ""
    if steered_address(public, env.host) is None:
        raise ConfigError(path, f"{key}.router.mode", f"direct mode cannot steer connections "
                          f"for {env.listen_address} to colors bound to {env.host}",
                          f"listen on {env.host} (or a wildcard address), or use "
                          'mode = "tcp"')


def _validate_strings(path: str, key: str, env: Environment) -> None:
    for name, value in env.environment.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(path, f"{key}.environment.{name}", "not a valid variable name",
                              "use letters, digits and '_' (not starting with a digit)")
        _no_control(path, f"{key}.environment.{name}", value)
    for name in ("user", "control_group"):
        value = getattr(env, name)
        if value and not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", value):
            raise ConfigError(path, f"{key}.{name}", f"{value!r} is not a valid user/group name",
                              "use a system user/group name such as \"www-data\"")
    for name in ("health.path", "health.expect_body", "ready_marker", "pre_switch",
                 "post_switch", "environment_file", "host"):
        obj: Any = env
        for part in name.split("."):
            obj = getattr(obj, part)
        _no_control(path, f"{key}.{name}", str(obj))
    if env.ready_marker and ("/" in env.ready_marker or env.ready_marker in (".", "..")):
        raise ConfigError(path, f"{key}.ready_marker", f"{env.ready_marker!r} is not a file "
                          "name", "name a file at the top of each build, e.g. \"READY\"")
    for hook in ("pre_switch", "post_switch"):
        value = getattr(env, hook)
        if value:
            _validate_exec(path, f"{key}.{hook}", value)


def _validate_secret_file(path: str, key: str, value: str) -> None:
    _no_control(path, key, value)
    if not value.startswith("/"):
        raise ConfigError(path, key, f"{value!r} is not an absolute path",
                          "write an absolute path such as /etc/alive-switch/production.env")
    try:
        st = os.stat(value)
    except OSError as exc:
        raise ConfigError(path, key, f"cannot stat {value!r}: {exc.strerror}",
                          "create it (root-owned, mode 0600) or leave environment_file empty"
                          ) from None
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
        raise ConfigError(path, key, f"{value} is owned by uid {st.st_uid} with mode "
                          f"{stat.S_IMODE(st.st_mode):o}; secrets need root and 0600",
                          f"chown root {value} && chmod 600 {value}")


def _no_control(path: str, key: str, value: str) -> None:
    if CONTROL_CHARS.search(value):
        raise ConfigError(path, key, f"{value!r} contains a newline or control character",
                          "remove it: unit files are line-based")


def _no_specifier(path: str, key: str, value: str) -> None:
    if "%" in value:
        raise ConfigError(path, key, f"{value!r} contains '%'",
                          "systemd would read it as a specifier; pick a path without '%'")
