"""Find a color's listening socket among the processes of its unit and copy it out.

The color's unit may run a wrapper (``npm start``, a shell): the listener is looked for in
every process whose cgroup is the unit's, not only in its main PID::

    /proc/<pid>/cgroup     "0::/system.slice/…/alive-production@green.service"
                           (or the "name=systemd" line on a hybrid hierarchy)
    sock_diag (netlink)    the inodes of this network namespace's TCP listeners on the port
    /proc/<pid>/fd/<n>     a symlink "socket:[<inode>]"

The listeners come from the kernel's ``sock_diag`` interface (what ``ss -l`` asks), not from
``/proc/<pid>/net/tcp``: that file lists every TCP socket of the namespace, TIME_WAIT ones
included, and under load one read of it took over 5 s here (a steer timed out on it). A
dump of listeners only never walks the established table. Where ``sock_diag`` is missing
(its module cannot be loaded), each process's ``/proc/<pid>/net/tcp[6]`` is read instead::

    "sl local_address rem_address st … uid timeout inode …": local_address "0100007F:2329"
    (the address's 32-bit words as the host stores them, the port), st 0A = LISTEN

The copy comes through ``pidfd_getfd(2)`` (ptrace access to the process: Yama
``ptrace_scope = 3`` forbids it). The caller closes the copy as soon as the kernel holds the
socket in its map: a copy kept would keep a dead color's port listening.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from switcher.errors import SteerError

PIDFD_OPEN = 434  # the same number on x86_64 and aarch64 (the generic syscall table)
PIDFD_GETFD = 438
TCP_LISTEN = "0A"
PROC = Path("/proc")

# sock_diag(7): one SOCK_DIAG_BY_FAMILY dump request, answered by inet_diag_msg records.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCPF_LISTEN = 1 << 10
NLMSG = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
DIAG_REQUEST = struct.Struct("=BBBBI48x")  # inet_diag_req_v2, with a zero inet_diag_sockid
# inet_diag_msg: family, state, timer, retrans; sockid (sport and dport in network order,
# src and dst 16 bytes each, interface, cookie); expires, rqueue, wqueue, uid, inode.
DIAG_MESSAGE = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
DIAG_TIMEOUT = 1.0  # well inside the CLI's 5 s for a steer, so the fallback can run

_libc = ctypes.CDLL(None, use_errno=True)


def unit_pids(unit: str, proc: Path = PROC) -> list[int]:
    """The PIDs whose cgroup is ``unit``'s (or below it)."""
    pids = []
    for entry in proc.iterdir():
        if entry.name.isdigit() and _in_unit(entry / "cgroup", unit):
            pids.append(int(entry.name))
    return sorted(pids)


def _in_unit(cgroup: Path, unit: str) -> bool:
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:  # the process just exited
        return False
    for line in lines:
        hierarchy, _, path = line.partition(":")[2].partition(":")
        if (hierarchy in ("", "name=systemd")) and unit in path.split("/"):
            return True
    return False


def listening_inodes(table: str, host: str, port: int) -> set[int]:
    """Inodes of the sockets listening on ``host:port`` (or on the wildcard address of its
    family, which accepts there too) in one ``/proc/<pid>/net/tcp[6]`` table."""
    inodes = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        address, _, hex_port = fields[1].partition(":")
        if _accepts(_address(address), int(hex_port, 16), host, port):
            inodes.add(int(fields[9]))
    return inodes


def _address(hex_words: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    packed = b"".join(int(hex_words[i:i + 8], 16).to_bytes(4, sys.byteorder)
                      for i in range(0, len(hex_words), 8))
    return ipaddress.ip_address(packed)


def _tables(pid: int, host: str, proc: Path) -> str:
    name = "tcp6" if ipaddress.ip_address(host).version == 6 else "tcp"
    try:
        return (proc / str(pid) / "net" / name).read_text()
    except OSError:
        return ""


def _socket_fds(pid: int, inodes: set[int], proc: Path) -> Iterator[int]:
    links = {f"socket:[{inode}]" for inode in inodes}
    with contextlib.suppress(OSError):
        for entry in (proc / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(entry) in links:
                    yield int(entry.name)


def kernel_listeners(host: str, port: int) -> set[int]:
    """Inodes of this network namespace's TCP sockets listening on ``host:port`` (or on
    the wildcard address of its family), from one sock_diag dump of listeners only.
    Raises OSError where sock_diag is not available."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    request = DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, TCPF_LISTEN)
    header = NLMSG.pack(NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY,
                        NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(DIAG_TIMEOUT)
        nl.sendto(header + request, (0, 0))
        inodes: set[int] = set()
        while True:
            data = nl.recv(1 << 16)
            if not data:
                raise OSError(errno.EPROTO, "sock_diag: the dump ended without NLMSG_DONE")
            for kind, payload in _netlink_messages(data):
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    # Both carry an int: 0, or minus the errno that cut the dump short.
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code:
                        raise OSError(code, f"sock_diag: {os.strerror(code)}")
                    if kind == NLMSG_DONE:
                        return inodes
                    continue  # an acknowledgement
                inode = _diag_listener(payload, family, host, port)
                if inode is not None:
                    inodes.add(inode)


def _netlink_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind, _, _, _ = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size:
            return
        yield kind, data[offset + NLMSG.size:offset + length]
        offset += (length + 3) & ~3  # records are 4-byte aligned


def _diag_listener(payload: bytes, family: int, host: str, port: int) -> int | None:
    """The inode of one inet_diag_msg record if it listens where ``host:port`` accepts."""
    if len(payload) < DIAG_MESSAGE.size:
        raise OSError(errno.EPROTO, f"sock_diag: a record of {len(payload)} bytes")
    fields = DIAG_MESSAGE.unpack_from(payload)
    source = fields[6] if family == socket.AF_INET6 else fields[6][:4]
    bound = ipaddress.ip_address(source)
    accepts = _accepts(bound, int.from_bytes(fields[4], "big"), host, port)
    return int(fields[-1]) if fields[0] == family and accepts else None


def _accepts(bound: ipaddress.IPv4Address | ipaddress.IPv6Address, bound_port: int,
             host: str, port: int) -> bool:
    """Whether a listener on ``bound:bound_port`` accepts connections to ``host:port``."""
    wanted = ipaddress.ip_address(host)
    return bound_port == port and bound.version == wanted.version and (
        bound == wanted or bound.is_unspecified)


def find(pids: list[int], host: str, port: int, proc: Path = PROC) -> tuple[int, int] | None:
    """(pid, fd) of a process among ``pids`` holding a listener on ``host:port``."""
    try:
        listeners: set[int] | None = kernel_listeners(host, port)
    except OSError:
        listeners = None  # no sock_diag here: each process's own table, slower
    for pid in pids:
        inodes = (listeners if listeners is not None
                  else listening_inodes(_tables(pid, host, proc), host, port))
        for fd in _socket_fds(pid, inodes, proc) if inodes else ():
            return pid, fd
    return None


def copy(pid: int, fd: int) -> socket.socket:
    """A descriptor of process ``pid``'s ``fd`` in this process, as a socket; raises OSError
    (ENOTSOCK, the copy closed, when that descriptor is no longer a socket)."""
    pidfd = _syscall(PIDFD_OPEN, pid, 0)
    try:
        raw = _syscall(PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    try:
        return socket.socket(fileno=raw)
    except OSError:
        os.close(raw)
        raise


def _syscall(number: int, *args: int) -> int:
    result = _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def locate(unit: str, host: str, port: int) -> tuple[int, int]:
    """(pid, fd) of ``unit``'s listener on ``host:port``. Only reads ``/proc`` and holds
    nothing: the router runs it in a thread, so a slow scan never stalls its loop."""
    pids = unit_pids(unit)
    found = find(pids, host, port)
    if found is None:
        raise SteerError(f"no process of {unit} (PIDs {pids or 'none'}) listens on "
                         f"{host}:{port}",
                         f"journalctl -u {unit} -n 50: the app must bind $HOST:$PORT")
    return found


def take(unit: str, found: tuple[int, int], host: str, port: int) -> socket.socket:
    """A copy of the listener ``locate`` found; the caller closes it. Checked again, since
    the process may have closed that descriptor and opened another since the scan."""
    pid, fd = found
    try:
        sock = copy(pid, fd)
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            raise _closed_meanwhile(unit, found, host, port) from None
        raise SteerError(f"cannot copy the listener of {unit} (PID {pid}, fd {fd}): "
                         f"{e.strerror}",
                         "direct mode needs ptrace access to the color (Yama ptrace_scope "
                         'below 3, CAP_SYS_PTRACE); or use mode = "tcp"') from None
    if not _listens_on(sock, port):
        sock.close()
        raise _closed_meanwhile(unit, found, host, port)
    return sock


def _closed_meanwhile(unit: str, found: tuple[int, int], host: str, port: int) -> SteerError:
    return SteerError(f"the listener of {unit} on {host}:{port} (PID {found[0]}, fd "
                      f"{found[1]}) closed while it was taken",
                      f"journalctl -u {unit} -n 50: is the app restarting?")


def _listens_on(sock: socket.socket, port: int) -> bool:
    try:
        name = sock.getsockname()
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:  # not a socket any more
        return False
    return isinstance(name, tuple) and name[1] == port and accepting == 1
