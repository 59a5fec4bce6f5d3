"""uninstall and logs (switcher/ops/uninstall.py, switcher/ops/logs.py).
tests/system/test_real_hosts.py proves the same against a real systemd."""

from __future__ import annotations

from pathlib import Path

from switcher import render, state
from switcher.lock import Lock
from switcher.model import Color
from switcher.ops import install, logs, uninstall
from tests.fakes import FakeSystemd
from tests.unit.opskit import write_config, write_config_path_free

# ---------------------------------------------------------------- uninstall and logs

def test_uninstall_removes_only_its_own_files_and_units(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    env = cfg.env["prod"]
    unit_dir = tmp_path / "units"
    install.write_units(render.render(cfg, env), unit_dir)
    (unit_dir / "lc-prod@blue.service.d/operator.conf").write_text("[Service]\nNice=5\n")
    (unit_dir / "other-prod.socket").write_text("# not ours\n")
    sd = FakeSystemd()
    for unit in ("lc-prod.socket", "lc-prod.service", "lc-prod@blue.service"):
        sd.start(unit)
        sd.enable(unit)
    cfg.env_dir(env).mkdir(parents=True)
    said: list[str] = []
    uninstall.uninstall(cfg, env, sd, unit_dir, purge=False, say=said.append,
                        lock=Lock(tmp_path / "l.lock", "uninstall"))
    stops = [unit for call, unit in sd.calls if call == "stop"]
    assert stops[0] == "lc-prod.socket", "the socket stops first"
    assert not any(sd.units[u].enabled for u in sd.units)
    assert sorted(p.relative_to(unit_dir).as_posix() for p in unit_dir.rglob("*")) == [
        "lc-prod@blue.service.d", "lc-prod@blue.service.d/operator.conf", "other-prod.socket"]
    assert any("kept" in line and "operator" not in line and ".d" in line for line in said)
    assert ("cancel", "lc-prod-retire-blue") in sd.calls
    assert state.read_history(cfg.env_dir(env))[-1]["kind"] == "uninstall"
    uninstall.uninstall(cfg, env, sd, unit_dir, purge=True, say=said.append,
                        lock=Lock(tmp_path / "l.lock", "uninstall"))
    assert not cfg.env_dir(env).exists()


def test_journal_argv() -> None:
    cfg = write_config_path_free()
    env = cfg.env["prod"]
    assert logs.journal_argv(cfg, env, None, follow=False, lines=None) == [
        "journalctl", "--unit=lc-prod.socket", "--unit=lc-prod.service",
        "--unit=lc-prod@blue.service", "--unit=lc-prod@green.service"]
    assert logs.journal_argv(cfg, env, Color.green, follow=True, lines=20) == [
        "journalctl", "--unit=lc-prod@green.service", "--lines=20", "--follow"]


