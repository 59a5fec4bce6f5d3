"""Durable files of one environment, under ``<state_dir>/<app>-<env>/``.

- ``state.json`` (+ ``state.json.prev``, the last good copy): see :mod:`switcher.model`.
- ``history.jsonl``: one JSON object per deploy/rollback/retire, appended.
- ``router.json``: the router's settings, written by ``install``.
- ``blue``/``green``: symlinks to the build each color runs (its WorkingDirectory).
- ``blue.env``/``green.env``: per-color environment for the unit (PORT, HOST, BUILD).
- ``takeover/``: the legacy unit's backup, and ``takeover/intent.json`` while a takeover
  runs (see :mod:`switcher.ops.takeover`).

Every write goes temp file → fsync → rename → fsync of the directory, so a crash leaves
either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from switcher.model import Color, RouterSettings, State

STATE = "state.json"
STATE_PREV = "state.json.prev"
HISTORY = "history.jsonl"
ROUTER_SETTINGS = "router.json"
TAKEOVER = "takeover"  # the legacy unit's backup
TAKEOVER_INTENT = f"{TAKEOVER}/intent.json"  # a takeover between its backup and its end
CANARY_ORDER = "canary-order.json"  # promote/abort, for the deploy running a canary
# What reading a damaged or foreign state file raises (load_state): one tuple for every reader.
UNREADABLE = (OSError, ValueError, KeyError, TypeError)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def symlink_atomic(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.lnk")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def read_json(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_bytes())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def load_state(env_dir: Path) -> State:
    """Read ``state.json``; raises OSError/ValueError/KeyError/TypeError when unreadable."""
    path = env_dir / STATE
    if not path.exists():
        return State()
    return State.from_json(read_json(path))


def load_state_lenient(env_dir: Path) -> tuple[State, str]:
    """The router's view: ``state.json``, else ``.prev``, else empty. Returns (state, source)."""
    for name in (STATE, STATE_PREV):
        try:
            return State.from_json(read_json(env_dir / name)), name
        except FileNotFoundError:
            continue
        except UNREADABLE:
            continue
    return State(), "none"


def save_state(env_dir: Path, state: State) -> None:
    """Write ``state.json``, keeping the current good copy as ``.prev`` first."""
    current = env_dir / STATE
    with contextlib.suppress(FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        State.from_json(read_json(current))  # only a parseable file becomes .prev
        write_atomic(env_dir / STATE_PREV, current.read_bytes())
    write_atomic(current, (json.dumps(state.to_json(), indent=2) + "\n").encode())


def append_history(env_dir: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(env_dir / HISTORY, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_history(env_dir: Path) -> list[dict[str, Any]]:
    path = env_dir / HISTORY
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def load_router_settings(env_dir: Path) -> RouterSettings:
    return RouterSettings.from_json(read_json(env_dir / ROUTER_SETTINGS))


def save_router_settings(env_dir: Path, settings: RouterSettings) -> bool:
    """Write ``router.json``; returns whether it changed."""
    data = (json.dumps(settings.to_json(), indent=2, sort_keys=True) + "\n").encode()
    path = env_dir / ROUTER_SETTINGS
    if path.exists() and path.read_bytes() == data:
        return False
    write_atomic(path, data)
    return True


def color_link(env_dir: Path, color: Color) -> Path:
    return env_dir / color.value
