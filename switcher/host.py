"""Who listens on a port and who a PID is, on this host: the one reader of ``ss`` and of
``/proc`` for processes (pre-flight, install and the takeover all ask it).

``ss`` asks the kernel for listening sockets only, with a filter: under load
``/proc/net/tcp`` holds tens of thousands of TIME_WAIT lines, which psutil would read all
of (~1 s). psutil (~17 ms to import) is used only to name a process in a message, and
where ``ss`` is missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Holder:
    """A process listening on a port, and the systemd unit it runs in ("" if unknown)."""

    pid: int | None  # None: a process this PID namespace cannot see
    unit: str
    command: str

    def describe(self) -> str:
        if self.pid is None:
            return "a process outside this PID namespace"
        return f"PID {self.pid} ({self.command})" + (f" of {self.unit}" if self.unit else "")


def listening_sockets(port: int) -> dict[int, set[int]]:
    """{socket inode: PIDs holding it} for the TCP sockets listening on ``port`` (an empty
    set: held by processes this PID namespace cannot see). Raises OSError without ``ss``."""
    try:
        out = subprocess.run(["ss", "-Hltnep", f"sport = :{port}"], capture_output=True,
                             text=True, check=True, timeout=10).stdout
    except subprocess.SubprocessError as exc:
        raise OSError(f"ss failed: {exc}") from None
    sockets: dict[int, set[int]] = {}
    for line in out.splitlines():
        inode = re.search(r"\bino:(\d+)", line)
        if inode:
            sockets[int(inode.group(1))] = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    return sockets


def listen_backlog(port: int) -> int | None:
    """The smallest accept-queue limit of the sockets listening on ``port`` (``ss`` shows a
    listener's backlog as its Send-Q), or None when nothing listens there."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    limits = [int(line.split()[2]) for line in out.splitlines() if len(line.split()) > 2]
    return min(limits) if limits else None


def listeners(port: int) -> list[int]:
    """PIDs (that this namespace can see) holding a socket that listens on ``port``."""
    return sorted({pid for pids in listening_sockets(port).values() for pid in pids})


def port_holders(port: int) -> list[Holder]:
    """Who listens on TCP ``port``, on any address."""
    try:
        pids: set[int | None] = set()
        for held_by in listening_sockets(port).values():
            pids |= held_by or {None}
    except OSError:
        import psutil  # noqa: PLC0415 - only where ss is missing

        pids = {conn.pid for conn in psutil.net_connections("tcp")
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port}
    return [_holder(pid) for pid in sorted(pids, key=lambda p: p or 0)]


def _holder(pid: int | None) -> Holder:
    return Holder(None, "", "") if pid is None else Holder(pid, unit_of_pid(pid),
                                                             command_of(pid)[:120])


def command_of(pid: int) -> str:
    """Its command line ("?" when it is gone or hidden)."""
    import psutil  # noqa: PLC0415 - only to name a process in a message

    try:
        process = psutil.Process(pid)
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "?"


def describe(pid: int) -> str:
    """``PID 123 (python: python server.py)``, for an error message."""
    import psutil  # noqa: PLC0415 - only to name a process in a message

    try:
        name = psutil.Process(pid).name()
    except psutil.Error:
        return f"PID {pid}"
    return f"PID {pid} ({name}: {command_of(pid)})"


def unit_of_pid(pid: int) -> str:
    """The unit whose cgroup holds ``pid`` (``foo.service``), from /proc/PID/cgroup."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        path = line.split(":", 2)[-1]
        units = re.findall(r"[^/]+\.(?:service|scope|socket)(?=/|$)", path)
        if units and (line.startswith("0::") or "name=systemd" in line):
            return str(units[-1])
    return ""


def bind_problem(address: str, port: int) -> str:
    """"" when a listener can bind ``address:port`` now, else why not. It binds as servers
    do (SO_REUSEADDR): server-side TIME_WAIT does not block that, so neither does it here."""
    address = address.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)
    return ""


def listen_conflict(address: str, port: int, own_unit: str) -> str:
    """"" when ``address:port`` can be listened on by ``own_unit`` (free, or ``own_unit``
    already listens there), else who or what is in the way."""
    problem = bind_problem(address, port)
    if problem != os.strerror(errno.EADDRINUSE):
        return problem
    holders = port_holders(port)
    foreign = [h for h in holders if h.unit != own_unit]
    if holders and not foreign:
        return ""
    return f"held by {foreign[0].describe()}" if foreign else problem


def socket_inodes_of(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` holds open (empty when it is gone or hidden)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes
