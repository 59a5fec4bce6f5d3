"""``prune ENV --keep N``: remove old build directories. The N newest (by mtime) stay, and
so does every build that state or a color link names, in any environment sharing the builds
directory (live, standby/previous, pending, linked).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from switcher import state
from switcher.config import Config, Environment
from switcher.errors import NeedsRepairError, UsageError
from switcher.lock import Lock
from switcher.model import Color, State
from switcher.ops.builds import natural_key

Say = Callable[[str], None]
LockFor = Callable[[Environment, str], Lock]


@dataclass(frozen=True)
class BuildDir:
    name: str
    mtime: float


@dataclass
class PruneResult:
    removed: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes)
    kept: dict[str, str] = field(default_factory=dict)  # name -> why

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


def select_prunable(found: list[BuildDir], keep: int, protected: dict[str, str]
                    ) -> tuple[list[BuildDir], dict[str, str]]:
    """Pure: the builds to remove (oldest first) and why each other one stays.

    The ``keep`` newest stay (by mtime, ties by natural sort of the name, as "the newest
    build" is chosen), and so does every protected one, whatever its age."""
    newest_first = sorted(found, key=lambda b: (b.mtime, natural_key(b.name)), reverse=True)
    kept = {b.name: "among the newest" for b in newest_first[:keep]}
    doomed = []
    for build in newest_first[keep:]:
        if build.name in protected:
            kept[build.name] = protected[build.name]
        else:
            doomed.append(build)
    return doomed[::-1], kept


def protected_builds(env_name: str, current: State, links: dict[Color, str | None]
                     ) -> dict[str, str]:
    """Pure: the builds one environment's state and color links name, with why."""
    why: dict[str, str] = {}
    if current.pending is not None and current.pending.build:
        why[current.pending.build] = f"pending deploy to {current.pending.target} ({env_name})"
    for color in Color:
        build = current.builds.get(color)
        if build:
            role = ("live" if color == current.active
                    else "standby/previous" if color == current.previous
                    else "recorded")
            why.setdefault(build, f"{role} on {color} ({env_name})")
        link = links.get(color)
        if link:
            why.setdefault(link, f"{color}'s link points at it ({env_name})")
    return why


def prune(cfg: Config, env: Environment, keep: int, *, dry_run: bool, lock_for: LockFor,
          say: Say) -> PruneResult:
    if keep < 0:
        raise UsageError(f"--keep {keep} is negative", "keep 0 or more builds")
    root = Path(env.builds)
    sharing = [e for e in cfg.env.values() if _same_dir(e.builds, env.builds)]
    with _locked([lock_for(e, f"prune {env.name}") for e in sharing]):
        protected: dict[str, str] = {}
        for other in sharing:
            protected.update(_protected_in(cfg, other, root))
        found = [BuildDir(e.name, e.stat(follow_symlinks=False).st_mtime)
                 for e in os.scandir(root)
                 if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        doomed, kept = select_prunable(found, keep, protected)
        result = PruneResult(kept=kept)
        for build in doomed:
            path = root / build.name
            size = disk_usage(path)
            if not dry_run:
                shutil.rmtree(path)
            result.removed.append((build.name, size))
    verb = "would remove" if dry_run else "removed"
    for name, size in result.removed:
        say(f"{verb} {root / name} ({_human(size)})")
    for name, why in sorted(kept.items()):
        if why != "among the newest":
            say(f"kept {name}: {why}")
    say(f"{'would free' if dry_run else 'freed'} {result.freed} bytes ({_human(result.freed)}); "
        f"{len(result.removed)} removed, {len(kept)} kept ({min(keep, len(found))} newest)")
    return result


def _protected_in(cfg: Config, env: Environment, root: Path) -> dict[str, str]:
    env_dir = cfg.env_dir(env)
    try:
        current = state.load_state(env_dir)
    except state.UNREADABLE as exc:
        raise NeedsRepairError(
            f"{env_dir / state.STATE} is unreadable ({exc}): cannot tell which builds are "
            "live, so nothing was pruned", f"run `alive-switch repair {env.name}`") from None
    links = {}
    for color in Color:
        link = state.color_link(env_dir, color)
        links[color] = Path(os.readlink(link)).name if link.is_symlink() else None
    why = protected_builds(env.name, current, links)
    # A protected name that is itself a link inside `builds` protects its target too.
    for name, reason in list(why.items()):
        real = Path(os.path.realpath(root / name))
        if real.parent == Path(os.path.realpath(root)) and real.name != name:
            why.setdefault(real.name, f"{reason}, through {name}")
    return why


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def _locked(locks: list[Lock]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        yield


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (what removing it frees), each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(directory, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    with contextlib.suppress(OSError):
        total += os.lstat(path).st_blocks * 512
    return total


def _human(size: int) -> str:
    value, unit = float(size), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
