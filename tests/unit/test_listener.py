"""Finding a color's listener among its unit's processes, and copying it with pidfd_getfd."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from switcher.errors import SteerError
from switcher.router import listener
from tests.ports import port_block

PORT, OTHER = port_block(__name__, 2)

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1
   1: 00000000:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1
   2: 0100007F:4E20 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 333 1
   3: 0200007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1
"""
TABLE6 = ("  sl  local_address remote_address st tx:rx tr:tm retrnsmt uid timeout inode\n"
          "   0: 00000000000000000000000001000000:4E20 00000000000000000000000000000000:0000"
          " 0A 0:0 0:0 0 0 0 555 1\n")


def test_only_listeners_on_the_address_or_the_wildcard() -> None:
    assert listener.listening_inodes(TABLE, "127.0.0.1", 0x4E20) == {111}
    assert listener.listening_inodes(TABLE, "127.0.0.1", 0x4E21) == {222}  # 0.0.0.0
    assert listener.listening_inodes(TABLE, "127.0.0.1", 9) == set()


def test_ipv6_words_as_the_host_stores_them() -> None:
    assert listener.listening_inodes(TABLE6, "::1", 0x4E20) == {555}


def fake_proc(root: Path, cgroups: dict[int, str]) -> Path:
    for pid, text in cgroups.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "cgroup").write_text(text)
    (root / "self").mkdir()
    return root


def test_every_process_of_the_unit_on_either_hierarchy(tmp: Path) -> None:
    unit = "alive-production@green.service"
    proc = fake_proc(tmp, {
        10: f"0::/system.slice/system-alive.slice/{unit}\n",
        11: f"1:name=systemd:/system.slice/{unit}/helper\n0::/\n",  # hybrid, a sub-cgroup
        12: "0::/system.slice/system-alive.slice/alive-production@blue.service\n",
        13: f"4:memory:/system.slice/{unit}\n0::/\n",  # a controller's path is not the unit's
    })
    assert listener.unit_pids(unit, proc) == [10, 11]


@pytest.fixture
def app() -> Iterator[subprocess.Popen[str]]:
    """A process listening on PORT behind a wrapper-like extra descriptor."""
    code = ("import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
            f"socket.SO_REUSEADDR,1); s.bind(('127.0.0.1',{PORT})); s.listen(8); "
            "print('up', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait()
    proc.stdout.close()


def test_the_copy_is_the_apps_listener(app: subprocess.Popen[str]) -> None:
    found = listener.find([app.pid], "127.0.0.1", PORT)
    assert found is not None and found[0] == app.pid
    with listener.copy(*found) as copy:
        assert copy.getsockname() == ("127.0.0.1", PORT)
        assert copy.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with socket.create_connection(("127.0.0.1", PORT), timeout=2):
            copy.settimeout(2)
            copy.accept()[0].close()  # the very queue the app listens on


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def test_sock_diag_lists_only_listeners_on_the_address_or_the_wildcard() -> None:
    with socket.create_server(("127.0.0.1", PORT)) as exact, \
            socket.create_server(("0.0.0.0", OTHER)) as wild, \
            socket.create_connection(("127.0.0.1", PORT)):
        accepted, _ = exact.accept()  # an established socket on PORT: not a listener
        with accepted:
            assert listener.kernel_listeners("127.0.0.1", PORT) == {inode(exact)}
            assert listener.kernel_listeners("127.0.0.1", OTHER) == {inode(wild)}
            assert listener.kernel_listeners("127.0.0.2", PORT) == set()
            assert listener.kernel_listeners("::1", PORT) == set()


def test_a_dump_longer_than_one_read_is_read_to_its_end() -> None:
    """1,500 listeners on one port (SO_REUSEPORT): more records than one 64 KiB read."""
    socks = []
    try:
        for _ in range(1500):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", PORT))
            sock.listen(1)
        assert listener.kernel_listeners("127.0.0.1", PORT) == {inode(s) for s in socks}
    finally:
        for sock in socks:
            sock.close()


def test_find_asks_sock_diag_and_never_reads_the_tables(
        app: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def unread(*_: object) -> str:
        raise AssertionError("read /proc/<pid>/net/tcp")
    monkeypatch.setattr(listener, "_tables", unread)
    found = listener.find([app.pid], "127.0.0.1", PORT)
    assert found is not None and found[0] == app.pid


def test_without_sock_diag_find_reads_each_processs_table(
        app: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*_: object) -> set[int]:
        raise OSError(errno.EPROTONOSUPPORT, "no sock_diag")
    monkeypatch.setattr(listener, "kernel_listeners", missing)
    found = listener.find([app.pid], "127.0.0.1", PORT)
    assert found is not None and found[0] == app.pid


def test_netlink_records_are_split_on_their_aligned_lengths() -> None:
    first = listener.NLMSG.pack(listener.NLMSG.size + 3, 20, 0, 1, 0) + b"abc\0"
    error = listener.NLMSG.pack(listener.NLMSG.size + 4, listener.NLMSG_ERROR, 0, 1, 0)
    records = list(listener._netlink_messages(first + error + struct.pack("=i", -13)))
    assert records == [(20, b"abc"), (listener.NLMSG_ERROR, struct.pack("=i", -13))]


def test_nothing_found_on_another_port(app: subprocess.Popen[str]) -> None:
    assert listener.find([app.pid], "127.0.0.1", OTHER) is None


def test_taking_from_a_unit_without_a_listener_names_it_and_the_fix() -> None:
    with pytest.raises(SteerError, match=r"no process of nothing@blue.service \(PIDs none\)"
                                         r" listens on 127.0.0.1:") as caught:
        listener.locate("nothing@blue.service", "127.0.0.1", PORT)
    assert "$HOST:$PORT" in str(caught.value)


def test_a_descriptor_that_is_no_longer_the_listener_is_not_taken(
        app: subprocess.Popen[str]) -> None:
    """Between the scan and the copy the app may close the listener and reuse its number."""
    found = listener.find([app.pid], "127.0.0.1", PORT)
    assert found is not None
    with pytest.raises(SteerError, match=r"on 127.0.0.1:\d+ \(PID \d+, fd \d+\) closed while"):
        listener.take("app@blue.service", found, "127.0.0.1", OTHER)  # as if renumbered


def test_a_descriptor_now_a_pipe_is_not_taken_and_its_copy_is_closed() -> None:
    """The app may reuse the listener's number for a pipe between the scan and the copy."""
    read, write = os.pipe()
    try:
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError) as caught:
            listener.copy(os.getpid(), read)
        assert caught.value.errno == errno.ENOTSOCK
        with pytest.raises(SteerError, match=r"\(PID \d+, fd \d+\) closed while it was taken"):
            listener.take("app@blue.service", (os.getpid(), read), "127.0.0.1", PORT)
        assert len(os.listdir("/proc/self/fd")) == before  # no copy left open
    finally:
        os.close(read)
        os.close(write)


def test_a_copy_from_a_process_gone_is_an_os_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        listener.copy(proc.pid, 0)
