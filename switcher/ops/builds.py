"""Which build a deploy means: BUILD is one path component inside ``builds`` or an absolute
path whose realpath is a direct child of it; by default the newest deployable build (mtime,
ties by natural sort of the name)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from switcher.config import Environment
from switcher.errors import UsageError


@dataclass(frozen=True)
class Build:
    name: str
    path: Path


def resolve(env: Environment, arg: str | None) -> Build:
    root = Path(env.builds)
    if not root.is_dir():
        raise UsageError(f"builds directory {root} does not exist",
                         f"create it and put builds in it, or fix env.{env.name}.builds")
    if arg is None:
        return newest(env)
    return _named(env, root, arg)


def _named(env: Environment, root: Path, arg: str) -> Build:
    if arg.startswith("/"):
        real = Path(os.path.realpath(arg))
        if real.parent != Path(os.path.realpath(root)):
            raise UsageError(f"build {arg!r} is not a direct child of {root} "
                             f"(it resolves to {real})",
                             f"copy it into {root}/ and deploy it by name")
        name = real.name
    else:
        if "/" in arg or arg in (".", "..", "") or "\x00" in arg:
            raise UsageError(f"build {arg!r} is not a single name inside {root}",
                             f"pass a directory name from {root} (see: ls {root})")
        name = arg
    path = root / name
    real = _check_build(env, root, path, arg)
    # Pin the real directory: a link such as `latest` moves, and a color restarted later
    # must run what passed its health gate.
    return Build(real.name, root / real.name)


def _check_build(env: Environment, root: Path, path: Path, arg: str) -> Path:
    if not path.exists():
        raise UsageError(f"build {arg!r} not found in {root}", f"see: ls {root}")
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(root)):
        raise UsageError(f"build {arg!r} is a link that escapes {root} (to {real})",
                         f"deploy a directory inside {root}")
    if not real.is_dir():
        raise UsageError(f"build {arg!r} in {root} is not a directory",
                         "a build is a directory holding the app")
    if env.ready_marker and not (real / env.ready_marker).exists():
        raise UsageError(f"build {arg!r} has no ready marker {env.ready_marker!r}",
                         f"finish the build (touch {path}/{env.ready_marker}) or pick another")
    return real


def deployable(env: Environment) -> list[Build]:
    root = Path(env.builds)
    found = {}
    for entry in os.scandir(root):
        real = Path(os.path.realpath(entry.path))
        if real.parent != Path(os.path.realpath(root)) or not real.is_dir():
            continue
        if env.ready_marker and not (real / env.ready_marker).exists():
            continue
        found[real.name] = Build(real.name, root / real.name)  # links count as their target
    return list(found.values())


def newest(env: Environment) -> Build:
    candidates = deployable(env)
    if not candidates:
        marker = f" with {env.ready_marker!r}" if env.ready_marker else ""
        raise UsageError(f"no deployable build{marker} in {env.builds}",
                         "put a build directory there, or name one")
    return max(candidates, key=lambda b: (b.path.stat().st_mtime, natural_key(b.name)))


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)
