"""Direct mode's data plane: a BPF ``sk_lookup`` program that hands each new TCP connection
for the public address to the live color's own listening socket.

    connection for the public address
        │ sk_lookup (attached to the router's network namespace by a BPF link)
        ├─ protocol, family, local address and port match ``Target``
        │   and live[0] names a slot of listeners holding a socket → bpf_sk_assign(it)
        │   → counts[slot] += 1
        └─ else: nothing assigned → the kernel's normal lookup: the systemd socket, the router

Maps (never pinned: they, the program and the link die with the router, and with them the
steering — the kernel's normal lookup is the fallback)::

    live       ARRAY   1 entry   u32 slot (Color index; NO_SLOT steers nothing)
    listeners  SOCKMAP 2 entries a listening socket per Color index (the kernel drops one
                                 when its last descriptor closes)
    counts     ARRAY   2 entries u64 connections steered per Color index

The program is assembled here (no compiler, no kernel headers); it always returns SK_PASS,
so a connection it does not steer takes the normal lookup. ``bpf(2)`` comes through ctypes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import platform
import socket
import struct
import sys
from dataclasses import dataclass

from switcher.errors import SteerError
from switcher.model import Color, steered_address

# bpf(2) has no wrapper in Python; its number differs per architecture.
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
NO_SLOT = 0xFFFFFFFF  # live[0] when nothing is steered: no listener has this index
LOG_SIZE = 1 << 16  # bytes of verifier log kept for the error when a load fails
SK_PASS = 1
IPPROTO_TCP = 6

# struct bpf_sk_lookup (include/uapi/linux/bpf.h): offsets of the fields read.
CTX_FAMILY = 8
CTX_PROTOCOL = 12
CTX_LOCAL_IP4 = 40
CTX_LOCAL_IP6 = 44
CTX_LOCAL_PORT = 60  # host byte order


class Cmd(enum.IntEnum):
    """bpf(2) commands used."""

    map_create = 0
    map_lookup_elem = 1
    map_update_elem = 2
    prog_load = 5
    link_create = 28


class MapType(enum.IntEnum):
    array = 2
    sockmap = 15


class Helper(enum.IntEnum):
    map_lookup_elem = 1
    sk_release = 86
    sk_assign = 124


PROG_TYPE_SK_LOOKUP = 30
ATTACH_SK_LOOKUP = 36


# -- the assembler -----------------------------------------------------------------------------

R0, R1, R2, R3, R6, R7, R9, R10 = 0, 1, 2, 3, 6, 7, 9, 10
OUT = "out"  # the one label: every mismatch jumps to the final `return SK_PASS`


@dataclass(frozen=True)
class Insn:
    """One instruction; ``jump`` names a label the offset is resolved to."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    jump: str = ""

    def encode(self, off: int) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, off, self.imm)


def mov_reg(dst: int, src: int) -> Insn:
    return Insn(0xBF, dst, src)  # ALU64 | MOV | X


def mov_imm(dst: int, imm: int) -> Insn:
    return Insn(0xB7, dst, imm=imm)  # ALU64 | MOV | K


def add_imm(dst: int, imm: int) -> Insn:
    return Insn(0x07, dst, imm=imm)  # ALU64 | ADD | K


def load_word(dst: int, src: int, off: int) -> Insn:
    return Insn(0x61, dst, src, off)  # LDX | MEM | W


def store_word(dst: int, off: int, src: int) -> Insn:
    return Insn(0x63, dst, src, off)  # STX | MEM | W


def store_word_imm(dst: int, off: int, imm: int) -> Insn:
    return Insn(0x62, dst, off=off, imm=imm)  # ST | MEM | W


def atomic_add_dword(dst: int, off: int, src: int) -> Insn:
    return Insn(0xDB, dst, src, off, imm=0)  # STX | ATOMIC | DW, BPF_ADD


def skip_unless_word(reg: int, imm: int) -> Insn:
    """To OUT unless the low 32 bits of ``reg`` equal ``imm`` (JMP32 | JNE | K: a 32-bit
    compare, so an address above 2**31 needs no sign-extension care)."""
    return Insn(0x56, reg, imm=_signed32(imm), jump=OUT)


def skip_if_zero(reg: int) -> Insn:
    return Insn(0x15, reg, jump=OUT)  # JMP | JEQ | K, imm 0


def skip_unless_zero(reg: int) -> Insn:
    return Insn(0x55, reg, jump=OUT)  # JMP | JNE | K, imm 0


def call(helper: Helper) -> Insn:
    return Insn(0x85, imm=helper)


def exit_() -> Insn:
    return Insn(0x95)


def load_map(dst: int, map_fd: int) -> list[Insn]:
    """LD | IMM | DW with src BPF_PSEUDO_MAP_FD: the verifier turns the fd into the map."""
    return [Insn(0x18, dst, 1, imm=map_fd), Insn(0)]


def assemble(program: list[Insn | str]) -> bytes:
    """Encode ``program`` (instructions and label names); jumps get their offsets."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    return b"".join(insn.encode(labels[insn.jump] - i - 1 if insn.jump else insn.off)
                    for i, insn in enumerate(insns))


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


# -- what is steered ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """TCP connections of ``family`` for ``port`` on ``address`` (None: any local address)."""

    family: socket.AddressFamily
    port: int
    address: str | None

    def words(self) -> list[int]:
        """The local address as the context holds it: 32-bit words in network order."""
        if self.address is None:
            return []
        packed = socket.inet_pton(self.family, self.address)
        return [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, len(packed), 4)]

    @property
    def probe_address(self) -> tuple[str, int]:
        """Where a connection from this host is one the program steers."""
        loopback = "127.0.0.1" if self.family == socket.AF_INET else "::1"
        return (self.address or loopback, self.port)


def target(public_host: str, public_port: int, color_host: str) -> Target | None:
    """What may be steered from the public address to colors bound to ``color_host``
    (:func:`switcher.model.steered_address`); None when nothing can be."""
    steered = steered_address(public_host, color_host)
    if steered is None:
        return None
    version, address = steered
    return Target(socket.AF_INET if version == 4 else socket.AF_INET6, public_port, address)


def program(target: Target, live_fd: int, listeners_fd: int, counts_fd: int) -> list[Insn | str]:
    address_offset = CTX_LOCAL_IP4 if target.family == socket.AF_INET else CTX_LOCAL_IP6
    address_checks: list[Insn | str] = []
    for i, word in enumerate(target.words()):
        address_checks += [load_word(R2, R6, address_offset + 4 * i), skip_unless_word(R2, word)]
    return [
        mov_reg(R6, R1),  # the context, kept across calls
        load_word(R2, R6, CTX_PROTOCOL), skip_unless_word(R2, IPPROTO_TCP),
        load_word(R2, R6, CTX_FAMILY), skip_unless_word(R2, target.family),
        load_word(R2, R6, CTX_LOCAL_PORT), skip_unless_word(R2, target.port),
        *address_checks,
        store_word_imm(R10, -4, 0), mov_reg(R2, R10), add_imm(R2, -4),
        *load_map(R1, live_fd), call(Helper.map_lookup_elem), skip_if_zero(R0),
        load_word(R2, R0, 0), store_word(R10, -8, R2),  # the live slot, a key on the stack
        mov_reg(R2, R10), add_imm(R2, -8),
        *load_map(R1, listeners_fd), call(Helper.map_lookup_elem), skip_if_zero(R0),
        mov_reg(R7, R0),  # a referenced socket: released on every path below
        mov_reg(R1, R6), mov_reg(R2, R7), mov_imm(R3, 0), call(Helper.sk_assign),
        mov_reg(R9, R0), mov_reg(R1, R7), call(Helper.sk_release),
        skip_unless_zero(R9),  # not assigned (another program's choice stands): not counted
        mov_reg(R2, R10), add_imm(R2, -8),
        *load_map(R1, counts_fd), call(Helper.map_lookup_elem), skip_if_zero(R0),
        mov_imm(R1, 1), atomic_add_dword(R0, 0, R1),
        OUT, mov_imm(R0, SK_PASS), exit_(),
    ]


# -- bpf(2) ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: Cmd, attr: bytes) -> int:
    """Call bpf(2) with ``attr``; returns its result, raises OSError."""
    number = BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise SteerError(f"direct mode knows no bpf(2) number on {platform.machine()}",
                         'use mode = "tcp"')
    buf = ctypes.create_string_buffer(attr, len(attr))
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), buf,
                           ctypes.c_uint(len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def create_map(kind: MapType, value_size: int, entries: int, name: bytes) -> int:
    return _bpf_fd("create a BPF map", Cmd.map_create,
                   struct.pack("<IIIIIII16s", kind, 4, value_size, entries, 0, 0, 0, name))


def update(map_fd: int, key: int, value: bytes) -> None:
    key_buf = ctypes.create_string_buffer(struct.pack("<I", key), 4)
    value_buf = ctypes.create_string_buffer(value, len(value))
    try:
        bpf(Cmd.map_update_elem, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key_buf),
                                             ctypes.addressof(value_buf), 0))
    except OSError as e:
        raise SteerError(f"updating BPF map entry {key} failed: {e.strerror}",
                         "journalctl -u the router; direct mode needs CAP_BPF") from None


def lookup(map_fd: int, key: int, size: int) -> bytes:
    key_buf = ctypes.create_string_buffer(struct.pack("<I", key), 4)
    value_buf = ctypes.create_string_buffer(size)
    bpf(Cmd.map_lookup_elem, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key_buf),
                                         ctypes.addressof(value_buf), 0))
    return value_buf.raw


def load_program(code: bytes) -> int:
    """Load an sk_lookup program; the verifier's log is in the error when it refuses."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(LOG_SIZE)
    attr = struct.pack("<IIQQIIQII16sII", PROG_TYPE_SK_LOOKUP, len(code) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license_), 1, LOG_SIZE,
                       ctypes.addressof(log), 0, 0, b"alive_steer", 0, ATTACH_SK_LOOKUP)
    try:
        return bpf(Cmd.prog_load, attr)
    except OSError as e:
        text = log.value.decode(errors="replace").strip()
        if not text:  # refused before the verifier ran: permissions
            raise SteerError(f"the kernel refused the sk_lookup program: {e.strerror}",
                             'direct mode needs CAP_BPF and CAP_NET_ADMIN; or use mode = "tcp"'
                             ) from None
        raise SteerError(f"the verifier refused the sk_lookup program: {e.strerror}; "
                         f"verifier log:\n{text}",
                         'report this log to alive-switch; meanwhile use mode = "tcp"') from None


def attach(prog_fd: int) -> int:
    """Link the program to this thread's network namespace (the router's: it has one thread;
    a test's: its own); closing the link detaches."""
    netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _bpf_fd("attach the sk_lookup program to the network namespace",
                       Cmd.link_create, struct.pack("<IIII", prog_fd, netns, ATTACH_SK_LOOKUP, 0))
    finally:
        os.close(netns)


def _bpf_fd(what: str, cmd: Cmd, attr: bytes) -> int:
    try:
        return bpf(cmd, attr)
    except OSError as e:
        raise SteerError(f"cannot {what}: {e.strerror}",
                         'direct mode needs CAP_BPF and CAP_NET_ADMIN; or use mode = "tcp"'
                         ) from None


# -- the steering, whole -----------------------------------------------------------------------

class Steering:
    """The program, its maps and its link, attached from construction until ``close``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.fds: list[int] = []  # closed by close(), maps included
        try:
            self.live = self._keep(create_map(MapType.array, 4, 1, b"alive_live"))
            self.listeners = self._keep(create_map(MapType.sockmap, 8, len(Color),
                                                   b"alive_listeners"))
            self.counts = self._keep(create_map(MapType.array, 8, len(Color), b"alive_counts"))
            self.select(None)
            code = assemble(program(target, self.live, self.listeners, self.counts))
            prog = self._keep(load_program(code))
            self.link = self._keep(attach(prog))
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def insert(self, color: Color, sock: socket.socket) -> None:
        """Put ``sock`` (a listener) in ``color``'s slot. The map holds the socket itself, not
        the descriptor: the caller closes its copy at once (a held copy would keep a dead
        color's port listening)."""
        update(self.listeners, _slot(color), struct.pack("<Q", sock.fileno()))

    def select(self, color: Color | None) -> None:
        """Steer new connections to ``color``'s listener (None: to none): one map update."""
        update(self.live, 0, struct.pack("<I", NO_SLOT if color is None else _slot(color)))

    def holds(self, color: Color) -> bool:
        """Whether ``color``'s slot holds a listener (the kernel empties it when the socket
        closes)."""
        try:
            lookup(self.listeners, _slot(color), 8)  # a listener's socket cookie
        except FileNotFoundError:
            return False
        return True

    def selected(self) -> Color | None:
        slot = struct.unpack("<I", lookup(self.live, 0, 4))[0]
        return list(Color)[slot] if slot < len(Color) else None

    def steered(self) -> dict[Color, int]:
        """Connections the program handed to each color's listener since it was loaded."""
        return {c: struct.unpack("<Q", lookup(self.counts, _slot(c), 8))[0] for c in Color}

    async def probe(self, timeout: float = 1.0) -> bool:
        """Whether the kernel steers now, measured: a connection to the public address is
        counted by the program only when it was handed to a listener (another program that
        chose first, or no listener in the live slot, leaves the count alone). Awaited, not
        blocking: a color whose accept queue is full takes the whole ``timeout`` to refuse,
        and the router's loop must go on serving meanwhile."""
        before = sum(self.steered().values())
        with socket.socket(self.target.family, socket.SOCK_STREAM) as probe:
            probe.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.get_running_loop().sock_connect(probe,
                                                                  self.target.probe_address)
            except (OSError, TimeoutError):
                return False
        return sum(self.steered().values()) > before

    def close(self) -> None:
        """Detach and free everything: connections take the normal lookup again."""
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())


def _slot(color: Color) -> int:
    return list(Color).index(color)
