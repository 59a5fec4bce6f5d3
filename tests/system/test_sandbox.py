"""The sandbox itself: systemd boots hermetically, runs the sample app, reboots, and leaves
the host as it found it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.ports import bindable, port_block
from tests.system import sandbox as sandbox_module
from tests.system.conftest import SandboxFactory
from tests.system.sandbox import LOCK_WAIT_VAR, Sandbox, SandboxError, private_tmp_dirs

pytestmark = pytest.mark.system

APP = Path(__file__).resolve().parents[2] / "examples" / "app" / "server.py"
APP_PORT, SOCKET_PORT = port_block(__name__, 2)
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 10) -> T:
    """Poll probe until it returns something other than None, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while (value := probe()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def health(port: int) -> dict[str, object] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture(scope="module", autouse=True)
def host_tmp_marker() -> Iterator[Path]:
    """A file in the host's /tmp made before any sandbox of this module boots."""
    marker = Path("/tmp") / f"alive-switch-sandbox-marker-{uuid.uuid4().hex}"
    marker.write_text("still here\n")
    yield marker
    marker.unlink(missing_ok=True)


# The first tests boot their own sandboxes, before the module's `sandbox` exists.
def test_failed_boot_says_why_and_frees_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox_module, "SYSTEMD_BINARY", Path("/nonexistent/systemd"))
    box = Sandbox(tmp_path)
    with pytest.raises(SandboxError) as failure:
        box.boot()
    assert "the sandbox exited" in str(failure.value)
    boot_log = str(failure.value).partition("boot log")[2]
    assert "nonexistent/systemd" in boot_log
    assert "No such file or directory" in boot_log
    assert not box.alive
    monkeypatch.undo()
    box.boot().kill()  # the lock was released


def test_reboot_keeps_enabled_units_and_state(sandbox_factory: SandboxFactory) -> None:
    private_tmp_before = private_tmp_dirs()
    box = sandbox_factory()
    units = {
        "sbx-boot.service": "[Service]\nExecStart=/bin/sleep infinity\n"
        "[Install]\nWantedBy=multi-user.target\n",
        "sbx-listen.socket": f"[Socket]\nListenStream=127.0.0.1:{SOCKET_PORT}\n"
        "[Install]\nWantedBy=sockets.target\n",
        "sbx-listen.service": "[Service]\nExecStart=/bin/sleep infinity\n",  # never triggered
    }
    for name, text in units.items():
        (box.unit_dir / name).write_text(text)
    box.systemctl("enable", "--now", "sbx-boot.service", "sbx-listen.socket", check=True)
    box.run("sh", "-c", "echo kept > /var/lib/alive-switch/marker", check=True)
    box.run("systemd-run", "--unit=sbx-private", "-p", "PrivateTmp=yes", "sleep", "infinity")
    assert (box.unit_dir / "multi-user.target.wants" / "sbx-boot.service").is_symlink()
    assert not Path("/etc/systemd/system/multi-user.target.wants/sbx-boot.service").exists()
    assert (box.state_dir / "marker").read_text() == "kept\n"
    assert private_tmp_dirs() > private_tmp_before
    assert not bindable(SOCKET_PORT)

    rebooted = sandbox_factory(box.root)

    assert not box.alive
    assert private_tmp_dirs() == private_tmp_before
    states = rebooted.systemctl("is-active", "sbx-boot.service", "sbx-listen.socket").stdout
    assert states.split() == ["active", "active"]
    assert not bindable(SOCKET_PORT)
    assert rebooted.run("cat", "/var/lib/alive-switch/marker").stdout == "kept\n"
    assert rebooted.systemctl("is-active", "sbx-private").stdout.strip() != "active"

    rebooted.kill()
    assert bindable(SOCKET_PORT)


def test_systemd_is_pid_1_and_running(sandbox: Sandbox, tmp_path: Path) -> None:
    assert sandbox.run("cat", "/proc/1/comm").stdout == "systemd\n"
    assert sandbox.systemctl("is-system-running").stdout.strip() == "running"
    assert sandbox.systemctl("is-active", "systemd-journald").stdout.strip() == "active"
    assert sandbox.run("pwd", cwd=tmp_path).stdout.strip() == str(tmp_path)
    assert sandbox.run("sh", "-c", "echo $X", env={"X": "a b"}).stdout == "a b\n"
    assert "Welcome to" in sandbox.boot_log()


def test_only_one_sandbox_at_a_time(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LOCK_WAIT_VAR, raising=False)  # refuse at once, do not queue
    with pytest.raises(SandboxError, match="another sandbox is running"):
        Sandbox(tmp_path).boot()
    assert sandbox.alive


def test_run_timeout_kills_the_command_inside(sandbox: Sandbox) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run("sleep", "7777", timeout=0.3)
    # Neither running nor a zombie left to the host's PID 1 (see kill_group).
    assert sandbox.run("pgrep", "-x", "sleep").returncode == 1


def test_transient_app_serves_the_host_and_stops_gracefully(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    build = tmp_path / "build-7"
    build.mkdir()
    (build / "BUILD").write_text("build-7 (abc123)\n")
    sandbox.run(
        *("systemd-run", "--unit=sbx-app", "-p", f"WorkingDirectory={build}"),
        *("-E", "HOST=127.0.0.1", "-E", f"PORT={APP_PORT}", "-E", "COLOR=blue"),
        *("-E", 'ODD=a  b "c" $d'),
        *(sys.executable, APP),
        check=True,
    )

    identity = wait_for("the app to answer its health check", lambda: health(APP_PORT))
    main_pid = sandbox.systemctl("show", "-p", "MainPID", "--value", "sbx-app").stdout.strip()
    assert identity == {
        "build": "build-7 (abc123)",
        "color": "blue",
        "pid": int(main_pid),
        "port": APP_PORT,
    }
    environment = httpx.get(f"http://127.0.0.1:{APP_PORT}/env").json()
    assert environment["ODD"] == 'a  b "c" $d'

    slow_url = f"http://127.0.0.1:{APP_PORT}/slow?seconds=0.5&bytes=1000"
    with httpx.stream("GET", slow_url, timeout=5) as slow:  # in flight once headers are in
        stop = threading.Thread(target=sandbox.systemctl, args=("stop", "sbx-app"))
        started = time.monotonic()
        stop.start()
        body = slow.read()
    stop.join()
    stop_seconds = time.monotonic() - started

    assert slow.status_code == 200
    assert body == b"x" * 1000
    assert stop_seconds < 3, "SIGTERM should end the app at once, not after TimeoutStopSec"
    log = sandbox.journal("sbx-app")
    assert "serving build build-7 (abc123) color blue" in log
    assert "stopped gracefully" in log
    assert "status=" not in log  # systemd notes a kill or a non-zero exit as status=...
    assert health(APP_PORT) is None


def test_host_tmp_survives(sandbox: Sandbox, host_tmp_marker: Path) -> None:
    assert host_tmp_marker.read_text() == "still here\n"
    assert sandbox.run("cat", host_tmp_marker).stdout == "still here\n"
