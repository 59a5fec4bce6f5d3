"""Build pruning (switcher/ops/prune.py). tests/system/test_real_hosts.py proves the same against a
real systemd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from switcher import state
from switcher.errors import NeedsRepairError
from switcher.lock import Lock
from switcher.model import Color, Pending, Phase, State
from switcher.ops import prune
from switcher.ops.prune import BuildDir, protected_builds, select_prunable
from tests.unit.opskit import BLUE, GREEN, LISTEN, write_config

# ---------------------------------------------------------------- prune

def test_prune_selection_keeps_the_newest_and_every_protected_build() -> None:
    found = [BuildDir(name, mtime) for name, mtime in
             (("b1", 1), ("b2", 2), ("b10", 2), ("b3", 3), ("live", 0), ("old", 0.5))]
    doomed, kept = select_prunable(found, 2, {"live": "live on blue (prod)"})
    assert [b.name for b in doomed] == ["old", "b1", "b2"], "oldest first; b10 > b2 at a tie"
    assert kept == {"b3": "among the newest", "b10": "among the newest",
                    "live": "live on blue (prod)"}
    doomed, kept = select_prunable(found, 0, {"live": "x", "b3": "y"})
    assert {b.name for b in doomed} == {"b1", "b2", "b10", "old"}
    assert select_prunable(found, 10, {})[0] == []


def test_protected_builds_name_live_standby_pending_and_links() -> None:
    current = State(active=Color.green, previous=Color.blue,
                    builds={Color.blue: "b1", Color.green: "b2"},
                    pending=Pending(Color.blue, Phase.start, "d", "b3"))
    why = protected_builds("prod", current, {Color.blue: "b3", Color.green: "b4"})
    assert set(why) == {"b1", "b2", "b3", "b4"}
    assert why["b2"] == "live on green (prod)"
    assert why["b1"] == "standby/previous on blue (prod)"
    assert why["b3"].startswith("pending deploy to blue")


def test_prune_never_removes_a_build_another_environment_uses(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, also=f"""
[env.stage]
listen = {LISTEN + 100}
ports = {{ blue = {BLUE + 100}, green = {GREEN + 100} }}
builds = "{tmp_path / 'builds'}"
exec = "/usr/bin/python3 server.py"
[env.stage.health]
path = "/h"
""")
    builds = tmp_path / "builds"
    for n, name in enumerate(("b1", "b2", "b3", "b4", "b5")):
        (builds / name).mkdir(parents=True, exist_ok=True)
        (builds / name / "data").write_bytes(b"x" * 10_000)
        os.utime(builds / name, (1000 + n, 1000 + n))
    (builds / "current").symlink_to(builds / "b1")  # a link inside builds is never pruned
    stage_dir = cfg.env_dir(cfg.env["stage"])
    stage_dir.mkdir(parents=True)
    state.save_state(stage_dir, State(active=Color.blue, builds={Color.blue: "current",
                                                                 Color.green: None}))
    said: list[str] = []
    result = prune.prune(cfg, cfg.env["prod"], 1, dry_run=False, say=said.append,
                             lock_for=lambda e, what: Lock(tmp_path / f"{e.name}.lock",
                                                                 what))
    assert sorted(p.name for p in builds.iterdir()) == ["b1", "b5", "current"]
    assert [name for name, _ in result.removed] == ["b2", "b3", "b4"]
    assert result.freed >= 30_000
    assert "kept b1: live on blue (stage), through current" in said
    assert said[-1].startswith(f"freed {result.freed} bytes")


def test_prune_dry_run_removes_nothing_and_refuses_unreadable_state(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    lock_for = lambda e, what: Lock(tmp_path / "l.lock", what)  # noqa: E731
    said: list[str] = []
    result = prune.prune(cfg, env, 0, dry_run=True, say=said.append, lock_for=lock_for)
    assert {name for name, _ in result.removed} == {"b1", "b2"}
    assert (tmp_path / "builds/b1").is_dir() and said[-1].startswith("would free")
    cfg.env_dir(env).mkdir(parents=True)
    (cfg.env_dir(env) / state.STATE).write_text("{not json")
    with pytest.raises(NeedsRepairError, match="nothing was pruned"):
        prune.prune(cfg, env, 0, dry_run=False, say=said.append, lock_for=lock_for)
    assert (tmp_path / "builds/b1").is_dir()


