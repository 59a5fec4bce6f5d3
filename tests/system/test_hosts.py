"""The fleet tests' hosts (hosts.py): isolated from each other and from the machine, and
undone after a test process that died with them running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.conftest import check_host
from tests.system.harness import ROOT, wait_for
from tests.system.hosts import CGROUP_HIERARCHIES, PREFIX, Fleet
from tests.system.sandbox import Sandbox

pytestmark = pytest.mark.system
ORPHAN = """\
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.system.hosts import Fleet
fleet = Fleet(Path({fleet!r}), names=("k1", "k2")).boot()
print(json.dumps([host.pid for host in fleet.hosts.values()]), flush=True)
time.sleep(600)
"""


def bound(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_hosts_have_their_own_files_cgroups_and_loopback(tmp_path: Path) -> None:
    check_host()
    with Fleet(tmp_path / "fleet", names=("i1", "i2")) as fleet:
        i1, i2 = fleet["i1"], fleet["i2"]
        i1.run("sh", "-c", "echo i1 > /etc/fleet-marker && echo i1 > /tmp/fleet-marker",
               check=True)
        assert not i2.path("/etc/fleet-marker").exists()
        assert not i2.path("/tmp/fleet-marker").exists()
        assert not Path("/etc/fleet-marker").exists()
        for host in (i1, i2):
            assert f"0::/{PREFIX}-{host.name}/init.scope" in Path(
                f"/proc/{host.pid}/cgroup").read_text()
        # Both bind 127.0.0.1:9000 at once: each its own loopback.
        sockets = [host.call(bound, 9000) for host in (i1, i2)]
        for sock in sockets:
            sock.close()
        assert fleet.ssh("i2", "cat /etc/hostname >/dev/null && echo reached").stdout == \
            "reached\n"
    for hierarchy in CGROUP_HIERARCHIES:
        assert not Path(f"/sys/fs/cgroup/{hierarchy}/{PREFIX}-i1").exists()


def test_a_fleet_left_by_a_killed_test_process_is_undone_by_the_next_sandbox(
        tmp_path: Path) -> None:
    check_host()
    script = ORPHAN.format(root=str(ROOT), fleet=str(tmp_path / "orphan"))
    orphan = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True, start_new_session=True, env=dict(os.environ))
    try:
        assert orphan.stdout is not None
        pids = json.loads(orphan.stdout.readline())
        assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        orphan.send_signal(signal.SIGKILL)  # no cleanup: its hosts outlive it
        orphan.wait()
        if orphan.stdout is not None:
            orphan.stdout.close()
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)

    box = Sandbox(tmp_path / "next")
    try:
        box.boot()  # takes the lock the orphan's fleet recorded its PID 1s in
    finally:
        box.kill()
    wait_for("the orphaned hosts to be gone",
             lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids))
    for name in ("k1", "k2"):
        for hierarchy in CGROUP_HIERARCHIES:
            assert not Path(f"/sys/fs/cgroup/{hierarchy}/{PREFIX}-{name}").exists()
