"""What direct mode needs from the host: each missing piece named, the bpf(2) probe real."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from switcher import steerprobe
from switcher.errors import UsageError
from switcher.model import Color
from switcher.ops import checks, install
from switcher.steerprobe import Cap
from tests.fakes import FakeSystemd
from tests.unit.opskit import write_config

ALL = set(Cap)


def test_the_effective_mask_is_read_bit_by_bit() -> None:
    assert steerprobe.effective("Name:\tx\nCapEff:\t000001ffffffffff\n") == ALL
    assert steerprobe.effective("CapEff:\t0000000000001000\n") == {Cap.net_admin}
    assert steerprobe.effective("CapEff:\t0000000000000000\n") == set()


@pytest.mark.parametrize(("caps", "scope", "named"), [
    (ALL - {Cap.bpf, Cap.sys_admin}, 0, "CAP_BPF"),
    (ALL - {Cap.net_admin, Cap.sys_admin}, 1, "CAP_NET_ADMIN"),
    (ALL, 3, "Yama ptrace_scope = 3"),
    (ALL - {Cap.sys_ptrace}, 1, "CAP_SYS_PTRACE"),
])
def test_each_missing_piece_is_named(caps: set[Cap], scope: int, named: str) -> None:
    found = steerprobe.missing(caps, scope)
    assert len(found) == 1 and named in found[0]


def test_cap_sys_admin_stands_in_for_bpf_and_net_admin() -> None:
    assert steerprobe.missing({Cap.sys_admin, Cap.sys_ptrace}, 2) == []


def test_without_yama_the_scope_is_classic(tmp_path: Path) -> None:
    assert steerprobe.ptrace_scope(tmp_path / "absent") == 0
    (tmp_path / "scope").write_text("3\n")
    assert steerprobe.ptrace_scope(tmp_path / "scope") == 3


def test_as_root_here_nothing_is_missing_and_a_program_loads_and_attaches() -> None:
    assert steerprobe.problems() == []


def test_negative_control_an_unprivileged_user_lacks_it_all() -> None:
    code = "import json; from switcher import steerprobe; print(json.dumps(steerprobe.problems()))"
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[2])
    found = json.loads(done.stdout)
    assert any("CAP_BPF" in p for p in found) and any("CAP_NET_ADMIN" in p for p in found)


DIRECT = '[env.prod.router]\nmode = "direct"'


def test_check_passes_outside_direct_mode_without_probing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steerprobe, "problems", lambda: pytest.fail("probed"))
    cfg = write_config(tmp_path)
    subject = checks.Subject(cfg.app, cfg.env["prod"], FakeSystemd(), Color.blue, None,
                             tmp_path)
    assert checks.direct_mode(subject).level is checks.Level.ok


def test_check_and_install_name_what_is_missing_and_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steerprobe, "problems", lambda: ["CAP_BPF (or CAP_SYS_ADMIN): x"])
    cfg = write_config(tmp_path, extra=DIRECT)
    env = cfg.env["prod"]
    check = checks.direct_mode(checks.Subject(cfg.app, env, FakeSystemd(), Color.blue, None,
                                              tmp_path))
    assert check.level is checks.Level.failed
    assert "CAP_BPF" in check.detail and 'router.mode = "tcp"' in check.detail
    with pytest.raises(UsageError, match=r"lacks CAP_BPF .*nothing was changed") as caught:
        install.install(cfg, env, FakeSystemd(), tmp_path / "units", rebind=False,
                        dry_run=True, say=print)
    assert 'mode = "tcp"' in caught.value.hint


def test_a_live_app_listening_with_a_smaller_backlog_is_a_warning(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, extra=DIRECT + "\nbacklog = 64")
    env = cfg.env["prod"]
    port = env.port(Color.green)
    subject = checks.Subject(cfg.app, env, FakeSystemd(), Color.blue, Color.green, tmp_path)
    for backlog, level in ((16, checks.Level.warning), (128, checks.Level.ok)):
        with socket.create_server(("127.0.0.1", port), backlog=backlog):
            check = checks.direct_backlog(subject)
        assert check.level is level, check
        assert f"backlog of {backlog}" in check.detail
